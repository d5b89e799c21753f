"""Run lineage in MLflow: a fine-tune, the samples drawn from its checkpoint and their evaluation are
joined by run ids; runs are named and tagged for what they are; params are the keys the job reads;
small artifacts are logged; a stopped job's run is KILLED (SIGTERM, SIGINT on a subprocess job against
the real tracking server), a failed one FAILED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from dsl.cli import load_job, logged_params, main, parse
from dsl.config import RunConfig, load, to_dict
from dsl.service import lineage
from dsl.service.tracking import REDACTED, ensure_training_run, scrub
from dsl.sources import build_source

REPO = Path(__file__).resolve().parents[1]
SAMPLE = load_job("jobs/sample.py")
EVALUATE = load_job("jobs/evaluate.py")
LENGTH = 12


def test_a_secret_is_a_word_of_the_key_not_a_substring():
    assert scrub("gpt2", key="data.tokenizer") == "gpt2"
    assert scrub("512", key="eval.max_tokens") == "512"
    for key in ("service.hf_token", "service.aws_secret_access_key", "db.password", "x.api_key", "auth-token"):
        assert scrub("s3cr3t-value", key=key) == REDACTED, key
    assert scrub("postgresql://u:pw@db/x", key="service.tracking_uri") == f"postgresql://{REDACTED}@db/x"


@pytest.mark.parametrize("args,present,absent", [
    (["checkpoint=oracle:hmm", "sampler=mdlm"], {"data.hmm_seed", "sampling.top_p"},
     {"data.cyclic_k", "data.topics_seed", "sampling.eta", "sampling.t_on", "sampling.eta_cap_table",
      "sampling.sde_path"}),
    (["checkpoint=runs/x", "sampler=dsl-budget"], {"sampling.eta_cap_table", "sampling.t_on"},
     {"data.hmm_seed", "data.cyclic_k", "sampling.eta"}),
    (["checkpoint=oracle:cyclic", "sampler=remdm-cap"], {"data.cyclic_k", "sampling.eta"},
     {"data.hmm_seed", "sampling.t_on"}),
])
def test_params_are_the_keys_the_job_reads(args, present, absent):
    _, cfg = parse(SAMPLE, args)
    params = logged_params(SAMPLE, cfg)
    assert present <= set(params), present - set(params)
    assert not absent & set(params), absent & set(params)
    assert "data.source" not in params and "data.tokenizer" not in params   # sample reads neither


def _toy_training_run(root: Path, name: str) -> str:
    """A checkpoint of a (randomly initialised) DSL run named ``name``, as the fine-tune writes it."""
    from dsl.checkpoint import save_checkpoint
    from dsl.models import build_model

    cfg = load(RunConfig, ["preset=embedded", "model=toy", f"model.length={LENGTH}", f"name={name}"])
    model = build_model(cfg, build_source("hmm", cfg.data, LENGTH).vocab_size)
    save_checkpoint(str(root / name), 0, config=to_dict(cfg), model_state=model.state_dict())
    return str(root / name)


def _runs(client, experiment: str) -> dict[str, mlflow.entities.Run]:
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags[lineage.KIND]: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_finetune_sample_evaluate_are_joined_by_run_id(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_id, _ = ensure_training_run("ft-toy", params={}, tracking_uri=uri, experiment="lineage")
    run_dir = _toy_training_run(tmp_path / "runs", "ft-toy")
    source = build_source("hmm", RunConfig().data, LENGTH)
    with open("reference.jsonl", "w") as fh:
        for row in source.sample(16, torch.Generator().manual_seed(1)):
            fh.write(json.dumps({"text": source.decode(row)}) + "\n")
    common = ["experiment=lineage", f"service.tracking_uri={uri}"]

    assert main(SAMPLE, [f"checkpoint={run_dir}", "sampler=remdm-loop", "sampling.steps=4",
                         "sampling.num_samples=8", "out=samples.jsonl", *common]) == 0
    settings = json.loads(Path("samples.jsonl").read_text().splitlines()[0])["settings"]
    # a random toy model emits word sequences the sparse HMM cannot: every sample is impossible
    assert main(EVALUATE, ["eval.samples=samples.jsonl", "reference=reference.jsonl", "featurizer=minilm",
                           "eval.judge=oracle:hmm", "eval.feature_cache=", "eval.mauve_seeds=25,26", *common]) == 0
    err = capsys.readouterr().err
    assert "8 of 8 samples (100%) are impossible under eval.judge=oracle:hmm" in err
    assert "GenPPL is undefined" in err and "no scorable tokens" not in err

    client = mlflow.MlflowClient(uri)
    runs = _runs(client, "lineage")
    sample, evaluate = runs["sample"], runs["evaluate"]
    # sample run: named, tagged, linked to the training run, and its id in the file it wrote
    assert sample.info.run_name == "sample ft-toy remdm-loop T=4" and sample.info.status == "FINISHED"
    t = sample.data.tags
    assert t[lineage.TRAINING_RUN] == train_id and lineage.PARENT_RUN not in t   # a row of its own in the UI
    assert (t[lineage.SAMPLER], t[lineage.STEPS], t[lineage.NUM_SAMPLES]) == ("remdm-loop", "4", "8")
    assert t[lineage.ETA_CAP_SOURCE] == "none" and t[lineage.CHECKPOINT] == run_dir
    assert settings[lineage.RECORD_RUN_ID] == sample.info.run_id
    assert settings[lineage.RECORD_RUN_NAME] == sample.info.run_name
    assert {a.path for a in client.list_artifacts(sample.info.run_id)} >= {
        lineage.SAMPLES_ARTIFACT, lineage.DIAGNOSTICS_ARTIFACT, lineage.FIG2_ARTIFACT}
    assert [m.step for m in client.get_metric_history(sample.info.run_id, lineage.DIAG_T)] == [0, 1, 2, 3]
    assert sample.data.metrics[lineage.NFE] > 0 and "sampling.eta" in sample.data.params
    assert not {k for k in sample.data.params if k.startswith("data.")}   # a real checkpoint: no source keys
    # evaluate run: its parent is the sample run (by id), and it inherits what the samples are
    assert evaluate.info.run_name == "evaluate MAUVE sample ft-toy remdm-loop T=4"
    e = evaluate.data.tags
    assert e[lineage.SAMPLE_RUN] == sample.info.run_id and lineage.PARENT_RUN not in e
    assert e[lineage.TRAINING_RUN] == train_id and e[lineage.MODE] == "samples"
    assert (e[lineage.SAMPLER], e[lineage.STEPS], e[lineage.NUM_SAMPLES]) == ("remdm-loop", "4", "8")
    assert evaluate.data.metrics[lineage.GENPPL_IMPOSSIBLE_SHARE] == 1.0
    assert lineage.GENPPL not in evaluate.data.metrics
    assert 0 < evaluate.data.metrics[lineage.MAUVE] <= 1 and lineage.MAUVE_STD in evaluate.data.metrics
    assert "evaluation.json" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}


def test_a_failed_job_is_marked_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.json").write_text("{not json")
    rc = main(SAMPLE, ["checkpoint=ckpt", "out=s.jsonl", "experiment=fail", f"service.tracking_uri={uri}"])
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1].startswith("error: ckpt")
    run = _runs(mlflow.MlflowClient(uri), "fail")["sample"]
    assert run.info.status == "FAILED"
    assert not (tmp_path / "s.jsonl").exists()


def _wait_for_running_run(client, experiment: str, proc: subprocess.Popen, timeout: float = 300):
    """The job's run once it is RUNNING with its params logged (the job is then inside its body)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].info.status == "RUNNING" and runs[0].data.params:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no RUNNING run in {experiment} after {timeout} s")


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_job_stopped_by_a_signal_is_marked_killed(mlflow_server, tmp_path, sig):
    experiment = f"stop-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **mlflow_server.env, "PYTHONPATH": str(REPO)}
    out = tmp_path / "s.jsonl"
    # sized to take minutes in many cheap steps (a small batch, every step a denoiser call: sampling.cache=false),
    # so it is stopped long before it could finish and the signal is handled between two short steps
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs/sample.py"), "checkpoint=oracle:hmm", "sampler=mdlm",
                             "sampling.steps=4000", "sampling.cache=false", "sampling.num_samples=4",
                             "sampling.length=16", f"out={out}", f"experiment={experiment}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = mlflow.MlflowClient(mlflow_server.tracking_uri)
        run = _wait_for_running_run(client, experiment, proc)
        time.sleep(1.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + int(sig), err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not out.exists()
