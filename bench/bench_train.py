"""Training throughput and memory, MDLM vs DSL objective on the same DiT backbone (CPU), and the converter alone.

    python bench/bench_train.py [--threads 1,2] [--steps 18] [--small-steps 6] [--precision fp32]
                                [--skip-small] [--memory-batch 4] [--head-memory]

For each shape (the ``tiny-cpu`` preset and MDLM ``small`` at V=50258, L=1024, batch 1) one child process
builds both models and takes ``--steps`` (``--small-steps``) training steps of each, alternating step by step
(the trainer's step: loss, backward, clip, AdamW), so a busy spell of the machine touches both objectives
alike; a step's time is the minimum over all its timed steps (the least disturbed figure on a shared CPU).
Each step's FLOPs are counted with torch's FlopCounterMode (plus the in-place addmm_ the converter
accumulates with). Peak resident memory comes from one fresh child process per objective (ru_maxrss is a
per-process peak); ``--memory-batch`` rows (default 4) take one more such step per objective at the small
shape, where the loss head's (B, L, V) tensors set the peak; ``--head-memory`` adds the same at a shape where
the head dominates everything else (the tiny-cpu backbone at V=50258, L=128, batch 32), in fp32 and under
bf16 autocast side by side (about 6 minutes on a 2-core CPU without bf16 instructions). A large matmul
timed in the same run gives the
CPU's practical FLOP/s. Step times are CPU seconds of the process (all its threads): on a loaded machine
they move far less than wall time; both are printed. The converter alone (fwd+bwd at paper shape, both
implementations) is timed against that rate.
Under each DSL / MDLM ratio, its floor on this machine: MDLM's step plus DSL's extra FLOPs (the converter's
seven GEMMs of n·V·(d or hidden)) at 100 % of that rate, i.e. no target under the floor can be met while
the converter computes those FLOPs.
Every figure is taken at each ``--threads`` count (default 1 and 2) in the same run, each in its own child
processes, and printed side by side: the converter's and the sampler's memory-bound passes gain less from a
second thread than MDLM's GEMMs do, so the ratios move with the thread count.
Prints one table; ratio rows are DSL / MDLM, and the last table is the one the speed work is tracked by
(``--precision bf16`` runs both objectives under bf16 autocast).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch
from machine import describe, flop_counter, refuse_counts_below_one, target_row, thread_counts, threads_label

SHAPES = {
    "tiny-cpu": dict(preset="tiny-cpu", vocab=4096, length=128, batch=8),
    "small": dict(preset="small", vocab=50258, length=1024, batch=1),
    # the loss head's (B, L, V) logits (206 M, 785 MiB in fp32) outweigh the backbone and its optimizer state
    "head": dict(preset="tiny-cpu", vocab=50258, length=128, batch=32),
}
# DSL / MDLM step time at the small shape, over the FLOP ratio, must stay under this: the converter's GEMMs
# are FLOPs MDLM does not have (a time ratio under the FLOP ratio is out of reach when both run at the
# same rate), so the guard asks that DSL spends no more than 10 % more time per FLOP than MDLM
PER_FLOP_GUARD = 1.10
OBJECTIVES = ("mdlm", "dsl")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mib() -> float:
    """Resident memory now (the peak can be an import's transient, above what the built model keeps)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _trainer_step(shape: str, objective: str, threads: int, precision: str, batch: int | None = None):
    """(one training step as the trainer takes it, its model) for ``objective`` at ``shape`` (its batch, or
    ``batch`` rows)."""
    torch.set_num_threads(threads)
    from dsl.config import RunConfig, load
    from dsl.models import build_model
    from dsl.objectives import select_objective
    from dsl.seeding import sample_generator

    spec = {**SHAPES[shape], **({} if batch is None else {"batch": batch})}
    cfg = load(RunConfig, [f"model={spec['preset']}", f"model.length={spec['length']}", f"objective={objective}",
                           "model.dropout=0.0", f"train.batch_size={spec['batch']}"])
    model = build_model(cfg, spec["vocab"])
    loss_of = select_objective(cfg)  # the trainer's loss: no diagnostics
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, length = spec["batch"], spec["length"]
    ids = torch.randint(spec["vocab"] - 1, (b, length), generator=sample_generator(0, "bench-ids"))
    mask = torch.ones_like(ids)
    rows = torch.arange(b)

    def step(k: int) -> None:
        gens = [sample_generator(0, "bench", k, r) for r in range(b)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, n, _ = loss_of(model, ids, mask, gens, rows)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _memory(shape: str, objective: str, threads: int, precision: str, batch: int | None, out: mp.Queue) -> None:
    """Peak resident memory of a process that builds one objective's model and takes two steps, and how much
    of it the steps added (activations, gradients, optimizer state)."""
    step, _ = _trainer_step(shape, objective, threads, precision, batch)
    base = _rss_mib()
    step(0)  # allocates the optimizer state
    step(1)
    peak = _peak_rss_mib()
    out.put(dict(peak_mib=peak, train_mib=max(0.0, peak - base)))


def _timed(shape: str, steps: int, threads: int, precision: str, out: mp.Queue) -> None:
    """Both objectives in one process, ``steps`` steps of each, alternating: the least CPU and wall time per
    step of each."""
    trainers = {objective: _trainer_step(shape, objective, threads, precision) for objective in OBJECTIVES}
    for step, _ in trainers.values():
        step(0)  # warm-up: allocates the optimizer state
    cpu = {objective: float("inf") for objective in OBJECTIVES}
    wall = dict(cpu)
    for k in range(1, steps + 1):
        for objective, (step, _) in trainers.items():  # alternating step by step: load drift touches both alike
            t0, c0 = time.perf_counter(), time.process_time()
            step(k)
            wall[objective] = min(wall[objective], time.perf_counter() - t0)
            cpu[objective] = min(cpu[objective], time.process_time() - c0)
    result = {}
    spec = SHAPES[shape]
    for objective, (step, model) in trainers.items():
        with flop_counter() as counter:
            step(steps + 1)
        result[objective] = dict(step_s=cpu[objective], wall_s=wall[objective], tokens=spec["batch"] * spec["length"],
                                 flops=counter.get_total_flops(),
                                 params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    out.put(result)


def _converter(threads: int, out: mp.Queue) -> None:
    """fwd+bwd of the converter alone at paper shape: V=50258, 1024 positions, d=64, hidden=768."""
    torch.set_num_threads(threads)
    from dsl.converter import SoftmaxConverter

    vocab, n, dim, hidden = 50258, 1024, 64, 768
    conv = SoftmaxConverter(vocab, dim, hidden, vocab - 1, gen=torch.Generator().manual_seed(0))
    z = (torch.randn(n, dim, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    upstream = torch.randn(n, hidden, generator=torch.Generator().manual_seed(2))
    flops = 2 * n * vocab * (2 * dim + hidden) + 2 * n * vocab * (3 * dim + 2 * hidden)  # 2 fwd + 5 bwd GEMMs
    result = {}
    for impl in ("chunked", "attention"):
        conv.impl = impl
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            (conv(z) * upstream).sum().backward()
            best = min(best, time.process_time() - t0)
        result[impl] = flops / best * threads  # CPU seconds of all threads: back to a per-wall-second rate
    out.put(result)


def matmul_flops(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n**3 / best * threads  # per CPU second of each thread, like the step rates


def _child(ctx, target, *args):
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=18, help="timed steps per objective at the tiny-cpu shape (min over them)")
    ap.add_argument("--small-steps", type=int, default=6, help="the same at the small shape")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated; each is timed in this run and "
                    "printed side by side (default 1,2)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast for both")
    ap.add_argument("--skip-small", action="store_true", help="only the tiny-cpu shape")
    ap.add_argument("--memory-batch", type=int, default=4, help="rows of one more peak-memory step per objective at "
                    "the small shape, where the loss head's (B, L, V) tensors show (1 = none; default 4)")
    ap.add_argument("--head-memory", action="store_true", help="peak memory of a step where the loss head "
                    "dominates (tiny-cpu backbone, V=50258, L=128, batch 32), fp32 and bf16 autocast")
    args = ap.parse_args(argv)
    refuse_counts_below_one(ap, args, "steps", "small_steps", "memory_batch")
    try:
        counts = thread_counts(args.threads)
    except ValueError as e:
        ap.error(str(e))
    print(describe("before", counts), flush=True)
    ctx = mp.get_context("spawn")  # a fresh process per row: ru_maxrss is per-process peak memory
    shapes = ["tiny-cpu"] + ([] if args.skip_small else ["small"])
    memory = {(shape, objective): _child(ctx, _memory, shape, objective, counts[0], args.precision, None)
              for shape in shapes for objective in OBJECTIVES}  # peak memory does not depend on the threads
    # at batch 1 the optimizer state sets the peak; as rows grow, the loss head's (B, L, V) tensors do
    wide = {objective: _child(ctx, _memory, "small", objective, counts[0], args.precision, args.memory_batch)
            for objective in OBJECTIVES} if "small" in shapes and args.memory_batch > 1 else {}
    head_memory = {(precision, objective): _child(ctx, _memory, "head", objective, counts[0], precision, None)
                   for precision in ("fp32", "bf16") for objective in OBJECTIVES} if args.head_memory else {}
    results: dict[tuple[int, str, str], dict] = {}
    converter: dict[int, dict[str, float]] = {}
    peak_matmul: dict[int, float] = {}
    for threads in counts:
        peak_matmul[threads] = matmul_flops(threads)
        for shape in shapes:
            steps = args.small_steps if shape == "small" else args.steps
            timed = _child(ctx, _timed, shape, steps, threads, args.precision)
            for objective in OBJECTIVES:
                results[threads, shape, objective] = {**timed[objective], **memory[shape, objective]}
        converter[threads] = _child(ctx, _converter, threads)
        peak_matmul[threads] = max(peak_matmul[threads], matmul_flops(threads))  # again: the less disturbed
    print("\nfp32 matmul 2048^2 (per CPU second x threads): "
          + ", ".join(f"{peak_matmul[t] / 1e9:.1f} GFLOP/s at {threads_label(t)}" for t in counts)
          + f"; training precision {args.precision}")
    head = (f"{'threads':>7} {'shape':<9} {'objective':<9} {'params M':>8} {'tokens/s':>10} {'cpu s':>8} {'wall s':>8} "
            f"{'peak MiB':>9} {'train MiB':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% matmul':>8}")
    print(head)
    print("-" * len(head))
    ratios = {}
    for threads in counts:
        for shape in shapes:
            for objective in OBJECTIVES:
                r = results[threads, shape, objective]
                rate = r["flops"] / r["step_s"] * threads
                print(f"{threads:>7} {shape:<9} {objective:<9} {r['params_m']:>8.2f} {r['tokens'] / r['wall_s']:>10.1f} "
                      f"{r['step_s']:>8.3f} {r['wall_s']:>8.3f} {r['peak_mib']:>9.0f} {r['train_mib']:>9.0f} "
                      f"{r['flops'] / 1e9:>10.2f} {rate / 1e9:>8.1f} {100 * rate / peak_matmul[threads]:>8.1f}")
            m, d = results[threads, shape, "mdlm"], results[threads, shape, "dsl"]
            # the least DSL / MDLM time ratio there can be: MDLM's step plus DSL's extra FLOPs (the converter's
            # GEMMs) at 100 % of the matmul rate, in CPU seconds like the steps
            floor = 1 + (d["flops"] - m["flops"]) / peak_matmul[threads] * threads / m["step_s"]
            ratios[threads, shape] = (d["step_s"] / m["step_s"], d["flops"] / m["flops"], floor)
            print(f"{threads:>7} {shape:<9} {'dsl/mdlm':<9} {'':>8} {m['wall_s'] / d['wall_s']:>10.2f} "
                  f"{d['step_s'] / m['step_s']:>8.2f} {d['wall_s'] / m['wall_s']:>8.2f} "
                  f"{d['peak_mib'] / m['peak_mib']:>9.2f} "
                  f"{d['train_mib'] / m['train_mib'] if m['train_mib'] >= 1 else float('nan'):>9.2f} "
                  f"{d['flops'] / m['flops']:>10.2f}")
    if wide:
        print(f"\npeak memory of a training step at the small shape, batch {args.memory_batch}: " + ", ".join(
            f"{objective} {wide[objective]['peak_mib']:.0f} MiB ({wide[objective]['train_mib']:.0f} added by the steps)"
            for objective in OBJECTIVES))
    if head_memory:
        spec = SHAPES["head"]
        print(f"\npeak memory of a training step where the loss head dominates (tiny-cpu backbone, V={spec['vocab']}, "
              f"L={spec['length']}, batch {spec['batch']}): " + "; ".join(
                  f"{precision}: " + ", ".join(f"{objective} {head_memory[precision, objective]['peak_mib']:.0f} MiB"
                                               for objective in OBJECTIVES) for precision in ("fp32", "bf16"))
              + "; bf16 / fp32: " + ", ".join(
                  f"{objective} {head_memory['bf16', objective]['peak_mib'] / head_memory['fp32', objective]['peak_mib']:.2f}"
                  for objective in OBJECTIVES))
    print("\nconverter fwd+bwd alone (V=50258, 1024 positions, d=64, hidden=768): " + "; ".join(
        f"{threads_label(t)}: " + ", ".join(
            f"{impl} {rate / 1e9:.1f} GFLOP/s = {100 * rate / peak_matmul[t]:.0f} % of the matmul rate"
            for impl, rate in converter[t].items()) for t in counts))

    print()

    def row(label: str, cells: list[str], target: str = "") -> None:
        print(target_row(label, cells, target, width=22))

    row(f"measured (CPU, {args.precision})", [f"now, {threads_label(t)}" for t in counts], "target")
    if "small" in shapes:
        small = [ratios[t, "small"] for t in counts]
        row("DSL / MDLM training step time, small shape, batch 1",
            [f"{step:.2f}x (FLOP ratio {flop:.2f})" for step, flop, _ in small], "<= 1.15x")
        row("  the same per FLOP (time ratio / FLOP ratio; the guard)", [f"{step / flop:.2f}" for step, flop, _ in small],
            f"<= {PER_FLOP_GUARD:.2f}")
        row("  floor: DSL extra FLOPs at 100 % of the matmul rate", [f"{floor:.2f}x" for _, _, floor in small])
    tiny = [ratios[t, "tiny-cpu"] for t in counts]
    row("DSL / MDLM at the tiny-cpu shape (V=4096)", [f"{step:.2f}x (FLOP ratio {flop:.2f})" for step, flop, _ in tiny],
        "<= 1.6x")
    row("  floor: DSL extra FLOPs at 100 % of the matmul rate", [f"{floor:.2f}x" for _, _, floor in tiny])
    row("converter fwd+bwd vs the fp32 matmul rate of the same run",
        [f"{100 * max(converter[t].values()) / peak_matmul[t]:.0f} %" for t in counts], ">= 60 %")
    print(describe("after", counts))
    over = [(t, *ratios[t, "small"][:2]) for t in counts if "small" in shapes
            and ratios[t, "small"][0] / ratios[t, "small"][1] > PER_FLOP_GUARD]
    for threads, step, flop in over:
        print(f"GUARD: DSL / MDLM at the small shape, {threads} thread(s), is {step:.2f}x for {flop:.2f}x the FLOPs: "
              f"{step / flop:.2f} > {PER_FLOP_GUARD} per FLOP (a loaded machine can cause it: compare the load "
              "averages above)")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
