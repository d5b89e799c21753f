"""Every entry point against a corpus of bad inputs: one ``error:`` line, exit 2, nothing written.

Each case runs the job in-process through :func:`dsl.cli.main` (the code path of ``python <script>``)
in a fresh working directory holding the inputs; a traceback would surface here as an exception.
The working directory's files are hashed before and after: a refused run creates, changes and
deletes nothing (no output, no temporary file, no MLflow database).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dsl.cli import load_job, main

SCRIPTS = ("jobs/finetune.py", "jobs/sample.py", "jobs/evaluate.py", "tune/eta_cap_search.py",
           "dashboards/report.py", "jobs/prepare_data.py", "jobs/grid.py", "jobs/reproduce.py")
NOT_UTF8 = b"fine words \xff\xfe broken bytes\n"


def _tiny_run(root: Path, *extra: str) -> None:
    import torch

    from dsl.config import RunConfig, load
    from dsl.train import Trainer

    torch.set_num_threads(1)
    cfg = load(RunConfig, ["model=toy", "model.length=16", "data.source=hmm", "objective=dsl", "train.batch_size=2",
                           "train.steps=1", "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0",
                           "train.ema=0", *extra])
    Trainer(cfg, storage=root).fit()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The files the bad inputs point at (read-only for the cases)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "a_dir").mkdir()
    (d / "a_file.txt").write_text("a file, not a directory\n")
    (d / "bad.txt").write_bytes(b"first line\n" + NOT_UTF8)
    (d / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + NOT_UTF8.strip() + b'"}\n')
    (d / "good.jsonl").write_text("".join(json.dumps({"text": f"the quick fox {i}"}) + "\n" for i in range(8)))
    (d / "empty.jsonl").write_text("")
    (d / "no_field.jsonl").write_text('{"body": "x"}\n')
    (d / "not_json.jsonl").write_text("{oops\n")
    (d / "table.csv").write_text("a,b\n")
    (d / "eta_not_json.json").write_text("{not json")
    (d / "eta_wrong.json").write_text(json.dumps({"table": {"x": "y"}}))
    (d / "eta_list.json").write_text(json.dumps([1, 2]))
    _tiny_run(d / "run")
    step = d / "run" / "step-1"
    for name, change in (("files_list", lambda m: m.update(files=list(m["files"]))),
                         ("files_str", lambda m: m.update(files="model.safetensors")),
                         ("no_format", lambda m: m.pop("format")),
                         ("step_text", lambda m: m.update(step="one")),
                         ("bad_sha", lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64)),
                         ("config_list", lambda m: m.update(config=[1])),
                         ("config_type", lambda m: m["config"]["model"].update(hidden="big"))):
        copy = d / f"ckpt_{name}"
        shutil.copytree(step, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    (d / "ckpt_manifest_array").mkdir()
    (d / "ckpt_manifest_array" / "manifest.json").write_text("[]")
    return d


# (id, script, argv, a fragment the error line must contain). ``{in}`` = the inputs dir, ``{cwd}`` = the
# working directory of the case (empty but for ``existing``).
CASES = [
    # ---------------------------------------------------------------- jobs/sample.py
    ("sample-out-is-dir", "jobs/sample.py", ["checkpoint=oracle:hmm", "out={in}/a_dir"], "out="),
    ("sample-out-is-dir-tracked", "jobs/sample.py", ["checkpoint=oracle:hmm", "out={in}/a_dir", "service.mlflow=on"],
     "out="),   # refused before the MLflow run exists: no ./mlflow.db appears
    ("sample-out-missing-parent", "jobs/sample.py", ["checkpoint=oracle:hmm", "out={cwd}/no/such/s.jsonl"], "out="),
    ("sample-no-checkpoint", "jobs/sample.py", ["out=s.jsonl"], "checkpoint="),
    ("sample-checkpoint-missing", "jobs/sample.py", ["checkpoint={in}/nothing", "out=s.jsonl"], "nothing"),
    ("sample-checkpoint-a-file", "jobs/sample.py", ["checkpoint={in}/a_file.txt", "out=s.jsonl"], "a_file.txt"),
    ("sample-oracle-unknown", "jobs/sample.py", ["checkpoint=oracle:zzz", "out=s.jsonl"], "oracle:zzz"),
    ("sample-manifest-files-list", "jobs/sample.py", ["checkpoint={in}/ckpt_files_list", "out=s.jsonl"], "files"),
    ("sample-manifest-files-str", "jobs/sample.py", ["checkpoint={in}/ckpt_files_str", "out=s.jsonl"], "files"),
    ("sample-manifest-no-format", "jobs/sample.py", ["checkpoint={in}/ckpt_no_format", "out=s.jsonl"], "format"),
    ("sample-manifest-step-text", "jobs/sample.py", ["checkpoint={in}/ckpt_step_text", "out=s.jsonl"], "step"),
    ("sample-manifest-bad-sha", "jobs/sample.py", ["checkpoint={in}/ckpt_bad_sha", "out=s.jsonl"], "sha256"),
    ("sample-manifest-config-list", "jobs/sample.py", ["checkpoint={in}/ckpt_config_list", "out=s.jsonl"], "config"),
    ("sample-manifest-config-type", "jobs/sample.py", ["checkpoint={in}/ckpt_config_type", "out=s.jsonl"],
     "model.hidden"),
    ("sample-manifest-array", "jobs/sample.py", ["checkpoint={in}/ckpt_manifest_array", "out=s.jsonl"],
     "manifest.json"),
    ("sample-length-huge", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.length=1000000000", "out=s.jsonl"],
     "sampling.length"),
    ("sample-length-huge-run", "jobs/sample.py", ["checkpoint={in}/run", "sampling.length=1000000000",
                                                  "out=s.jsonl"], "sampling.length"),
    ("sample-length-above-model", "jobs/sample.py", ["checkpoint={in}/run", "sampling.length=17", "out=s.jsonl"],
     "sampling.length"),
    ("sample-batch-huge", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.batch_size=100000000",
                                             "sampling.num_samples=100000000", "out=s.jsonl"], "sampling."),
    ("sample-eta-2", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.eta=2", "out=s.jsonl"], "sampling.eta"),
    ("sample-gamma-vis-huge", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.gamma_vis=1e9", "out=s.jsonl"],
     "sampling.gamma_vis"),
    ("sample-sde-gamma-end-huge", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.sde_gamma_end=1e12",
                                                     "out=s.jsonl"], "sampling.sde_gamma_end"),
    ("sample-eps-half", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.eps=0.5", "out=s.jsonl"],
     "sampling.eps"),
    ("sample-t-on-1", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.t_on=1", "out=s.jsonl"], "sampling.t_on"),
    ("sample-top-p-0", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.top_p=0", "out=s.jsonl"],
     "sampling.top_p"),
    ("sample-steps-huge", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.steps=1000000000", "out=s.jsonl"],
     "sampling.steps"),
    ("sample-t-window-inverted", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.t_off=0.6", "out=s.jsonl"],
     "t_off"),
    ("sample-sampler-unknown", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampler=ddim", "out=s.jsonl"],
     "sampling.sampler"),
    ("sample-eta-table-missing", "jobs/sample.py", ["checkpoint=oracle:hmm", "eta_cap_table={in}/none.json",
                                                    "out=s.jsonl"], "eta_cap_table"),
    ("sample-eta-table-not-json", "jobs/sample.py", ["checkpoint=oracle:hmm", "eta_cap_table={in}/eta_not_json.json",
                                                     "out=s.jsonl"], "eta_cap_table"),
    ("sample-eta-table-wrong", "jobs/sample.py", ["checkpoint=oracle:hmm", "eta_cap_table={in}/eta_wrong.json",
                                                  "out=s.jsonl"], "eta_cap_table"),
    ("sample-eta-table-list", "jobs/sample.py", ["checkpoint=oracle:hmm", "eta_cap_table={in}/eta_list.json",
                                                 "out=s.jsonl"], "eta_cap_table"),
    ("sample-toy-not-png", "jobs/sample.py", ["recover", "out=fig.jsonl"], "out="),
    ("sample-trajectory-dir", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.trajectory={in}/a_dir",
                                                 "out=s.jsonl"], "sampling.trajectory"),
    ("sample-unknown-key", "jobs/sample.py", ["checkpoint=oracle:hmm", "bogus=1", "out=s.jsonl"], "bogus"),
    ("sample-key-of-another-job", "jobs/sample.py", ["checkpoint=oracle:hmm", "train.steps=3", "out=s.jsonl"],
     "train.steps"),
    ("sample-bad-number", "jobs/sample.py", ["checkpoint=oracle:hmm", "sampling.steps=ten", "out=s.jsonl"],
     "sampling.steps"),
    # ---------------------------------------------------------------- jobs/evaluate.py
    ("evaluate-no-samples", "jobs/evaluate.py", ["reference={in}/good.jsonl"], "eval.samples"),
    ("evaluate-samples-missing", "jobs/evaluate.py", ["eval.samples={in}/none.jsonl", "reference={in}/good.jsonl"],
     "none.jsonl"),
    ("evaluate-samples-not-utf8", "jobs/evaluate.py", ["eval.samples={in}/bad.txt", "reference={in}/good.jsonl"],
     "bad.txt"),
    ("evaluate-samples-jsonl-not-utf8", "jobs/evaluate.py", ["eval.samples={in}/bad.jsonl",
                                                            "reference={in}/good.jsonl"], "bad.jsonl"),
    ("evaluate-reference-not-utf8", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/bad.txt"],
     "bad.txt"),
    ("evaluate-reference-jsonl-not-utf8", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl",
                                                              "reference={in}/bad.jsonl"], "bad.jsonl"),
    ("evaluate-reference-missing", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/none.txt"],
     "none.txt"),
    ("evaluate-samples-not-json", "jobs/evaluate.py", ["eval.samples={in}/not_json.jsonl",
                                                      "reference={in}/good.jsonl"], "not_json.jsonl"),
    ("evaluate-samples-empty", "jobs/evaluate.py", ["eval.samples={in}/empty.jsonl", "reference={in}/good.jsonl"],
     "empty.jsonl"),
    ("evaluate-samples-csv", "jobs/evaluate.py", ["eval.samples={in}/table.csv", "reference={in}/good.jsonl"],
     "table.csv"),
    ("evaluate-samples-a-dir", "jobs/evaluate.py", ["eval.samples={in}/a_dir", "reference={in}/good.jsonl"],
     "a_dir"),
    ("evaluate-num-buckets-word", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/good.jsonl",
                                                      "eval.num_buckets=many"], "eval.num_buckets"),
    ("evaluate-judge-unknown-oracle", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl",
                                                          "reference={in}/good.jsonl", "eval.judge=oracle:zzz"],
     "eval.judge"),
    ("evaluate-featurizer-missing", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/good.jsonl",
                                                        "featurizer={in}/no_model"], "no_model"),
    ("evaluate-out-is-file", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/good.jsonl",
                                                 "out={in}/a_file.txt"], "out="),
    ("evaluate-out-is-file-tracked", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/good.jsonl",
                                                         "out={in}/a_file.txt", "service.mlflow=on"], "out="),
    ("evaluate-cache-is-file", "jobs/evaluate.py", ["eval.samples={in}/good.jsonl", "reference={in}/good.jsonl",
                                                   "eval.feature_cache={in}/a_file.txt"], "eval.feature_cache"),
    ("evaluate-calibration-missing", "jobs/evaluate.py", ["calibration", "checkpoint={in}/nothing"], "nothing"),
    ("evaluate-calibration-files-list", "jobs/evaluate.py", ["calibration", "checkpoint={in}/ckpt_files_list"],
     "files"),
    ("evaluate-likelihood-heldout-not-utf8", "jobs/evaluate.py", ["likelihood", "checkpoint={in}/run",
                                                                 "eval.heldout={in}/bad.txt"], "bad.txt"),
    ("evaluate-likelihood-heldout-missing", "jobs/evaluate.py", ["likelihood", "checkpoint={in}/run",
                                                                "eval.heldout={in}/none.txt"], "none.txt"),
    ("evaluate-unknown-mode", "jobs/evaluate.py", ["mauve", "eval.samples={in}/good.jsonl"], "mauve"),
    # ---------------------------------------------------------------- tune/eta_cap_search.py
    ("search-out-is-file", "tune/eta_cap_search.py", ["out={in}/a_file.txt"], "out="),
    ("search-out-dir-key-is-file", "tune/eta_cap_search.py", ["out_dir={in}/a_file.txt"], "out="),
    ("search-budgets-zero", "tune/eta_cap_search.py", ["search.budgets=0"], "search.budgets"),
    ("search-eta-range-inverted", "tune/eta_cap_search.py", ["search.eta_cap_range=0.5,0.1"], "search.eta_cap_range"),
    ("search-checkpoint-missing", "tune/eta_cap_search.py", ["checkpoint={in}/nothing"], "nothing"),
    ("search-checkpoint-files-list", "tune/eta_cap_search.py", ["checkpoint={in}/ckpt_files_list"], "files"),
    ("search-reference-missing", "tune/eta_cap_search.py", ["reference={in}/none.txt"], "none.txt"),
    ("search-reference-not-utf8", "tune/eta_cap_search.py", ["reference={in}/bad.txt"], "bad.txt"),
    ("search-study-db-scheme", "tune/eta_cap_search.py", ["search.study_db=mongodb://x/y"], "search.study_db"),
    ("search-length-huge", "tune/eta_cap_search.py", ["sampling.length=1000000000"], "sampling.length"),
    ("search-eta-2-fixed", "tune/eta_cap_search.py", ["sampling.alpha_on=1.5"], "sampling.alpha_on"),
    ("search-min-samples", "tune/eta_cap_search.py", ["search.min_samples=64"], "search.min_samples"),
    ("search-featurizer-missing", "tune/eta_cap_search.py", ["featurizer={in}/no_model"], "no_model"),
    # ---------------------------------------------------------------- jobs/grid.py, jobs/reproduce.py
    ("grid-spec-unknown", "jobs/grid.py", ["table.spec=no-such-spec"], "table.spec"),
    ("grid-spec-missing", "jobs/grid.py", ["table.spec={in}/missing.toml"], "table.spec"),
    ("grid-spec-not-toml", "jobs/grid.py", ["table.spec={in}/eta_not_json.json"], "table.spec"),
    ("grid-models-unnamed", "jobs/grid.py", ["table.spec=table1"], "table.models=mdlm="),
    ("grid-models-no-uri", "jobs/grid.py", ["table.spec=table1", "table.models=mdlm"], "table.models"),
    ("grid-model-missing", "jobs/grid.py", ["table.spec=table1", "table.models=mdlm={in}/nothing,dsl={in}/nothing"],
     "nothing"),
    ("grid-steps-zero", "jobs/grid.py", ["table.spec=table1", "table.models=mdlm=oracle:hmm,dsl=oracle:hmm",
                                         "table.steps=0"], "table.steps"),
    ("grid-paper-fixed-setting", "jobs/grid.py", ["table.spec=paper-table1", "eval.max_length=128",
                                                  "table.models=mdlm=oracle:hmm,dsl=oracle:hmm"], "eval.max_length"),
    ("reproduce-preset-unknown", "jobs/reproduce.py", ["preset=nope", "out={cwd}/x"], "smoke"),
    ("reproduce-source-missing", "jobs/reproduce.py", ["preset=micro", "out={cwd}/x", "data.source={in}/none.txt"],
     "data.source="),
    ("reproduce-out-is-file", "jobs/reproduce.py", ["preset=micro", "out={in}/a_file.txt"], "out="),
    ("reproduce-mode-unknown", "jobs/reproduce.py", ["rerun", "preset=micro", "out={cwd}/x"], "rerun"),
    # ---------------------------------------------------------------- dashboards/report.py (never creates a store)
    ("report-no-grid", "dashboards/report.py", ["service.tracking_uri=sqlite:///{cwd}/m.db"], "report.grid"),
    ("report-no-store", "dashboards/report.py", ["grid=g"], "service.tracking_uri"),
    ("report-sqlite-missing", "dashboards/report.py", ["grid=g", "service.tracking_uri=sqlite:///{cwd}/none.db"],
     "none.db"),
    ("report-server-down", "dashboards/report.py", ["grid=g", "service.tracking_uri=http://127.0.0.1:9"],
     "127.0.0.1:9"),
    ("report-out-is-file", "dashboards/report.py", ["grid=g", "out={in}/a_file.txt"], "out="),
    ("report-fig2-words", "dashboards/report.py", ["grid=g", "report.fig2=sometimes"], "report.fig2"),
    ("report-match-unknown", "dashboards/report.py", ["grid=g", "report.match=nearest"], "report.match"),
    ("report-key-of-another-job", "dashboards/report.py", ["grid=g", "sampling.steps=3"], "sampling.steps"),
    ("report-mode-unknown", "dashboards/report.py", ["export", "grid=g"], "export"),
    ("import-paper-server-down", "dashboards/report.py", ["import-paper", "service.tracking_uri=http://127.0.0.1:9"],
     "127.0.0.1:9"),
    # ---------------------------------------------------------------- jobs/prepare_data.py (refused before Ray)
    ("prepare-no-out", "jobs/prepare_data.py", ["data.source={in}/good.jsonl", "data.length=16"], "out="),
    ("prepare-length-0", "jobs/prepare_data.py", ["data.source={in}/good.jsonl", "out={cwd}/store"], "data.length"),
    ("prepare-source-missing", "jobs/prepare_data.py", ["data.source={in}/none.jsonl", "data.length=16",
                                                        "out={cwd}/store"], "data.source"),
    ("prepare-source-synthetic", "jobs/prepare_data.py", ["data.source=hmm", "data.length=16", "out={cwd}/store"],
     "data.source"),
    ("prepare-source-csv", "jobs/prepare_data.py", ["data.source={in}/table.csv", "data.length=16",
                                                    "out={cwd}/store"], "data.source"),
    ("prepare-out-is-file", "jobs/prepare_data.py", ["data.source={in}/good.jsonl", "data.length=16",
                                                     "out={in}/a_file.txt"], "out="),
    ("prepare-shard-blocks", "jobs/prepare_data.py", ["data.source={in}/good.jsonl", "data.length=16",
                                                      "out={cwd}/store", "prepare.shard_blocks=-1"],
     "prepare.shard_blocks"),
    # ---------------------------------------------------------------- jobs/finetune.py (refused before Ray)
    ("finetune-model-length-huge", "jobs/finetune.py", ["train", "model=toy", "model.length=1000000000"],
     "model.length"),
    ("finetune-batch-huge", "jobs/finetune.py", ["train", "model=toy", "train.batch_size=1000000000"],
     "train.batch_size"),
    ("finetune-data-missing", "jobs/finetune.py", ["train", "model=toy", "data.source={in}/none.jsonl"],
     "data.source"),
    ("finetune-data-csv", "jobs/finetune.py", ["train", "model=toy", "data.source={in}/table.csv"], "data.source"),
    ("finetune-data-hf-unknown", "jobs/finetune.py", ["train", "model=toy", "data.source=hf:nope"], "data.source"),
    ("finetune-init-missing", "jobs/finetune.py", ["train", "model=toy", "init={in}/nothing"], "init="),
    ("finetune-init-files-list", "jobs/finetune.py", ["train", "model=toy", "init={in}/ckpt_files_list"], "files"),
    ("finetune-storage-scheme", "jobs/finetune.py", ["train", "model=toy", "service.storage=gs://b/x"],
     "service.storage"),
    ("finetune-storage-is-file", "jobs/finetune.py", ["train", "model=toy", "service.storage={in}/a_file.txt"],
     "service.storage"),
    ("finetune-out-is-file", "jobs/finetune.py", ["train", "model=toy", "out={in}/a_file.txt"], "out="),
    ("finetune-name-slash", "jobs/finetune.py", ["train", "model=toy", "name=a/b"], "name="),
    ("finetune-heads", "jobs/finetune.py", ["train", "model.hidden=30", "model.heads=4"], "model.hidden"),
    ("finetune-batch-workers", "jobs/finetune.py", ["train", "model=toy", "train.batch_size=9", "service.workers=2"],
     "train.batch_size"),
    ("finetune-preset-unknown", "jobs/finetune.py", ["preset=huge"], "huge"),
    ("finetune-model-preset-unknown", "jobs/finetune.py", ["train", "model=giant"], "giant"),
    ("finetune-objective-arch", "jobs/finetune.py", ["train", "model=toy", "objective=ar"], "objective"),
    ("finetune-rerun-other-hidden", "jobs/finetune.py", ["train", "name=run", "out={in}", "model=toy",
                                                         "model.length=16", "model.hidden=64", "model.heads=4",
                                                         "data.source=hmm", "train.ema=0"], "model.hidden"),
    ("finetune-rerun-other-objective", "jobs/finetune.py", ["train", "name=run", "out={in}", "model=toy",
                                                            "model.length=16", "data.source=hmm", "objective=mdlm",
                                                            "train.ema=0"], "objective"),
]


def _tree(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = str(p)
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DSL_RUNS_ROOT"):
        monkeypatch.delenv(var, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_the_corpus_covers_every_entry_point():
    assert {script for _, script, _, _ in CASES} == set(SCRIPTS)
    assert len({case for case, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("case, script, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, script, argv, needle, inputs, clean_env, capfd):
    args = [a.replace("{in}", str(inputs)).replace("{cwd}", str(clean_env)) for a in argv]
    before = _tree(inputs, clean_env)
    rc = main(load_job(script), args)
    out, err = capfd.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, (rc, err[-2000:])
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert needle.replace("{in}", str(inputs)) in lines[-1], lines[-1]
    assert _tree(inputs, clean_env) == before
