"""jobs/prepare_data.py on Ray Data (the real two-node local cluster): 1, 2 and 3 workers write
byte-identical stores equal to build_data's blocks; S3 output through `ray job submit` with resume and
the manifest in MLflow; jobs/finetune.py trains from a store with the raw corpus' exact losses; and
bad stores stop a fine-tune with one line before any step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prepared import L, raw_cfg, write_corpus

from dsl.checkpoint import load_checkpoint
from dsl.data import build_data
from dsl.data.prepared.layout import MANIFEST
from dsl.data.prepared.preparation import InProcess, Preparation

REPO = Path(__file__).resolve().parents[1]
PREP = ["data.tokenizer=char", f"data.length={L}", "data.valid_fraction=0.25", "prepare.shard_blocks=7"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def run_job(script: str, args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_of(out: subprocess.CompletedProcess) -> dict:
    if out.returncode != 0:
        pytest.fail(f"job failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.integration
@pytest.mark.slow
def test_two_and_three_workers_write_the_single_process_store_byte_for_byte(ray_env, corpus: Path, tmp_path: Path) -> None:
    stores = {}
    for n in (2, 3):  # 3 does not divide the documents evenly
        out = run_job("jobs/prepare_data.py", [f"data.source={corpus}", *PREP, f"prepare.workers={n}",
                                               f"out={tmp_path / f'w{n}'}", "service.mlflow=off"], ray_env)
        summary = summary_of(out)
        assert summary["documents"] == 105 and summary["tokens_per_s"] > 0
        assert f"with {n} Ray worker(s):" in out.stdout and "documents/s" in out.stdout and "tokens/s" in out.stdout
        stores[n] = files_of(tmp_path / f"w{n}")
    assert stores[2] == stores[3]
    assert sum(k.endswith(".bin") for k in stores[2]) > 4 and not any(k.startswith("_work") for k in stores[2])

    cfg = raw_cfg(corpus)  # the same steps in one process, and the single-process wrapping of build_data
    Preparation(cfg.data, L, str(tmp_path / "ref"), shard_blocks=7).run(InProcess)
    assert files_of(tmp_path / "ref") == stores[2]
    manifest = json.loads(stores[2][MANIFEST])
    ref = build_data(cfg)
    for split in ("train", "valid"):
        blocks = np.concatenate([np.frombuffer(stores[2][s["file"]], dtype="<u2").reshape(-1, L)
                                 for s in manifest["splits"][split]["shards"]])
        assert np.array_equal(blocks, ref.store.arrays[split][0])


@pytest.mark.integration
@pytest.mark.slow
def test_s3_store_via_ray_job_submit_resumes_and_is_recorded_in_mlflow(ray_cluster, ray_env, s3_server, s3_bucket,
                                                                       mlflow_server, corpus: Path) -> None:
    import mlflow

    uri = f"{s3_bucket}/prepared/docs"
    args = [f"data.source={corpus}", *PREP, "prepare.workers=2", f"out={uri}",
            f"service.tracking_uri={mlflow_server.tracking_uri}", "experiment=prepare-test"]
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
           "--working-dir", str(REPO), "--", "python", "jobs/prepare_data.py", *args]
    first = summary_of(subprocess.run(cmd, env=ray_env, capture_output=True, text=True, timeout=400, cwd=REPO))
    assert first["reused_shards"] == 0
    client = s3_server.client()
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="prepared/docs/")["Contents"]}
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"prepared/docs/{MANIFEST}")["Body"].read())
    shard_keys = [f"prepared/docs/{s['file']}" for sp in manifest["splits"].values() for s in sp["shards"]]
    assert set(shard_keys) <= keys and not any("/_work/" in k for k in keys)

    # an interrupted copy: no manifest, one shard gone; the re-run rewrites only that shard
    client.delete_object(Bucket=bucket, Key=f"prepared/docs/{MANIFEST}")
    client.delete_object(Bucket=bucket, Key=shard_keys[2])
    second = summary_of(run_job("jobs/prepare_data.py", args, ray_env))
    assert second["reused_shards"] == len(shard_keys) - 1
    again = json.loads(client.get_object(Bucket=bucket, Key=f"prepared/docs/{MANIFEST}")["Body"].read())
    assert again["splits"] == manifest["splits"]

    client = mlflow.MlflowClient(mlflow_server.tracking_uri)  # never the process-wide tracking URI
    (exp,) = [e for e in client.search_experiments() if e.name == "prepare-test"]
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`dsl.kind` = 'prepare_data'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert run.data.tags["dsl.prepared_store"] == uri and run.data.metrics["reused_shards"] == len(shard_keys) - 1
    assert run.data.metrics["tokens_per_s"] > 0 and run.data.params["prepare.workers"] == "2"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="manifest.json",
                                                tracking_uri=mlflow_server.tracking_uri)
    assert json.loads(Path(local).read_text())["splits"] == manifest["splits"]


def finetune_args(source: str, name: str, tmp_path: Path) -> list[str]:
    return ["model=toy", f"model.length={L}", "objective=dsl", f"data.source={source}", "data.tokenizer=char",
            "data.valid_fraction=0.25", "data.shuffle_window=5", "train.batch_size=4", "train.steps=3",
            "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0", "train.log_every=1",
            "train.lr=3e-3", "service.workers=1", f"name={name}", f"service.storage={tmp_path / 'runs'}",
            f"service.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.integration
@pytest.mark.slow
def test_finetune_from_a_prepared_store_has_the_raw_corpus_losses(ray_env, corpus: Path, tmp_path: Path) -> None:
    """jobs/finetune.py (Ray Train, one worker) on a store vs the core trainer on the raw corpus: same bits."""
    from mlflow.tracking import MlflowClient

    from dsl.config import RunConfig, load
    from dsl.train import Trainer

    cfg = raw_cfg(corpus)
    Preparation(cfg.data, L, str(tmp_path / "store"), shard_blocks=7).run(InProcess)
    out = run_job("jobs/finetune.py", finetune_args(f"prepared:{tmp_path / 'store'}", "prep", tmp_path), ray_env)
    summary = summary_of(out)
    assert "every shard verified" in out.stderr
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(summary["mlflow_run_id"], "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]

    torch.set_num_threads(1)  # as the Ray worker (threads_per_worker = cpus_per_worker = 1)
    raw_args = [a for a in finetune_args(str(corpus), "raw", tmp_path) if not a.startswith("service.")]
    raw = Trainer(load(RunConfig, raw_args), storage=tmp_path / "raw")
    expected = [raw.step()["loss"] for _ in range(3)]
    assert len(losses) == 3 and losses == expected
    weights = load_checkpoint(summary["checkpoint"]).model_state
    for k, v in raw.raw_model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("damage", ["missing", "corrupt", "length"])
def test_finetune_stops_on_a_bad_store_with_one_line_before_any_step(corpus: Path, tmp_path: Path, damage: str,
                                                                     capsys, monkeypatch) -> None:
    """jobs/finetune.py's own entry (dsl.cli.main, in this process: the store is checked before Ray starts)."""
    from dsl.cli import load_job, main

    cfg = raw_cfg(corpus)
    store = tmp_path / "store"
    manifest = Preparation(cfg.data, L, str(store), shard_blocks=7).run(InProcess)
    shard = store / manifest["splits"]["train"]["shards"][-1]["file"]  # the last shard: read late in an epoch
    args = finetune_args(f"prepared:{store}", "bad", tmp_path) + ["service.mlflow=off"]
    if damage == "missing":
        shard.unlink()
    elif damage == "corrupt":
        data = shard.read_bytes()
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        args[1] = "model.length=32"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(load_job("jobs/finetune.py"), args)
    out = capsys.readouterr()
    assert rc == 2, out.err[-2000:]
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    expected = {"missing": f"{shard}: listed in the manifest but missing", "corrupt": f"{shard}: sha256 mismatch",
                "length": "blocks of L=16 tokens, the run uses model.length=32"}[damage]
    assert expected in last
    assert "step 1/" not in out.out and not (tmp_path / "runs" / "bad").exists()
