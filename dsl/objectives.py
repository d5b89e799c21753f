"""Training objectives and the SNR path-integral likelihood.

Every loss returns ``(loss_sum, n_tokens, stats)``: the sum of per-token nats over the padding mask,
the number of tokens it covers, and a few float diagnostics. The trainer divides the summed loss by
the token count of the *global* batch, so splitting a batch over micro-batches or workers changes
nothing. Randomness comes from one generator per row (``gens[b]``), keyed by the global sample index.

* ``dsl_loss``: Alg 1 (token cross-entropy under mixed-SNR corruption).
* ``mdlm_loss``: MDLM's SUBS continuous-time NELBO with the log-linear schedule (kuleshov-group/mdlm
  ``noise_schedule.py`` ``LogLinearNoise``, ``diffusion.py`` ``_subs_parameterization`` and its loss).
* ``ar_loss``: next-token cross-entropy.
* ``select_objective``: a run's loss, chosen once; ``validation_metrics``: what its validation loss is called.
* ``path_integral_nll``: -log P(x) = ½ ∫₀^∞ Σ_i E‖x_i - x̂_i(z_t)‖² dt (eq. 3 on the contour γ_i = t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from dsl.channel import corrupt_rows, sample_snr_rows
from dsl.config import ChannelConfig, ConfigError, MDLMLossConfig, RunConfig
from dsl.converter import block_buffers
from dsl.devices import to_device
from dsl.models.dit import mask_logit_bias

# MDLM's SUBS "-inf" (diffusion.py: neg_infinity = -1000000.0), added to the mask logit
_SUBS_NEG_INF = -1.0e6

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, float]]


# Elements of the loss head's working block (64 MiB in fp32): the (B, L, V) logits are read one block of
# positions at a time, and no other tensor of their size is made.
_HEAD_BLOCK_ELEMS = 1 << 24


def _row_blocks(rows: int, *tensors: torch.Tensor):
    """The tensors' (…, k) last-dim rows in aligned blocks of at most ``rows``: tuples of (n, k) views. The
    tensors share their leading dims; where one is a strided slice that cannot be flattened (the AR loss's
    logits[:, :-1]), the walk splits its first dim instead."""
    try:
        flat = [t.view(-1, t.shape[-1]) for t in tensors]
    except RuntimeError:
        for parts in zip(*(t.unbind(0) for t in tensors)):
            yield from _row_blocks(rows, *parts)
        return
    for r0 in range(0, flat[0].shape[0], rows):
        yield tuple(f[r0:r0 + rows] for f in flat)


class _TokenNLL(torch.autograd.Function):
    """-log softmax(a)[s] over the last dim, with the logits as the only tensor of their size.

    Autograd's log_softmax and gather hold the log-probabilities besides the logits and allocate two more
    tensors of that size in backward (gather's zero-filled gradient, then log_softmax's); under autocast an
    fp32 copy of the bf16 logits comes first. At MDLM's training shape (V = 50,258) each is 206 MB per 1,024
    tokens in fp32. Here forward keeps the logits and the row log-sum-exp (one block of positions at a
    time, in fp32, or fp64 for fp64 logits), and backward forms each block's gradient
    dℓ/da = g ⊙ (exp(a − lse) − onehot(s)) in that precision, rounding it once to the logits' dtype. When the
    logits are an intermediate result (the output layer's) the gradient goes into their own storage; a leaf
    (or a view of one) gets a fresh tensor. Either way backward runs once per forward (no ``retain_graph``
    reuse), and autograd refuses it if the logits were changed in place after the loss was taken.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = logits.new_empty((*logits.shape[:-1], 1), dtype=compute)
        rows = _head_rows(logits)
        (buf,) = block_buffers(1, rows * logits.shape[-1], lse)
        for a, out in _row_blocks(rows, logits, lse):  # lse = m + log Σ exp(a − m), m the row max
            m = a.amax(-1, keepdim=True).to(compute)
            shifted = torch.sub(a, m, out=buf[:a.numel()].view(a.shape))
            torch.sum(shifted.exp_(), -1, keepdim=True, out=out).log_().add_(m)
        ctx.save_for_backward(logits, lse)
        ctx.targets, ctx.used = targets.unsqueeze(-1), False
        base = logits._base if logits._is_view() else logits
        ctx.overwrite = base.grad_fn is not None
        return (lse - logits.gather(-1, ctx.targets).to(compute)).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: torch.Tensor):
        if ctx.used:
            raise RuntimeError("the token cross-entropy's backward ran twice on one forward; it writes the "
                               "gradient over the logits, so recompute the loss instead of retain_graph")
        ctx.used = True
        logits, lse = ctx.saved_tensors
        grad = logits if ctx.overwrite else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        in_place = ctx.overwrite and logits.dtype == lse.dtype  # no upcast: the block is its own workspace
        g = grad_nll.unsqueeze(-1).to(lse.dtype).expand_as(lse)
        rows = _head_rows(logits)
        (buf,) = block_buffers(1, rows * logits.shape[-1], lse)
        for a, out, lse_b, s_b, g_b in _row_blocks(rows, logits, grad, lse, ctx.targets, g):
            # a − lse in lse's precision
            p = a.sub_(lse_b) if in_place else torch.sub(a, lse_b, out=buf[:a.numel()].view(a.shape))
            p.exp_().mul_(g_b).scatter_add_(-1, s_b, -g_b)
            if not in_place:
                out.copy_(p)
        return grad, None


