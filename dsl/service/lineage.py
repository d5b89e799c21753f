"""The names every job writes to MLflow and every reader (the report, the UI's columns) reads back.

A run says what it is (``dsl.kind``), where it comes from (its parents, by MLflow run id) and the fields a
results table is built from (row, sampler, T, η_cap source, protocol, sample count) as tags, so the MLflow
runs table sorts and groups by them and a reader never parses run names or file paths.

Lineage, by run id::

    finetune run ──dsl.training_run_id──▶ sample run ──dsl.sample_run_id──▶ evaluate run
    grid run ◀──mlflow.parentRunId── grid-cell run (dsl.training_run_id of its checkpoint when known)

A sample run writes its own id into every record it writes (``settings.mlflow_run_id``), which is how an
evaluate run of that file finds its parent.

Grid runs (``jobs/grid.py``): one parent per grid, found again by ``dsl.grid.name`` on resume, one child
per (row, T) cell. A cell's metrics are logged at step 0; the Table 6 sharpness curves are metric
histories whose MLflow step is the sampler step k (0..T-1).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# Experiments

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"   # a model-training experiment: the UI's runs view
UI_WORKFLOW_QUERY = "workflowType=machine_learning"  # MLflow >= 3.10 picks the view from the URL / browser
PAPER_EXPERIMENT = "paper-reference"

# ----------------------------------------------------------------------------------------------
# Tags every run may carry

KIND = "dsl.kind"
PARENT_RUN = "mlflow.parentRunId"        # MLflow's own nesting tag
RUN_NAME = "mlflow.runName"
CHECKPOINT = "dsl.checkpoint"            # the checkpoint URI a job loaded (or a training run's latest)
TRAINING_RUN = "dsl.training_run_id"     # the finetune run that wrote that checkpoint
TRAINING_RUN_NAME = "dsl.training_run_name"
SAMPLE_RUN = "dsl.sample_run_id"         # the sample run that wrote the file an evaluate run scored
SAMPLES = "dsl.samples"                  # the samples file an evaluate run scored
SUPERSEDED_BY = "dsl.superseded_by"      # a killed/partial run that a resume replaced

ROW = "dsl.row"                          # a table row label, e.g. "DSL-FT + ReMDM-loop (eta_cap(T))"
SAMPLER = "dsl.sampler"
STEPS = "dsl.steps"                      # the sampler's step budget T
ETA_CAP_SOURCE = "dsl.eta_cap_source"    # sec6.1 | eq24 | table4 | file:<uri> | official:<rule> | none
PROTOCOL = "dsl.protocol"                # evaluation protocol name (e.g. paper-table1, offline)
NUM_SAMPLES = "dsl.num_samples"
MODE = "dsl.mode"                        # evaluate: samples | likelihood | calibration
ESTIMATOR = "dsl.estimator"              # likelihood: "eq. 10 bound" | "eq. 3"
SOURCE = "dsl.source"                    # paper reference runs: where the numbers come from
REPORTED_BY = "dsl.reported_by"          # paper rows reported by another paper (‡)
PAPER_TABLE = "dsl.paper.table"          # paper reference runs: which table (table1 | table3)

# run kinds (values of KIND)
KIND_FINETUNE = "finetune"
KIND_SAMPLE = "sample"
KIND_EVALUATE = "evaluate"
KIND_SEARCH = "search"
KIND_GRID = "grid"
KIND_CELL = "grid-cell"
KIND_PREPARE_DATA = "prepare_data"
KIND_PAPER = "paper-reference"

# ----------------------------------------------------------------------------------------------
# Grid runs

GRID_NAME = "dsl.grid.name"              # the resume key of a grid
GRID_SPEC = "dsl.grid.spec"              # named spec or spec file
CELL_STATUS = "dsl.cell_status"
CELL_COMPLETE = "complete"
CELL_PARTIAL = "partial"
GRID_SPEC_ARTIFACT = "grid_spec.json"

# ----------------------------------------------------------------------------------------------
# Metrics (cells, sample and evaluate runs, paper reference runs: the same names)

MAUVE = "mauve"                          # headline: k-means seed 25 (mauve-text's default)
MAUVE_MEAN = "mauve_mean"
MAUVE_STD = "mauve_std"                  # over the extra k-means seeds
GENPPL = "genppl"
GENPPL_IMPOSSIBLE_SHARE = "genppl_impossible_share"   # samples an exact judge gives probability 0
SENTENCE_ENTROPY = "sentence_entropy"
NFE = "nfe"
REWRITES_PER_TOKEN = "rewrites_per_token"
ETA_CAP = "eta_cap"
NUM_SAMPLES_METRIC = "num_samples"
BPC = "bpc"
BITS_PER_TOKEN = "bits_per_token"
NLL_BOUND = "nll_bound"
NLL_STDERR = "nll_stderr"

# Table 6 sharpness: metric histories with MLflow step = sampler step k
DIAG_T = "diag.t"
DIAG_MEAN_MAX_PROB = "diag.mean_max_prob"
DIAG_NUCLEUS_SIZE = "diag.nucleus_size"
DIAGNOSTIC_METRICS = {"t": DIAG_T, "mean_max_prob": DIAG_MEAN_MAX_PROB, "nucleus_size": DIAG_NUCLEUS_SIZE}

# ----------------------------------------------------------------------------------------------
# Artifacts

SAMPLES_ARTIFACT = "samples.jsonl"
DIAGNOSTICS_ARTIFACT = "diagnostics.jsonl"
FIG2_ARTIFACT = "fig2.png"

# Where a sample record carries the id and name of the MLflow run that wrote it
RECORD_RUN_ID = "mlflow_run_id"
RECORD_RUN_NAME = "mlflow_run_name"
TRAINING_RUN_RECORD = "training_run_id"


def checkpoint_label(uri: str) -> str:
    """A short name for a checkpoint in run names: ``oracle:hmm`` → ``oracle-hmm``, a run or checkpoint
    directory or URI → its last one or two path parts (``runs/a/step-400`` → ``a/step-400``)."""
    uri = (uri or "").strip().rstrip("/")
    if not uri:
        return "?"
    if uri.startswith("oracle:"):
        return "oracle-" + uri.split(":", 1)[1]
    if uri.startswith("hf:"):
        return uri[3:].rsplit("/", 1)[-1]
    parts = [p for p in uri.split("://", 1)[-1].split("/") if p]
    if len(parts) >= 2 and parts[-1].startswith("step-"):
        return "/".join(parts[-2:])
    return parts[-1] if parts else uri


def sample_run_name(checkpoint: str, sampler: str, steps: int) -> str:
    """``sample dsl-ft remdm-loop T=128``: what a sample run drew, from what, with which budget."""
    return f"sample {checkpoint_label(checkpoint)} {sampler} T={steps}"


def read_samples_header(path: str) -> tuple[dict, int]:
    """``(settings of the first record, number of records)`` of a samples file as jobs/sample.py and
    the grid write it; ``({}, 0)`` when the file is missing or not JSON lines (the evaluation itself
    reports that as one line)."""
    import json

    settings: dict = {}
    count = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                if count == 0:
                    first = json.loads(line)
                    settings = first.get("settings") or {} if isinstance(first, dict) else {}
                count += 1
    except (OSError, ValueError, UnicodeDecodeError):
        return {}, 0
    return (settings if isinstance(settings, dict) else {}), count


def samples_tags(path: str) -> dict[str, str]:
    """The lineage an evaluation of the samples file ``path`` inherits: the sample run (by id) and what
    the samples are (checkpoint, its training run, sampler, T, η_cap source, count)."""
    settings, count = read_samples_header(path)
    tags = {SAMPLES: path}
    if not settings:
        return tags
    fields = {SAMPLE_RUN: settings.get(RECORD_RUN_ID), CHECKPOINT: settings.get("checkpoint"),
              TRAINING_RUN: settings.get(TRAINING_RUN_RECORD), SAMPLER: settings.get("sampler"),
              STEPS: settings.get("steps"), ETA_CAP_SOURCE: settings.get("eta_cap_source"),
              NUM_SAMPLES: count or None}
    tags.update({k: str(v) for k, v in fields.items() if v not in (None, "")})
    return tags


def evaluate_run_name(what: str, samples_path: str) -> str:
    """``evaluate MAUVE <the sample run's name>`` (or the file's name when it came from elsewhere)."""
    import os

    settings, _ = read_samples_header(samples_path)
    return f"evaluate {what} {settings.get(RECORD_RUN_NAME) or os.path.basename(samples_path) or '?'}"


__all__ = [name for name in dir() if name.isupper()] + ["checkpoint_label", "sample_run_name", "read_samples_header",
                                                         "samples_tags", "evaluate_run_name"]
