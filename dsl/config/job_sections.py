"""The sections of the work around the science: evaluation, the η_cap search, corpus preparation, where
and how a job executes and is tracked, and the comparison report. None is part of a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsl.config.fields import ConfigError, choice, flag, num, text, values
from dsl.config.science import MAX_BUDGET


@dataclass
class EvalConfig:
    """Scoring: MAUVE / GenPPL / sentence entropy of samples (Table 1), calibration (Fig 4), likelihood (Table 3)."""

    protocol: Literal["none", "paper-table1"] = choice(
        "none", "paper-table1 = Table 1's protocol (GPT-2 Large, 1,024 tokens, K=n/10, seed 25, wrapped OWT "
                "held-out blocks): fixes every setting; stand-ins are recorded as deviations")
    samples: str = text("", "the samples to score: JSON lines with 'text' (+ 'ids') as jobs/sample.py writes, or .txt")
    reference: str = text("", "reference texts: a .jsonl/.txt file | hf:<dataset>[:<config>] (a hub name or a local "
                              "dataset dir/file) | source (drawn from the checkpoint's exact source, checkpoint=oracle:*)")
    reference_split: str = text("", "split of an hf: reference; '' = MDLM's held-out split (OWT and local "
                                    "datasets: the last eval.heldout_docs train documents; else validation)")
    heldout_docs: int = num(100_000, 1, help="documents held out at the end of a train-only dataset (MDLM's OWT: "
                                             "100,000)")
    reference_blocks: int = num(0, 0, help="wrap hf: reference documents into [BOS]…[EOS] blocks of N tokens "
                                           "(MDLM's validation layout; paper-table1: 1024); 0 = documents as stored")
    reference_tokenizer: str = text("gpt2", "tokenizer that wraps reference blocks, the samples' own: gpt2 | "
                                            "<tokenizer dir>")
    eot: Literal["keep", "drop"] = choice("keep", "literal <|endoftext|> in sample and reference texts alike: keep "
                                                  "(ReMDM decodes with special tokens) | drop")
    references: int = num(0, 0, help="reference texts drawn without replacement; 0 = as many as samples")
    reference_seed: int = num(1, 0, help="seed of the reference draw (MDLM/ReMDM loader seed: 1)")
    words_per_reference: int = num(0, 0, help="cut the reference corpus into chunks of N words; 0 = as stored")
    featurizer: str = text("minilm", "MAUVE featurizer: minilm (offline) | gpt2-large (the paper's) | "
                                     "<local HF model dir>")
    max_length: int = num(0, 0, help="featurizer max tokens; 0 = its default (minilm 128, gpt2-large 1024)")
    featurize_batch: int = num(32, 1, help="texts per featurizer forward")
    mauve_seeds: tuple[int, ...] = values((25, 26, 27), "k-means seeds MAUVE is averaged over (mauve-text's "
                                                         "default seed is 25)")
    num_buckets: str = text("auto", "k-means buckets K: auto = n/10 (K=500 for 5k samples) or an integer")
    match_length: bool = flag(True, "cut samples and references to one token budget (recorded as length_budget)")
    length_budget: int = num(0, 0, help="token budget when matching lengths; 0 = the shorter set's longest text")
    feature_cache: str = text("auto", "reference-feature cache: auto = <cache root>/mauve-features ($DSL_CACHE_DIR, "
                                      "else ~/.cache/dsl) | a local dir | s3://... | '' = off")
    workers: int = num(0, 0, help="MAUVE featurizer actors on Ray; 0 = featurize in this process")
    gpus_per_worker: float = num(0.0, 0.0, help="GPUs per MAUVE featurizer actor")
    judge: str = text("none", "GenPPL judge: none | source (the exact likelihood of checkpoint=oracle:*) | "
                              "oracle:hmm | oracle:cyclic | oracle:topics | gpt2-large | <local HF causal LM dir> | "
                              "<AR checkpoint dir or s3:// URI>")
    judge_max_length: int = num(1024, 1, help="re-tokenisation max length of an HF judge (ReMDM: 1024)")
    genppl_batch: int = num(8, 1, help="samples per judge forward")
    snr: tuple[float, ...] = values((1.0, 5.0, 10.0, 20.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0),
                                    "calibration SNR grid (Fig 4a: the near-clean end 70..100)")
    calibration_bins: int = num(15, 2, help="equal-width confidence bins of the token ECE (paper: unstated)")
    reliability_snr: float = num(100.0, 0.0, lo_open=True, help="SNR of the reliability diagram (Fig 4b: 100)")
    batches: int = num(4, 1, help="held-out batches for calibration")
    batch_size: int = num(8, 1, help="held-out sequences per batch")
    n_mc: int = num(32, 2, help="likelihood: Monte Carlo draws of the path integral per sequence")
    max_sequences: int = num(0, 0, help="likelihood: held-out blocks scored; 0 = the whole held-out split "
                                        "(synthetic sources, which never end: batches × batch_size)")
    heldout: str = text("", "likelihood: held-out text file, laid out as the run's training blocks (text8 runs: "
                            "L-character documents, wrapped); '' = the run's own validation split")
    t_end: str = text("gamma_max", "likelihood: t* of eq. 4/10, the integral to t* + the model's factorised "
                                   "-log p(x | z_t*), an upper bound: gamma_max (of the run's channel) | a number "
                                   "| inf = eq. 3 (to γ=∞: diverges for a learned model, needs allow_eq3)")
    allow_eq3: bool = flag(False, "likelihood: allow t_end=inf for a learned model (its estimate has no finite mean)")




def _fmt(vals: tuple) -> str:
    return ",".join(f"{v:g}" for v in vals) or "''"


def check_search_range(key: str, rng: tuple[float, ...], *, lo: float, hi: float | None, lo_open: bool = False,
                       hi_open: bool = False, required: bool = False) -> None:
    if not rng and not required:
        return
    if len(rng) != 2:
        raise ConfigError(f"{key}={_fmt(rng)}: expected a range lo,hi (two numbers, lo < hi)")
    a, b = rng
    if not a < b:
        raise ConfigError(f"{key}={_fmt(rng)}: empty or inverted range; expected lo < hi")
    below = a < lo or (lo_open and a == lo)
    above = hi is not None and (b > hi or (hi_open and b == hi))
    if below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{key}={_fmt(rng)}: both ends must lie in {left}{lo:g}, "
                          f"{'inf' if hi is None else f'{hi:g}'}{right}")


@dataclass
class SearchConfig:
    """The η_cap(T) search (Sec 5.2): budgets, search space, the band on E[R_i], trials, the Optuna study."""

    budgets: tuple[int, ...] = values((16, 32), "step budgets T searched, one study each "
                                                 "(paper: 128,256,512,1024 at L=1024)")
    trials: int = num(6, 1, help="finished trials per T (a resumed search counts the stored ones)")
    min_samples: int = num(8, 2, help="samples at ASHA's first rung (= sampling.num_samples: no early stopping)")
    asha_reduction: int = num(2, 2, help="ASHA reduction factor (rungs min_samples·r^k)")
    asha: bool = flag(True, "stop weak trials early with ASHA over the sample count")
    eta_cap_range: tuple[float, ...] = values((1e-3, 0.5), "η_cap range lo,hi searched log-uniformly (both > 0)")
    t_on_range: tuple[float, ...] = values((), "optional t_on range lo,hi in (0,1] ('' = sampling.t_on fixed)")
    t_off_range: tuple[float, ...] = values((), "optional t_off range lo,hi in [0,1) ('' = sampling.t_off fixed)")
    alpha_on_range: tuple[float, ...] = values((), "optional α_on range lo,hi in (0,1) ('' = fixed)")
    top_p_range: tuple[float, ...] = values((), "optional top-p range lo,hi in (0,1] ('' = fixed)")
    rewrite_target: tuple[float, ...] = values((1.0, 2.0), "band lo,hi for the mean rewrite count E[R_i] "
                                                           "(Sec 5.2: 1,2)")
    penalty: float = num(1.0, 0.0, help="score = MAUVE − penalty·distance of E[R_i] outside the band")
    study: str = text("eta-cap", "study name; one Optuna study per T named <study>:T=<T>")
    study_db: str = text("", "Optuna database URL: '' = sqlite:///<out>/study.db | postgresql://... | "
                             "none (in memory, nothing kept)")
    startup_trials: int = num(4, 1, help="random start-up trials of TPE before it models")
    max_concurrent: int = num(0, 0, help="concurrent trials; 0 = derived from the cluster's resources")
    trial_cpus: float = num(1.0, 0.0, lo_open=True, help="CPUs per trial (GPU clusters: 1 GPU per trial)")

    def validate(self) -> None:
        shown = ",".join(map(str, self.budgets))
        if not self.budgets:
            raise ConfigError("search.budgets= is empty: give step budgets T > 0, e.g. search.budgets=128,256")
        if any(t <= 0 or t > MAX_BUDGET for t in self.budgets):
            raise ConfigError(f"search.budgets={shown}: every T must be in [1, {MAX_BUDGET}]")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"search.budgets={shown} repeats a budget")
        check_search_range("search.eta_cap_range", self.eta_cap_range, lo=0.0, hi=None, lo_open=True, required=True)
        check_search_range("search.t_on_range", self.t_on_range, lo=0.0, hi=1.0, lo_open=True)
        check_search_range("search.t_off_range", self.t_off_range, lo=0.0, hi=1.0, hi_open=True)
        check_search_range("search.alpha_on_range", self.alpha_on_range, lo=0.0, hi=1.0, lo_open=True,
                           hi_open=True)
        check_search_range("search.top_p_range", self.top_p_range, lo=0.0, hi=1.0, lo_open=True)
        if len(self.rewrite_target) != 2:
            raise ConfigError(f"search.rewrite_target={_fmt(self.rewrite_target)}: expected two numbers lo,hi "
                              f"(e.g. search.rewrite_target=1,2)")
        lo, hi = self.rewrite_target
        if lo < 0 or lo > hi:
            raise ConfigError(f"search.rewrite_target={_fmt(self.rewrite_target)}: need 0 <= lo <= hi (e.g. 1,2)")
        if not self.study.strip():
            raise ConfigError("search.study= is empty: name the study (re-using a name continues that search)")


@dataclass
class PrepareConfig:
    """Corpus preparation (jobs/prepare_data.py): the corpus tokenized and wrapped once, on Ray Data, into a
    sharded token store that training reads as ``data.source=prepared:<out>``."""

    workers: int = num(2, 1, help="Ray Data tokenizer actors (and at most as many shard-writing tasks)")
    cpus_per_worker: float = num(1.0, 0.0, lo_open=True, help="logical CPUs per tokenizer actor (also the "
                                                              "tokenizer's threads)")
    shard_blocks: int = num(0, 0, help="L-token blocks per shard; 0 = about 64 MiB per shard")


@dataclass
class ServiceConfig:
    """Where and how a job executes and where it is tracked (never part of a checkpoint's config)."""

    workers: int = num(1, 1, help="Ray Train workers (DDP ranks)")
    gpus_per_worker: float = num(0.0, 0.0, help="GPUs per Ray Train worker; > 0 selects NCCL, else Gloo on CPU")
    cpus_per_worker: float = num(1.0, 0.0, lo_open=True, help="logical CPUs per Ray Train worker")
    threads_per_worker: int = num(0, 0, help="torch threads per Ray Train worker; 0 = cpus_per_worker rounded")
    max_failures: int = num(2, -1, help="Ray FailureConfig: worker-group restarts (-1 = unlimited)")
    storage: str = text("", "checkpoint root: '' = <out> | a (shared) directory | s3://bucket/prefix; "
                            "a run lives under <storage>/<name>")
    storage_endpoint: str = text("", "S3-compatible endpoint URL (MinIO, moto); '' = AWS_ENDPOINT_URL or AWS")
    ray_address: str = text("", "Ray cluster to join: '' = RAY_ADDRESS if set, else a private local Ray on "
                                "127.0.0.1 for this job")
    ray_cpus: int = num(0, 0, help="logical CPUs of a private local Ray; 0 = os.cpu_count()")
    device: str = text("cpu", "torch device of in-process work (cpu | cuda | cuda:N)")
    mlflow: Literal["auto", "on", "off"] = choice(
        "auto", "MLflow tracking: on | off | auto = on for finetune and search, and for sample/evaluate "
                "when a store exists (service.tracking_uri, $MLFLOW_TRACKING_URI or ./mlflow.db)")
    tracking_uri: str = text("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    system_metrics: bool = flag(True, "MLflow system metrics (CPU, memory, GPU) from rank 0")


@dataclass
class ReportConfig:
    """The comparison report of a grid (``dashboards/report.py``): which grid, which cells' Fig 2 panels,
    how our step budgets meet the paper's."""

    grid: str = text("", "the grid to report: its MLflow parent run id | an experiment name (its latest grid "
                         "run) | a grid name (tag dsl.grid.name)")
    fig2: str = text("smallest", "cells whose Fig 2 panels the page shows: smallest (every row at the grid's "
                                 "smallest T) | all | none | a list of T, e.g. 128,1024")
    match: Literal["fraction", "steps"] = choice(
        "fraction", "which paper budget T' a cell meets: fraction = the same T/L (T' = T·1024/L; at L=1024 the "
                    "same T) | steps = the same T")
    log_artifacts: bool = flag(True, "log the page and its tables as artifacts of the grid's parent run")

    def validate(self) -> None:
        if self.fig2 not in ("smallest", "all", "none"):
            parts = [p.strip() for p in self.fig2.split(",") if p.strip()]
            if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ConfigError(f"report.fig2={self.fig2}: expected smallest, all, none or step budgets "
                                  f"T,T,... (e.g. 128,1024)")


@dataclass
class TableConfig:
    """The Table 1 grid (``jobs/grid.py``): which rows and step budgets, how each cell's samples are split
    over Ray workers. What a row samples with and how cells are scored are the ``sampling`` and ``eval`` keys."""

    spec: str = text("table1", "rows and columns: a named spec (dsl/config/presets/grid/<name>.toml: table1, "
                               "paper-table1, topics) | a spec TOML file")
    models: str = text("", "the checkpoints the spec's rows name by role: role=<run dir|checkpoint dir|s3://...|"
                           "oracle:*>,... (e.g. mdlm=runs/mdlm-ft,dsl=runs/dsl-ft)")
    steps: tuple[int, ...] = values((), "step budgets T (the columns); '' = the spec's")
    name: str = text("", "the grid's name, its resume key (MLflow tag dsl.grid.name): re-running with the same "
                         "name skips finished cells; '' = derived from the spec, the models and the settings")
    workers: int = num(0, 0, help="sampling tasks each cell is split into, by sample index (a cell's samples do "
                                  "not depend on it); 0 = one per CPU (GPU) of the Ray cluster")
    gpus_per_worker: float = num(-1.0, -1.0, help="GPUs per sampling task; -1 = 1 when the Ray cluster has GPUs, "
                                                  "else 0")
    mauve_resamples: int = num(0, 0, help="bootstrap resamples of each cell's samples: MAUVE's sampling std "
                                          "(source-stats features only; 0 = off)")

    def validate(self) -> None:
        if any(t <= 0 or t > MAX_BUDGET for t in self.steps):
            raise ConfigError(f"table.steps={','.join(map(str, self.steps))}: every T must be in [1, {MAX_BUDGET}]")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"table.steps={','.join(map(str, self.steps))} repeats a budget")


@dataclass
class ReproduceConfig:
    """The small-scale Table 1 (``jobs/reproduce.py``): pretrain an MDLM, fine-tune it two ways with equal
    budgets, decode both with Table 1's rows at T = L/8, L/4, L/2, L (the paper's 128…1024 at L = 1024).
    Model, channel, data and batch keys are the training sections' own; samples per cell, seeds and
    scoring are the grid's (``sampling.num_samples``, ``eval.*``, ``table.mauve_resamples``)."""

    pretrain_steps: int = num(1500, 0, help="MDLM pretraining steps from scratch; 0 = no pretraining: init= is "
                                            "the pretrained MDLM (Sec 6.1: hf:kuleshov-group/mdlm-owt)")
    pretrain_lr: float = num(1e-3, 0.0, lo_open=True, help="pretraining learning rate")
    finetune_steps: int = num(500, 1, help="steps of EACH fine-tune from the pretrained checkpoint (continued "
                                           "MDLM and DSL: equal budgets)")
    finetune_lr: float = num(3e-4, 0.0, lo_open=True, help="fine-tuning learning rate of both fine-tunes "
                                                           "(App C.1: MDLM's 3e-4, no warm-up)")
    eta_cap: str = text("paper-rewrites", "η_cap(T) of the ReMDM-loop row: paper-rewrites = the paper's "
                                          "rewrites per token at the same T/L (eq. 24's table rescaled to L) | "
                                          "sec6.1 | eq24 | a table file/URI")
