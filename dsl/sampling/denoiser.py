"""The denoiser interface the samplers call: a discrete draft (B, L) → a categorical over V per position.

Every implementation returns, through :meth:`Denoiser.__call__`, probabilities (B, L, V) float64 with
zero mass on the mask and **one-hot on visible tokens** (MDLM's SUBS carry-over, kuleshov-group/mdlm
``diffusion.py`` ``_subs_parameterization``).
ReMDM's transition multiplies p_x0 at visible positions (``_ddpm_caching_update``): without carry-over a
self-correcting DSL model would silently *resample* visible tokens instead of keeping them. The wrapper
enforces it for every implementation, so subclasses only say what they predict at masked positions.

Denoisers that can also be driven by a continuous z (the DSL model and the exact oracles) expose
``embeddings`` (V, d) and ``posterior(z) -> (B, L, V)`` for the SDE sampler (eq. 2).
"""

from __future__ import annotations

import math

import torch

from dsl.config import ConfigError, DataConfig, SamplingConfig
from dsl.errors import UserError

MASK_LOGIT = -1.0e30  # the mask id's logit: exp underflows to exactly 0, yet 0 · MASK_LOGIT = 0
_GATHER_BYTES = 1 << 23  # a CPU moves rows to the front of their table through a scratch of this size