def _head_rows(logits: torch.Tensor) -> int:
    return max(1, _HEAD_BLOCK_ELEMS // logits.shape[-1])


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per position (B, L), in fp32 (fp64 for fp64 logits); half-precision
    logits are upcast one block at a time inside the head, never as a whole."""
    return _TokenNLL.apply(logits, targets)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not a product: a scored-out position may hold inf (e.g. a pad id at a -inf logit)
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def dsl_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cfg: ChannelConfig,
             gens: Sequence[torch.Generator], *, stats: bool = True) -> LossOutput:
    """Alg 1: x = W_token[s], per-token γ from the mixed sampler, z = γx + √γε, CE(s, p_θ(·|z)).

    ``model`` exposes ``embed(ids) -> (B, L, d)`` and ``forward(z) -> logits (B, L, V)``; row b's SNRs
    and noise come from ``gens[b]`` (SNRs first, then noise). ``stats=False`` leaves the diagnostics
    out (they read device values back to the host; the training loop does without them).
    """
    _check_batch(ids, mask, gens)
    x = model.embed(ids)  # (B, L, d), Alg 1 line 1
    gamma, is_roar = sample_snr_rows(gens, ids.shape[1], cfg)  # (B, L), lines 2-15
    z = corrupt_rows(x, gamma, gens)  # line 17
    logits = model(z)  # (B, L, V), line 18
    nll = _token_nll(logits, ids)  # line 19: CE(s_i, p_θ(·|z)_i)
    loss_sum = _masked_sum(nll, mask)
    n_tokens = mask.sum()
    if not stats:
        return loss_sum, n_tokens, {}
    with torch.no_grad():
        scored = mask.bool().cpu()
        roar = is_roar & scored
        stats = {"loss": float(loss_sum.detach()) / max(1, int(n_tokens)),
                 "roar_fraction": float(roar.sum()) / max(1, int(scored.sum()))}
        nll_cpu = nll.detach().cpu()
        for key, select in (("ce_roar", roar), ("ce_continuous", ~is_roar & scored)):
            if select.any():  # left out rather than NaN when the batch has no such token
                stats[key] = float(nll_cpu[select].mean())
    return loss_sum, n_tokens, stats


def mdlm_times(gens: Sequence[torch.Generator], rows: Sequence[int] | torch.Tensor, global_batch: int,
               cfg: MDLMLossConfig) -> torch.Tensor:
    """Diffusion times t (B,) float64: u_b from ``gens[b]``, stratified over the global batch.

    MDLM's ``_sample_t``: t'_b = (u_b + row_b) / global_batch mod 1 (MDLM's "antithetic" sampling is this
    stratification); t = (1 - sampling_eps) t' + sampling_eps. ``rows`` are the global indices of the
    rows within the optimizer step's batch, so the strata cover [0, 1) once per global batch.
    """
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens])
    if cfg.stratified:
        rows_t = torch.as_tensor(rows).to("cpu", torch.float64)
        u = torch.remainder((u + rows_t) / global_batch, 1.0)
    return (1.0 - cfg.sampling_eps) * u + cfg.sampling_eps


def mdlm_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cfg: MDLMLossConfig,
              gens: Sequence[torch.Generator], rows: Sequence[int] | torch.Tensor, global_batch: int,
              *, mask_id: int | None = None, stats: bool = True) -> LossOutput:
    """MDLM SUBS continuous-time NELBO with the log-linear schedule, as kuleshov-group/mdlm
    computes it (``noise_schedule.py`` ``LogLinearNoise``; ``diffusion.py``: SUBS, the loss, ``_sample_t``).

    Row b draws t_b (``mdlm_times``) and then its L masking uniforms from ``gens[b]``. ``model(ids,
    logit_bias=b)`` returns logits (B, L, V) plus b (V,), and ``model.vocab_size`` is V. ``mask_id`` defaults
    to ``model.mask_id`` (or the model config's). ``stats=False`` leaves the diagnostics (host reads of
    device values) out.
    """
    _check_batch(ids, mask, gens)
    if len(rows) != ids.shape[0]:
        raise ValueError(f"mdlm_loss got {len(rows)} row indices for a batch of {ids.shape[0]} rows")
    mask_id = _resolve_mask_id(model) if mask_id is None else mask_id
    t = mdlm_times(gens, rows, global_batch, cfg)  # (B,)
    move = torch.stack([torch.rand(ids.shape[1], generator=g, dtype=torch.float64) for g in gens])
    # LogLinearNoise: α_t = 1 - (1-ε)t, so each token is masked with probability 1 - α_t = (1-ε)t
    is_masked = to_device(move < ((1.0 - cfg.eps) * t)[:, None], ids.device)  # (B, L)
    noisy = torch.where(is_masked, torch.full_like(ids, mask_id), ids)
    # SUBS (_subs_parameterization): -1e6 on the mask logit, then log-normalise; carry-over makes every unmasked
    # position one-hot on its own token, i.e. log p = 0 and no loss there. The -1e6 rides on the output
    # layer's bias (no (B, L, V) pass, forward or backward).
    subs = mask_logit_bias(_unwrapped(model).vocab_size, mask_id, _SUBS_NEG_INF, ids.device)
    nll = _token_nll(model(noisy, logit_bias=subs), ids)  # (B, L)
    # MDLM's loss weight σ'(t)/(e^σ(t) - 1) = 1/t exactly for the log-linear schedule
    weight = to_device(1.0 / t, ids.device).to(nll.dtype)[:, None]
    per_token = torch.where(is_masked, weight * nll, torch.zeros_like(nll))
    loss_sum = _masked_sum(per_token, mask)
    # as MDLM's loss: the denominator counts every token under the padding mask, masked or not
    n_tokens = mask.sum()
    if not stats:
        return loss_sum, n_tokens, {}
    with torch.no_grad():
        stats = {
            "loss": float(loss_sum.detach()) / max(1, int(n_tokens)),
            "t_mean": float(t.mean()),
            "masked_fraction": float((is_masked & mask.bool()).sum()) / max(1, int(mask.sum())),
        }
    return loss_sum, n_tokens, stats


def ar_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, stats: bool = True) -> LossOutput:
    """Next-token cross-entropy: logits at i predict ids at i+1; the first token is not scored.
    ``stats=False`` leaves the diagnostics (host reads of device values) out."""
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must have the same shape")
    logits = model(ids)  # (B, L, V)
    nll = _token_nll(logits[:, :-1], ids[:, 1:])  # (B, L-1)
    target_mask = mask[:, 1:]
    loss_sum = _masked_sum(nll, target_mask)
    n_tokens = target_mask.sum()
    if not stats:
        return loss_sum, n_tokens, {}
    return loss_sum, n_tokens, {"loss": float(loss_sum.detach()) / max(1, int(n_tokens))}


# ----------------------------------------------------------------------------------------------
# One objective per run, and what its validation loss is called.


# An objective as the trainer calls it: (model, ids, mask, row generators, rows) -> (loss sum, tokens, stats).
Objective = Callable[[Any, torch.Tensor, torch.Tensor, list, torch.Tensor], LossOutput]


def select_objective(cfg: RunConfig) -> Objective:
    """``cfg.objective``'s loss, chosen once per run; without diagnostics (they read the device back)."""
    if cfg.objective == "dsl":
        return lambda model, ids, mask, gens, rows: dsl_loss(model, ids, mask, cfg.channel, gens, stats=False)
    if cfg.objective == "mdlm":
        return lambda model, ids, mask, gens, rows: mdlm_loss(model, ids, mask, cfg.mdlm, gens, rows,
                                                              cfg.train.batch_size, stats=False)
    if cfg.objective == "ar":
        return lambda model, ids, mask, gens, rows: ar_loss(model, ids, mask, stats=False)
    raise ConfigError(f"objective={cfg.objective!r} is not one of: dsl, mdlm, ar")


# What each objective's validation loss is, by name (nats per token). Only AR's is a likelihood. MDLM's is
# its NELBO (MDLM eq. 10), an upper bound on the NLL. DSL's is the denoiser's token cross-entropy over
# Alg 1's mixed-SNR corruptions, not a likelihood at all: the path-integral NLL (eq. 3/10) is
# ``jobs/evaluate.py likelihood``'s, at many forward passes per sequence.
VALIDATION_METRIC = {"ar": "valid_nll", "mdlm": "valid_nelbo", "dsl": "valid_denoising_ce"}


def validation_metrics(objective: str, loss: float) -> dict[str, float]:
    """``valid_loss`` (what retention ranks checkpoints by, for every objective) and the same number
    under its own name; in bits per token too where it bounds or is the NLL."""
    name = VALIDATION_METRIC[objective]
    out = {"valid_loss": loss, name: loss}
    if objective != "dsl":
        out[f"{name}_bits_per_token"] = loss / math.log(2.0)
    return out



# ----------------------------------------------------------------------------------------------
# Likelihood via the SNR path integral.


@torch.no_grad()
def path_integral_nll(denoise_mean: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n_mc: int,
                      gen: torch.Generator, *, log_t_loc: float = 1.0, log_t_scale: float = 1.0,
                      t_end: float | None = None,
                      end_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                      draws_per_call: int = 8, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo -log P(x) of each sequence from a denoiser: (nll (B,), stderr (B,)) in nats.

    Contour γ_i = t (the C* of eq. 4), z_t = t x + √t ε, f(t) = Σ_i E_{z|x} ‖x_i - x̂_i(z_t)‖²:
    * ``t_end=None``: eq. 3, -log P(x) = ½ ∫₀^∞ f(t) dt (the eq. 10 end term vanishes as t* → ∞);
    * ``t_end=t*``: eq. 10, -log P(x) = ½ ∫₀^t* f(t) dt - E log P(x | z_t*), with
      ``end_log_prob(z (N, L, d), rows (N,)) -> log P(x_rows | z) (N,)`` where ``rows`` index the B
      sequences of ``x`` (exact for a source's ``log_posterior``; with a model's factorised
      Σ_i log p_θ(x_i | z) it is eq. 4's upper bound).
    ``denoise_mean(z (N, L, d)) -> x̂ (N, L, d)`` is any denoiser (a model's ``posterior_mean`` or an
    exact oracle's); ``x`` (B, L, d) are the clean embeddings.

    Proposal (our choice): log t ~ Logistic(log_t_loc, log_t_scale), i.e. t = e^loc (u/(1-u))^scale
    with u ~ U(0, 1) (u ~ U(0, u*) with t(u*) = t* when truncated). A draw contributes
    ½ f̂(t) t / q(log t), q(log t) = u(1-u)/scale (/u* when truncated), with f̂ a one-z estimate of f.
    Since f(t) → f(0) as t → 0 and decays exponentially as t → ∞, these weights are bounded for
    scale >= 1 (a Gaussian on log t would have unbounded weights at small t), so the estimator is
    unbiased with finite variance; stderr is the sample std over ``n_mc`` draws / √n_mc.
    """
    if n_mc < 2:
        raise ValueError(f"n_mc={n_mc} must be >= 2 to estimate a standard error")
    if log_t_scale < 1.0:
        raise ValueError(f"log_t_scale={log_t_scale} must be >= 1 (bounded importance weights at t → 0)")
    if (t_end is None) != (end_log_prob is None):
        raise ValueError("t_end and end_log_prob go together (eq. 10); give both or neither (eq. 3)")
    if t_end is not None and t_end <= 0:
        raise ValueError(f"t_end={t_end} must be > 0")
    # u* = the logistic CDF at log t*: draws u ~ U(0, u*) cover exactly t ∈ (0, t*)
    u_end = 1.0 if t_end is None else 1.0 / (1.0 + math.exp(-(math.log(t_end) - log_t_loc) / log_t_scale))
    b = x.shape[0]
    x64 = x.to(torch.float64)
    rows = torch.arange(b)
    draws: list[torch.Tensor] = []
    bar = _progress(n_mc, progress, "path integral")
    done = 0
    while done < n_mc:
        c = min(draws_per_call, n_mc - done)
        u = u_end * torch.rand(c, b, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)  # (c, B)
        t = math.exp(log_t_loc) * (u / (1 - u)) ** log_t_scale
        z = _linear_contour(x64, t, gen)  # (c, B, L, d)
        x_hat = denoise_mean(z.reshape((c * b,) + tuple(x.shape[1:])).to(x.dtype))
        err = (x64 - x_hat.reshape(z.shape).to(torch.float64)).pow(2).sum(dim=(-1, -2)).cpu()  # (c, B)
        density = u * (1 - u) / (log_t_scale * u_end)  # proposal density of log t
        value = 0.5 * err * t / density  # eq. 3/10: ½ Σ_i ‖x_i - x̂_i‖² dt / q
        if t_end is not None:
            z_end = _linear_contour(x64, torch.full((c, b), float(t_end), dtype=torch.float64), gen)
            log_p = end_log_prob(z_end.reshape((c * b,) + tuple(x.shape[1:])).to(x.dtype), rows.repeat(c))
            value = value - log_p.reshape(c, b).to(torch.float64).cpu()  # eq. 10: - E log P(x | z_t*)
        draws.append(value)
        done += c
        bar.update(c)
    bar.close()
    values = torch.cat(draws)  # (n_mc, B)
    return values.mean(0), values.std(0) / math.sqrt(n_mc)


def _linear_contour(x64: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z_t = t x + √t ε on γ_i = t for every token: t (c, B) → z (c, B, L, d) float64."""
    eps = torch.randn((t.shape[0],) + tuple(x64.shape), generator=gen, dtype=torch.float64)
    t_dev = t.to(x64.device)[..., None, None]
    return t_dev * x64 + t_dev.sqrt() * eps.to(x64.device)


def nll_to_bits(nll_nats: float | torch.Tensor, n_tokens: int | float,
                n_chars: int | float | None = None) -> float | torch.Tensor:
    """Bits per token, or per character when ``n_chars`` is given: nll / (ln 2 · count)."""
    count = n_tokens if n_chars is None else n_chars
    if count <= 0:
        raise ValueError(f"cannot convert an NLL over {count} tokens/characters to bits")
    return nll_nats / (math.log(2.0) * count)


# ----------------------------------------------------------------------------------------------


def _check_batch(ids: torch.Tensor, mask: torch.Tensor, gens: Sequence[torch.Generator]) -> None:
    if ids.shape != mask.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if len(gens) != ids.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {ids.shape[0]} rows (one per row)")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and not hasattr(model, "mask_id"):  # DDP / prepare_model wrappers
        model = model.module
    return model


def _resolve_mask_id(model: torch.nn.Module) -> int:
    model = _unwrapped(model)
    mask_id = getattr(model, "mask_id", None)
    if mask_id is None:
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(cfg, "mask_id"):
            raise ValueError("mdlm_loss needs mask_id=... or a model with .mask_id or .cfg.mask_id")
        mask_id = cfg.mask_id if cfg.mask_id >= 0 else cfg.vocab_size - 1
    return int(mask_id)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


__all__ = ["dsl_loss", "mdlm_loss", "mdlm_times", "ar_loss", "path_integral_nll", "nll_to_bits", "Objective",
           "select_objective", "validation_metrics", "VALIDATION_METRIC"]
