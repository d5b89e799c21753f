"""η_cap(T) search throughput on CPU: trials per hour with 1 vs 2 MAUVE workers. One run, one table.

    python bench/bench_search.py [--trials 6] [--samples 16] [--length 16] [--steps 16] [--ray-cpus 4] \
        [--concurrent 2] [--repeats 2]

Each configuration is the real search (``dsl.service.search.run_search``) on the exact HMM oracle with the
offline MiniLM featurizer, in a private local Ray instance, storage-free (in-memory study) and without
MLflow, ASHA off so every trial does the same work. "Trials per hour" counts only the Tune phase
(``trial_seconds`` in the summary): Ray start-up and the one-off reference featurisation are excluded and
shown separately. ``--ray-cpus`` sets Ray's *logical* CPUs; the physical cores stay what the machine has,
so on a 2-core box more workers only help if featurisation/k-means leave cores idle. Both settings run
the same number of concurrent trials (``--concurrent``), interleaved (1, 2, 1, 2, ...) so that warm caches
and the load of a shared machine do not favour one; the best of ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")   # each Ray worker: one thread (2 shared cores)


def run_once(workers: int, args: argparse.Namespace) -> dict:
    from dsl.cli import load_job, parse
    from dsl.service.search import run_search

    out = tempfile.mkdtemp(prefix="bench-search-")
    _, cfg = parse(load_job("tune/eta_cap_search.py"), [
        "checkpoint=oracle:hmm", f"sampling.length={args.length}", f"budgets={args.steps}", f"trials={args.trials}",
        f"sampling.num_samples={args.samples}", "search.asha=false", f"eval.references={max(args.samples, 32)}",
        "eval.mauve_seeds=25,26,27", f"eval.workers={workers}", "search.study_db=none", "service.mlflow=off",
        "progress=false", f"service.ray_cpus={args.ray_cpus}", f"search.max_concurrent={args.concurrent}",
        f"out={out}", "study=bench"])
    start = time.perf_counter()
    summary = run_search(cfg)
    total = time.perf_counter() - start
    return {"workers": workers, "trials": summary["trials_run"], "trial_s": summary["trial_seconds"],
            "total_s": total, "concurrent": summary["concurrent_trials"],
            "per_hour": 3600.0 * summary["trials_run"] / summary["trial_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ray-cpus", type=int, default=4)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runs = [run_once(w, args) for _ in range(args.repeats) for w in (1, 2)]
    rows = [max((r for r in runs if r["workers"] == w), key=lambda r: r["per_hour"]) for w in (1, 2)]
    base = rows[0]["per_hour"]
    print(f"\nη_cap search, CPU ({os.cpu_count()} cores, Ray logical CPUs {args.ray_cpus}): T={args.steps}, "
          f"L={args.length}, {args.samples} samples/trial, {args.trials} trials, ASHA off, best of {args.repeats}")
    print(f"{'MAUVE workers':>13} {'concurrent':>10} {'trial phase s':>13} {'total s':>8} {'trials/hour':>11} "
          f"{'vs 1 worker':>11}")
    for r in rows:
        print(f"{r['workers']:>13} {r['concurrent']:>10} {r['trial_s']:>13.1f} {r['total_s']:>8.1f} "
              f"{r['per_hour']:>11.0f} {r['per_hour'] / base:>10.2f}x")


if __name__ == "__main__":
    main()