def front_rows(table: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows of ``table`` (N, V) where ``keep`` (N,) is True, in order: ``table[keep]``.

    On a CPU they are moved to the front of ``table`` itself (its other rows are lost) and a view of them
    returned: a fresh (R, V) tensor would fault in new pages for every row (about half of what a step does
    besides the forward when half the positions are masked). The moves go through a cache-sized scratch,
    gathered before it is written back: every source still to be read lies beyond every row written so
    far (row k's source is row ≥ k), so no row is overwritten before it is read.
    """
    if table.device.type != "cpu":
        return table[keep]
    index = keep.nonzero().squeeze(-1)
    count = index.numel()
    out_of_place = (index != torch.arange(count)).nonzero()
    k = int(out_of_place[0]) if out_of_place.numel() else count  # rows before k are already in place
    step = max(1, _GATHER_BYTES // max(1, table.shape[1] * table.element_size()))
    scratch = table.new_empty(min(step, count - k), table.shape[1])
    while k < count:
        stop = min(count, k + step)
        torch.index_select(table, 0, index[k:stop], out=scratch[: stop - k])
        table[k:stop].copy_(scratch[: stop - k])
        k = stop
    return table[:count]


class Denoiser:
    """Base class: subclasses implement ``_scores`` (and, if continuous, ``posterior``)."""

    vocab_size: int
    mask_id: int
    time_invariant: bool = True
    continuous: bool = False
    max_length: int | None = None  # the longest draft it accepts (a model's L, a source's fixed length)
    score_bytes: int = 8           # bytes per element of a raw prediction: float64 probabilities
    hidden_bytes_per_token: int = 0  # a network's activations per token of one forward (one block at a time)
    device: torch.device = torch.device("cpu")  # where drafts go in and predictions come out

    def _scores(self, draft: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Raw prediction (B, L, V) and its kind, "logits" or "probs"; rows at visible positions are ignored.
        A fresh tensor: the samplers overwrite it."""
        raise NotImplementedError

    def masked_rows(self, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(masked (B, L) bool, raw rows (N, V) at the masked positions in row-major order, kind).

        The samplers' fast path: logits stay in their own precision (float32 for a model) with the mask
        id set to ``MASK_LOGIT`` (finite, so p(mask) = 0 and no NaN in entropy sums); probabilities are
        float64 with p(mask) = 0. Visible positions are never read (carry-over).
        """
        masked = draft == self.mask_id
        if not masked.any():
            return masked, torch.zeros(0, self.vocab_size, dtype=torch.float64, device=draft.device), "probs"
        scores, kind = self._scores(draft)
        # the scores tensor is ours to edit: all masked (step 0), a view; else the masked rows, moved in place
        rows = front_rows(scores.reshape(-1, self.vocab_size), masked.reshape(-1))
        if kind == "logits":
            if rows.dtype not in (torch.float32, torch.float64):
                rows = rows.float()
            rows[:, self.mask_id] = MASK_LOGIT
            return masked, rows, kind
        rows = rows.to(torch.float64).clamp(min=0)
        rows[:, self.mask_id] = 0.0
        total = rows.sum(-1, keepdim=True)
        if not bool((total > 0).all()):
            raise UserError(f"{type(self).__name__} predicted zero mass on every non-mask token")
        return masked, rows / total, kind

    def __call__(self, draft: torch.Tensor) -> torch.Tensor:
        """p(x_i | draft) (B, L, V) float64: zero mass on the mask, one-hot on visible tokens."""
        masked, rows, kind = self.masked_rows(draft)
        out = torch.zeros(*draft.shape, self.vocab_size, dtype=torch.float64, device=draft.device)
        out[~masked] = torch.nn.functional.one_hot(draft[~masked], self.vocab_size).double()
        if rows.shape[0]:
            out[masked] = torch.softmax(rows.double(), dim=-1) if kind == "logits" else rows
        return out

    def visible_confidence(self, draft: torch.Tensor) -> torch.Tensor:
        """p(x_i = draft_i | draft) (B, L) from the raw prediction, before carry-over is enforced.

        Confidence-driven remasking (Fig 3) needs it at visible positions; masked positions get 1.
        """
        scores, kind = self._scores(draft)
        scores = scores.to(torch.float64).clone()
        if kind == "logits":
            scores[..., self.mask_id] = -math.inf
            probs = torch.softmax(scores, dim=-1)
        else:
            scores[..., self.mask_id] = 0.0
            probs = scores.clamp(min=0) / scores.clamp(min=0).sum(-1, keepdim=True)
        conf = probs.gather(-1, draft.clamp(max=self.vocab_size - 1).unsqueeze(-1)).squeeze(-1)
        return torch.where(draft == self.mask_id, torch.ones_like(conf), conf)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return " ".join(str(int(t)) for t in torch.as_tensor(ids).tolist())

    # -- continuous interface (eq. 2) ---------------------------------------------------------
    @property
    def embeddings(self) -> torch.Tensor:
        raise ConfigError(f"sampling.sampler=sde needs a DSL model or an exact oracle, not {type(self).__name__}")

    def posterior(self, z: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"sampling.sampler=sde needs a DSL model or an exact oracle, not {type(self).__name__}")


class MDLMDenoiser(Denoiser):
    """A trained MDLM DiT: ``model(ids) -> logits (B, L, V)``; σ is held at 0, so it is time-invariant."""

    def __init__(self, model: torch.nn.Module, tokenizer: object | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.cfg.vocab_size)
        mask_id = int(model.cfg.mask_id)
        self.mask_id = mask_id if mask_id >= 0 else self.vocab_size - 1
        self.max_length = int(model.cfg.length)
        self.score_bytes = 4  # float32 logits
        self.hidden_bytes_per_token = _hidden_bytes_per_token(model.cfg)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def _scores(self, draft: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.model(draft), "logits"

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return _decode_with(self.tokenizer, ids) if self.tokenizer is not None else super().decode(ids)


class DSLDenoiser(Denoiser):
    """A trained DSL model. A discrete draft enters as z: masked → 0, visible → γ_vis·x (the clean
    endpoint of z = γx + √γ ε with its noise dropped; γ_vis = ``sampling.gamma_vis``, default γ_max)."""

    continuous = True

    def __init__(self, model: torch.nn.Module, gamma_vis: float, tokenizer: object | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.vocab_size)
        self.mask_id = int(model.mask_id)
        self.gamma_vis = float(gamma_vis)
        self.max_length = int(model.cfg.length)
        self.score_bytes = 4  # float32 logits
        self.hidden_bytes_per_token = _hidden_bytes_per_token(model.cfg)
        self.tokenizer = tokenizer

    def draft_to_z(self, draft: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(draft)  # (B, L, d); the mask row is zero, so masked → 0
        return self.gamma_vis * x * (draft != self.mask_id).unsqueeze(-1)

    @torch.no_grad()
    def _scores(self, draft: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.model(self.draft_to_z(draft)), "logits"

    @property
    def embeddings(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.token_embeddings().detach().to(torch.float64)

    @torch.no_grad()
    def posterior(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.model(z.to(torch.float32)).to(torch.float64)
        return torch.softmax(logits.index_fill(-1, torch.tensor([self.mask_id], device=logits.device), -math.inf),
                             dim=-1)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return _decode_with(self.tokenizer, ids) if self.tokenizer is not None else super().decode(ids)


class OracleDenoiser(Denoiser):
    """The exact denoiser of a :mod:`dsl.sources` source: ``masked_posterior`` and ``dsl_posterior``.

    ``visible_error`` > 0 makes the raw prediction treat visible tokens as noisy observations (used by
    the recovery toy's confidence); carry-over is still enforced by ``__call__``.
    """

    continuous = True

    def __init__(self, source: object, visible_error: float = 0.0, embeddings: torch.Tensor | None = None,
                 embed_seed: int = 0):
        self.source = source
        self.vocab_size = int(source.vocab_size)
        self.mask_id = int(source.mask_id)
        self.visible_error = float(visible_error)
        self.max_length = int(source.length)
        if embeddings is None:
            embeddings = _oracle_embeddings(source, embed_seed)
        self._embeddings = embeddings.to(torch.float64)

    def _scores(self, draft: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.source.masked_posterior(draft, visible_error=self.visible_error), "probs"

    @property
    def embeddings(self) -> torch.Tensor:
        return self._embeddings

    def posterior(self, z: torch.Tensor) -> torch.Tensor:
        return self.source.dsl_posterior(z, self._embeddings)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.source.decode(ids)


def _oracle_embeddings(source: object, seed: int) -> torch.Tensor:
    """Circle embeddings for the cyclic toy with K ≤ 7 (App B), else fixed random unit vectors (d=64)."""
    if hasattr(source, "circle_embeddings") and getattr(source, "k", 99) <= 7:
        return source.circle_embeddings()
    from dsl.channel import spherical_embeddings
    from dsl.seeding import sample_generator

    return spherical_embeddings(source.vocab_size, 64, source.mask_id, sample_generator(seed, "oracle-emb"))


def _hidden_bytes_per_token(model_cfg: object) -> int:
    """float32 activations of one transformer block per token: the residual stream, q/k/v/out and the MLP."""
    return 4 * int(model_cfg.hidden) * (5 + int(model_cfg.mlp_ratio))


def _decode_with(tokenizer: object, ids: torch.Tensor | list[int]) -> str:
    return tokenizer.decode([int(t) for t in torch.as_tensor(ids).tolist()])


ORACLE_DEFAULT_LENGTH = 64


CHECKPOINT_KINDS = ("oracle", "checkpoint", "run", "uri")


def load_denoiser(spec: str, cfg: SamplingConfig, *, length: int | None = None,
                  data_cfg: DataConfig | None = None, device: str = "cpu") -> Denoiser:
    """``oracle:hmm`` / ``oracle:cyclic`` (exact, parameters from ``data_cfg``), a checkpoint directory,
    a run directory (its latest complete checkpoint) or a storage URI (``s3://...``) of an ``mdlm`` or
    ``dsl`` run (see :mod:`dsl.model_spec`); a network's weights are loaded onto ``device``."""
    from dsl.model_spec import parse_model_spec

    model = parse_model_spec(spec, "checkpoint", CHECKPOINT_KINDS)
    if model.kind == "oracle":
        from dsl.sources import build_source

        data_cfg = data_cfg or DataConfig()
        if model.target == "cyclic" and not length:
            length = data_cfg.cyclic_k
        return OracleDenoiser(build_source(model.target, data_cfg, length or ORACLE_DEFAULT_LENGTH))
    from dsl.models.loading import load_run

    run_cfg, net, tokenizer, _ = load_run(model.target, device=device)
    if run_cfg.objective == "mdlm":
        return MDLMDenoiser(net, tokenizer)
    if run_cfg.objective == "dsl":
        return DSLDenoiser(net, cfg.gamma_vis, tokenizer)
    raise UserError(f"checkpoint={spec}: objective={run_cfg.objective} has no masked denoiser (need mdlm or dsl)")


__all__ = ["Denoiser", "MDLMDenoiser", "DSLDenoiser", "OracleDenoiser", "load_denoiser"]
