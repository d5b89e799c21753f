"""Training throughput and memory, MDLM vs DSL objective on the same DiT backbone (CPU).

    python bench/bench_train.py [--steps 6] [--small-steps 2] [--threads 1] [--skip-small]

For each shape (the ``tiny-cpu`` preset and MDLM ``small`` at V=50258, L=1024, batch 1) and each
objective, one child process builds the model, runs a warm-up step and timed AdamW steps (the
trainer's step: loss, backward, clip, AdamW), counts the step's FLOPs with torch's FlopCounterMode
and reports its peak resident memory. A large fp32 matmul timed in the same run gives the CPU's
practical FLOP/s. Step and matmul times are the *minimum* over repeats: on a CPU shared with other
work the minimum is the least disturbed figure. Prints one table; the ratio rows are DSL / MDLM.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch

SHAPES = {
    "tiny-cpu": dict(preset="tiny-cpu", vocab=4096, length=128, batch=8),
    "small": dict(preset="small", vocab=50258, length=1024, batch=1),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _run(shape: str, objective: str, steps: int, threads: int, out: mp.Queue) -> None:
    torch.set_num_threads(threads)
    from torch.utils.flop_counter import FlopCounterMode

    from dsl.config import RunConfig, load
    from dsl.models import build_model
    from dsl.objectives import dsl_loss, mdlm_loss
    from dsl.seeding import sample_generator

    spec = SHAPES[shape]
    cfg = load(RunConfig, [f"model={spec['preset']}", f"model.length={spec['length']}", f"objective={objective}",
                           "model.dropout=0.0"])
    model = build_model(cfg, spec["vocab"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, length = spec["batch"], spec["length"]
    ids = torch.randint(spec["vocab"] - 1, (b, length), generator=sample_generator(0, "bench-ids"))
    mask = torch.ones_like(ids)
    rows = torch.arange(b)
    base = _rss_mib()

    def step(k: int) -> None:
        gens = [sample_generator(0, "bench", k, r) for r in range(b)]
        if objective == "dsl":
            loss, n, _ = dsl_loss(model, ids, mask, cfg.channel, gens)
        else:
            loss, n, _ = mdlm_loss(model, ids, mask, cfg.mdlm, gens, rows, b)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up: allocates the optimizer state
    times = []
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        step(k)
        times.append(time.perf_counter() - t0)
    per_step = min(times)
    peak = _rss_mib()
    with FlopCounterMode(display=False) as counter:
        step(steps + 1)
    out.put(dict(shape=shape, objective=objective, step_s=per_step, tokens_per_s=b * length / per_step,
                 flops=counter.get_total_flops(), peak_mib=peak, train_mib=peak - base,
                 params_m=sum(p.numel() for p in model.parameters()) / 1e6))


def matmul_flops(threads: int, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps at the tiny-cpu shape")
    ap.add_argument("--small-steps", type=int, default=2, help="timed steps at the small shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-small", action="store_true", help="only the tiny-cpu shape")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")  # a fresh process per row: ru_maxrss is per-process peak memory
    peak_matmul = matmul_flops(args.threads)
    shapes = ["tiny-cpu"] + ([] if args.skip_small else ["small"])
    results = {}
    for shape in shapes:
        for objective in ("mdlm", "dsl"):
            q = ctx.Queue()
            steps = args.small_steps if shape == "small" else args.steps
            p = ctx.Process(target=_run, args=(shape, objective, steps, args.threads, q))
            p.start()
            results[shape, objective] = q.get()
            p.join()
    peak_matmul = max(peak_matmul, matmul_flops(args.threads))  # again at the end: the less disturbed
    print(f"\nfp32 matmul 2048^2, {args.threads} threads: {peak_matmul / 1e9:.1f} GFLOP/s")
    head = (f"{'shape':<9} {'objective':<9} {'params M':>8} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9} "
            f"{'train MiB':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% matmul':>8}")
    print(head)
    print("-" * len(head))
    for shape in shapes:
        for objective in ("mdlm", "dsl"):
            r = results[shape, objective]
            rate = r["flops"] / r["step_s"]
            print(f"{shape:<9} {objective:<9} {r['params_m']:>8.2f} {r['tokens_per_s']:>10.1f} {r['step_s']:>8.3f} "
                  f"{r['peak_mib']:>9.0f} {r['train_mib']:>9.0f} {r['flops'] / 1e9:>10.2f} {rate / 1e9:>8.1f} "
                  f"{100 * rate / peak_matmul:>8.1f}")
        m, d = results[shape, "mdlm"], results[shape, "dsl"]
        print(f"{shape:<9} {'dsl/mdlm':<9} {'':>8} {d['tokens_per_s'] / m['tokens_per_s']:>10.2f} "
              f"{d['step_s'] / m['step_s']:>8.2f} {d['peak_mib'] / m['peak_mib']:>9.2f} "
              f"{d['train_mib'] / max(m['train_mib'], 1e-9):>9.2f} {d['flops'] / m['flops']:>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
