"""Per-step sampler math vs one denoiser forward at the paper's shape (V=50258, L=1024, DiT small, CPU, batch 1),
and our sort-free nucleus filter vs a full-vocabulary sort on the same rows. One run.

    python bench/bench_sampler.py [--threads 1,2] [--fast]

"Sampler math" is everything a step does besides the network: the denoiser wrapper (float64 softmax on
the masked rows, carry-over one-hots), the nucleus filter and sharpness statistics (once per forward),
the transition coefficients, the per-sample float64 uniforms, the draw, and the diagnostics record.
It scales with the masked fraction, so it is timed at 100 % (step 0), 50 % and 10 % masked (the loop
window), with logits of two sharpness regimes: broad (Table 6 step 0: nucleus ~10^4) and sharp (mid-run:
nucleus ~10). ``--fast`` shrinks L to 256 for a smoke run. Every figure is timed at each ``--threads`` count
(default 1 and 2) and printed side by side: the sampler's passes are memory-bound and gain less from a second
thread than the forward's GEMMs do, so the ratios move with the thread count.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import describe, target_row, thread_counts, threads_label

from dsl.config import ModelConfig, SamplingConfig
from dsl.models.dit import DiT
from dsl.sampling.candidates import NucleusCache
from dsl.sampling.denoiser import Denoiser
from dsl.sampling.diagnostics import StepRecorder
from dsl.sampling.masked import per_sample_means
from dsl.sampling.nucleus import sort_top_p_filter, top_p_filter
from dsl.sampling.rules import remdm_loop_rule
from dsl.sampling.transition import apply_transition, transition_coefficients

VOCAB, MASK = 50258, 50257
REPEATS = 9  # rounds of every figure: the least of each rides out a busy spell of the machine


class FixedLogits(Denoiser):
    """Hands out copies of precomputed logits, made before the clock starts (a forward's output is a fresh
    tensor the sampler may overwrite), so timing it measures only the wrapper around a forward.

    The copy handed out is released at the next ``prepare``, off the clock too: the forward's own timing
    already pays for allocating its output and for freeing it, which a step would otherwise pay again."""

    def __init__(self, logits: torch.Tensor):
        self.vocab_size, self.mask_id, self.logits = VOCAB, MASK, logits
        self.ready: list[torch.Tensor] = []
        self.handed: torch.Tensor | None = None

    def prepare(self) -> None:
        self.handed = None
        self.ready.append(self.logits.clone())

    def _scores(self, draft):
        self.handed = self.ready.pop() if self.ready else self.logits.clone()
        return self.handed, "logits"


def _time(fn, setup=None) -> float:
    """CPU seconds of this process (all its threads) for one call of ``fn``; ``setup`` runs first, off the
    clock. The figures are the least over rounds of these (the least disturbed on a shared machine, as
    bench_train takes them)."""
    if setup is not None:
        setup()
    start = time.process_time()
    fn()
    return time.process_time() - start


def _forward(model: DiT, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(ids)


def zipf_logits(length: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Logits −a·log(rank) over a random permutation per position: (1, L, V) float32, mask column −inf."""
    base = -exponent * torch.log(torch.arange(1, VOCAB + 1, dtype=torch.float32))
    perm = torch.argsort(torch.rand(length, VOCAB, generator=gen), dim=-1)
    logits = base[perm].unsqueeze(0)
    logits[..., MASK] = -float("inf")
    return logits


