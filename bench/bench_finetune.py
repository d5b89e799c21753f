"""Fine-tuning service on CPU: tokens/s with 1 vs 2 Ray Train workers (same global batch) and the time
from `ray job submit` to the first training step, on a local two-node Ray cluster started here.

    python bench/bench_finetune.py [steps=30] [model=tiny-cpu] [batch=16] [length=64]

Prints one table. Every number comes from this run; the cluster is stopped at the end.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> dict[str, str]:
    opts = {"steps": "30", "model": "tiny-cpu", "batch": "16", "length": "64"}
    for a in argv:
        k, _, v = a.partition("=")
        if k not in opts or not v:
            print(f"error: unknown or empty option {a!r}; accepted: {', '.join(f'{k}=' for k in opts)}",
                  file=sys.stderr)
            sys.exit(2)
        opts[k] = v
    return opts


def one_job(cluster, workers: int, opts: dict, work: Path) -> dict:
    import mlflow

    from dsl.service.tracking import TAG_RUN_NAME

    name = f"bench-w{workers}-{int(time.time())}"
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    args = [f"model={opts['model']}", f"model.length={opts['length']}", f"train.batch_size={opts['batch']}",
            f"train.steps={opts['steps']}", "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0",
            "train.log_every=1", "data.source=hmm", f"service.workers={workers}", "service.cpus_per_worker=1",
            "service.threads_per_worker=1", "service.system_metrics=false", f"name={name}",
            f"service.storage={work / 'runs'}", f"service.tracking_uri={tracking}"]
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.dashboard_url,
           "--working-dir", str(REPO), "--", "python", "jobs/finetune.py", *args]
    env = {**os.environ, **cluster.env}
    t0 = time.monotonic()
    first = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if first is None and f"] step 1/{opts['steps']}" in line:
            first = time.monotonic() - t0
    rc = proc.wait()
    total = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"error: job with workers={workers} failed (exit {rc}):\n{''.join(tail)}")
    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("dsl")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_NAME}` = '{name}'")
    hist = sorted(client.get_metric_history(run.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    steady = [m.value for m in hist if m.step > 2] or [m.value for m in hist]
    return {"workers": workers, "tokens_per_s": statistics.median(steady), "first_step_s": first, "total_s": total}


def main(argv: list[str]) -> int:
    import torch
    from tqdm import tqdm

    from dsl.service.local_cluster import start_cluster

    torch.set_num_threads(1)
    opts = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    temp_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    print(f"starting a local Ray cluster (head 2 CPUs + 1 worker node 2 CPUs) under {temp_dir}", flush=True)
    cluster = start_cluster(temp_dir, head_cpus=2, workers=1, worker_cpus=2, object_store_mb=150)
    rows = []
    try:
        for workers in tqdm((1, 2), desc="jobs"):
            rows.append(one_job(cluster, workers, opts, work))
    finally:
        cluster.stop()
    base = rows[0]["tokens_per_s"]
    tokens_per_step = int(opts["batch"]) * int(opts["length"])
    print(f"\nmodel={opts['model']} L={opts['length']} global batch={opts['batch']} ({tokens_per_step} tokens/step), "
          f"{opts['steps']} steps, 1 torch thread per worker, shared 2-core machine")
    print(f"{'workers':>7} {'tokens/s':>10} {'vs 1 worker':>12} {'submit->step 1 (s)':>19} {'job total (s)':>14}")
    for r in rows:
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "n/a"
        print(f"{r['workers']:>7} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base:>12.2f} {first:>19} "
              f"{r['total_s']:>14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
