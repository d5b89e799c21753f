"""Memory estimates checked before allocating: a job refuses a size that cannot fit and says what would.

The estimates count the few tensors that dominate a job's peak (a batch's (B, L, V) predictions, the
attention scores of one block, the per-sample bookkeeping); they are meant to catch sizes that are off
by orders of magnitude before the kernel's OOM killer does, not to plan a tight fit.
"""

from __future__ import annotations

from collections.abc import Callable

from dsl.errors import UserError


def available_bytes() -> int:
    """Memory this process could still allocate on this machine."""
    import psutil

    return int(psutil.virtual_memory().available)


def human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def largest_fitting(need: Callable[[int], float], limit: float, lo: int = 1, hi: int = 1 << 40) -> int:
    """The largest integer x in [lo, hi] with ``need(x) <= limit`` (``need`` non-decreasing); 0 if none."""
    if need(lo) > limit:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fits(what: str, need: float, advice: str, limit: float | None = None, where: str = "available") -> None:
    """Raise one UserError line when ``need`` bytes exceed ``limit`` (default: this machine's available
    memory): ``<what> needs about X of memory, more than the Y <where>; <advice>``."""
    limit = available_bytes() if limit is None else limit
    if need > limit:
        raise UserError(f"{what} needs about {human(need)} of memory, more than the {human(limit)} {where}; {advice}")


# Vocabulary sizes (with the mask id) of the tokenizers whose size is known before they are built.
KNOWN_VOCAB = {"gpt2": 50258, "char": 260}


def vocab_estimate(run_cfg: object) -> int:
    """V of a training run as far as the config tells it without building the tokenizer (0 = unknown)."""
    if run_cfg.model.vocab_size:
        return int(run_cfg.model.vocab_size)
    data = run_cfg.data
    if data.source == "hmm":
        return data.hmm_words + 1
    if data.source == "cyclic":
        return data.cyclic_k + 1
    if data.tokenizer == "bpe":
        return data.bpe_vocab
    return KNOWN_VOCAB.get(data.tokenizer, 0)


def training_memory(run_cfg: object, world_size: int = 1) -> int:
    """Estimated peak bytes of one training worker: fp32 parameters with their gradient, two Adam moments
    and the EMA copy, plus one micro-batch's activations kept for the backward pass (per block and token:
    the residual stream, q/k/v/out, the MLP's pre- and post-activation), and the (B, L, V) logits with
    their softmax and gradient (twice for DSL: the converter's softmax over V, Sec 4.2). Attention
    scores are left out (fused kernels do not keep the L x L matrix), so long sequences are not over-counted."""
    m, t = run_cfg.model, run_cfg.train
    vocab = vocab_estimate(run_cfg)
    params = m.blocks * (4 + 2 * m.mlp_ratio) * m.hidden ** 2 + 2 * vocab * m.hidden
    micro = t.micro_batch_size or max(1, t.batch_size // max(1, world_size))
    per_token = 4 * m.blocks * (10 + 2 * m.mlp_ratio) * m.hidden + 4 * 3 * vocab * (2 if run_cfg.objective == "dsl"
                                                                                  else 1)
    return 4 * 5 * params + micro * m.length * per_token


def check_training_memory(run_cfg: object, world_size: int, limit: float, where: str) -> None:
    """One UserError line when a worker of ``run_cfg`` cannot fit in ``limit`` bytes, naming the longest
    model.length and the largest train.micro_batch_size that would."""
    import copy

    need = training_memory(run_cfg, world_size)
    if need <= limit:
        return
    probe = copy.deepcopy(run_cfg)

    def at_length(length: int) -> int:
        probe.model.length = length
        return training_memory(probe, world_size)

    max_len = largest_fitting(at_length, limit)
    probe = copy.deepcopy(run_cfg)

    def at_micro(micro: int) -> int:
        probe.train.micro_batch_size = micro
        return training_memory(probe, world_size)

    max_micro = largest_fitting(at_micro, limit, hi=max(1, run_cfg.train.batch_size))
    micro = run_cfg.train.micro_batch_size or max(1, run_cfg.train.batch_size // max(1, world_size))
    source = ("train.micro_batch_size" if run_cfg.train.micro_batch_size else
              f"train.batch_size={run_cfg.train.batch_size} / {world_size} worker(s)")
    probe.model.length, probe.train.micro_batch_size = 1, 1
    if training_memory(probe, world_size) > limit:
        advice = (f"the parameters alone do not fit (model.hidden={run_cfg.model.hidden}, "
                  f"model.blocks={run_cfg.model.blocks})")
    else:
        advice = (f"at {micro} sequences per forward at most model.length={max_len} fits" if max_len else
                  f"no model.length fits at {micro} sequences per forward")
        advice += (f"; at model.length={run_cfg.model.length}, train.micro_batch_size={max_micro} fits" if max_micro
                   else f"; model.length={run_cfg.model.length} does not fit even one sequence per forward")
    what = f"training at model.length={run_cfg.model.length} with {micro} sequences per forward ({source})"
    check_fits(what, need, advice, limit, where)


__all__ = ["available_bytes", "human", "largest_fitting", "check_fits", "vocab_estimate", "training_memory",
           "check_training_memory", "KNOWN_VOCAB"]