def one_step(denoiser: FixedLogits, draft: torch.Tensor, cfg: SamplingConfig, recorder: StepRecorder):
    """Exactly the per-step work of ``run_masked`` around the forward (a loop-window step, σ = η)."""
    n, length = draft.shape
    masked = draft == MASK
    cache = NucleusCache(n, length)
    sub_masked, raw, kind = denoiser.masked_rows(draft)
    nuc = top_p_filter(raw, cfg.top_p, cfg.diag_top_p, kind, overwrite=True)
    cache.write(torch.arange(n), sub_masked, nuc)
    stats = per_sample_means(sub_masked, nuc)
    rule = remdm_loop_rule(0.02, 0.55, 0.05, 0.9)(0.3, 0.299)
    sigma = torch.full((n, length), rule.sigma, dtype=torch.float64)
    unmask, remask = transition_coefficients(masked, rule, sigma)
    gen = torch.Generator().manual_seed(0)
    uniforms = torch.stack([torch.rand(2, length, generator=gen, dtype=torch.float64)])
    new, _, _ = apply_transition(draft, cache, unmask, remask, uniforms, MASK)
    recorder.record(0, 0.3, masked=masked, new_masked=new == MASK, changed=new != draft,
                    remasked=~masked & (new == MASK), remask_prob=remask, stats=stats,
                    forwards=torch.ones(n, dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated; each is timed in every "
                        "round and printed side by side (default 1,2)")
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args()
    try:
        counts = thread_counts(args.threads)
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(max(counts))
    print(describe("before", counts))
    length = 256 if args.fast else 1024
    gen = torch.Generator().manual_seed(0)

    cfg = ModelConfig(hidden=768, blocks=12, heads=12, cond_dim=128, dropout=0.0, length=length,
                      vocab_size=VOCAB, mask_id=MASK)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiT(cfg).eval()
    ids = torch.randint(0, VOCAB - 1, (1, length), generator=gen)
    with torch.no_grad():
        model(ids[:, :16])  # warm-up (allocations, conditioning cache)

    scfg = SamplingConfig(top_p=0.9)
    regimes = {"broad": 1.0, "sharp": 2.5}  # Zipf exponents: k_t ≈ 1.6e4 (step-0-like), k_t ≈ 3
    fracs = (1.0, 0.5, 0.1)
    cases = []  # per regime: its logits' denoiser, drafts, the kept-set check and the sort baseline
    for regime, exponent in regimes.items():
        logits = zipf_logits(length, exponent, gen)
        rows = logits[0].clone()
        rows[:, MASK] = -1.0e30
        probs = torch.softmax(rows, -1).double()  # the rule's probabilities: softmax in the logits' precision
        nuc = top_p_filter(rows, 0.9, kind="logits")
        same = float(((nuc.dense(VOCAB) > 0) == (sort_top_p_filter(probs, 0.9) > 0)).all(-1).double().mean())
        full = {}
        for threads in counts:
            torch.set_num_threads(threads)
            full[threads] = _time(lambda probs=probs: sort_top_p_filter(probs, 0.9))
        drafts = []
        for frac in fracs:
            draft = torch.randint(0, VOCAB - 1, (1, length), generator=gen)
            draft[torch.rand(1, length, generator=gen) < frac] = MASK
            draft[0, 0] = MASK
            drafts.append(draft)
        cases.append(dict(regime=regime, den=FixedLogits(logits), drafts=drafts, same=same, full=full,
                          k=float(nuc.nucleus_size.mean()), max_p=float(nuc.max_prob.mean())))
        del logits, rows, probs, nuc

    # rounds: every figure once per round at every thread count, so that a busy spell of the machine touches
    # them all alike; each is the least over the rounds, the forward's too (timed every third round: ~2 s a run)
    every = torch.full((1, length), MASK)
    held: list = []  # the filter's last result, released off the clock as the logits are
    ours = {(c["regime"], t): [] for c in cases for t in counts}
    math_s = {(c["regime"], frac, t): [] for c in cases for frac in fracs for t in counts}
    forwards = {t: [] for t in counts}
    for round_ in range(REPEATS + 1):
        for threads in counts:
            torch.set_num_threads(threads)
            if round_ % 3 == 0:
                forwards[threads].append(_time(lambda: _forward(model, ids)))
            if round_ == REPEATS:  # the last round: the forward only
                continue
            for case in cases:
                den = case["den"]
                ours[case["regime"], threads].append(_time(lambda den=den: held.append(
                    top_p_filter(den.masked_rows(every)[1], 0.9, kind="logits", overwrite=True)),
                    setup=lambda den=den: (held.clear(), den.prepare())))
                held.clear()
                for frac, draft in zip(fracs, case["drafts"]):
                    math_s[case["regime"], frac, threads].append(_time(
                        lambda draft=draft, den=den: one_step(den, draft, scfg, StepRecorder(1, length)),
                        setup=den.prepare))
    forward = {t: min(forwards[t]) for t in counts}
    print(f"DiT small forward, V={VOCAB}, L={length}, batch 1: "
          + ", ".join(f"{forward[t]:.3f} CPU s at {threads_label(t)}" for t in counts))

    print(f"\n{'threads':>7} {'regime':<7} {'k_t':>8} {'max p':>6} {'masked':>7} {'math cpu s':>10} {'math/fwd':>9} "
          f"{'top-p s':>8} {'top-p/fwd':>9} {'sort s':>8} {'sort/ours':>9} {'same set':>8}")
    worst = {}  # (figure, threads) -> ratio to the forward
    for threads in counts:
        fwd = forward[threads]
        for case in cases:
            regime, top_p_s = case["regime"], min(ours[case["regime"], threads])
            full = case["full"][threads]
            for frac in fracs:
                step_s = min(math_s[regime, frac, threads])
                worst[regime, threads] = max(worst.get((regime, threads), 0.0), step_s / fwd)
                print(f"{threads:>7} {regime:<7} {case['k']:>8.1f} {case['max_p']:>6.3f} {frac:>7.0%} {step_s:>10.3f} "
                      f"{step_s / fwd:>9.2%} {top_p_s:>8.3f} {top_p_s / fwd:>9.2%} {full:>8.3f} {full / top_p_s:>9.1f} "
                      f"{case['same']:>8.1%}")
            worst[regime, "top-p", threads] = top_p_s / fwd
            worst[regime, "sort", threads] = full / fwd

    def row(label: str, cells: list[str], target: str = "") -> None:
        print(target_row(label, cells, target))

    print()
    row("measured (CPU seconds of this process)", [threads_label(t) for t in counts], "target")
    row("nucleus filter on broad rows / one DiT-small forward", [f"{worst['broad', 'top-p', t]:.1%}" for t in counts],
        "<= 10 %")
    row("full-sort baseline on the same rows / one forward", [f"{worst['broad', 'sort', t]:.1%}" for t in counts])
    row("all sampler math per step / one forward, broad (worst)", [f"{worst['broad', t]:.1%}" for t in counts],
        "<= 10 %")
    row("all sampler math per step / one forward, sharp (worst)", [f"{worst['sharp', t]:.1%}" for t in counts],
        "<= 5 %")
    row("rows whose kept set equals the full stable sort", [f"{min(c['same'] for c in cases):.1%}"] * len(counts),
        "100 %")
    print(f"\nTimes are the least CPU seconds of this process over {REPEATS} rounds that time every figure once at every"
          " thread count (all its threads; the cores may be shared); the forward's over every third round. top-p: ours"
          " on the (L, V) float32 logits (nucleus, max p, entropy and k_t included) vs one full-vocabulary stable sort"
          " of the same rows' probabilities (float64 sums); 'same set' = rows whose kept tokens equal the sort's.")
    print(describe("after", counts))


if __name__ == "__main__":
    main()
