"""Generative perplexity: how likely an oracle finds the samples (Sec 6.1 "Metrics", App C.2).

GenPPL = exp(Σ nll / Σ scored tokens), pooled over the tokens of *all* samples (not a mean of
per-sample perplexities, as ReMDM's ``compute_generative_perplexity`` in kuleshov-group/remdm
``diffusion.py``), computed in fp32 (float64 accumulation), batched. Oracles:

- :class:`ExactSourceOracle` — a synthetic source's exact log-likelihood; every token is scored
  (the source's joint P(x) includes the first token, which an AR oracle cannot score).
- :class:`ARCheckpointOracle` — one of our AR checkpoints (``dsl.models.ar``) on the generator's own ids:
  logits[:, :-1] against ids[:, 1:], the first token unscored.
- :class:`CausalLMOracle` — a Hugging Face causal LM (``gpt2-large`` as in the paper) with ReMDM's
  re-tokenisation protocol (``eval_retokenize``): decoded texts are re-encoded by the oracle's tokenizer
  (right truncation at 1024, no BOS added — a literal ``<|endoftext|>`` becomes GPT-2's BOS — padded
  with EOS), logits[:, :-1] score tokens[:, 1:], and a target counts when it is not EOS or is the
  row's first EOS (cumulative EOS count == 1, counted from position 0). Two departures: ReMDM drops the
  last partial batch (N // batch batches) and can score a pad; we score every sample and no pad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from dsl.errors import UserError


class Oracle(Protocol):
    """Scores one batch: (Σ nll in nats, number of scored tokens)."""

    def score(self, batch: Sequence[Any]) -> tuple[float, int]: ...


def genppl(oracle: Oracle, items: Sequence[Any], batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """``{genppl, nll_per_token, n_tokens, n_sequences, impossible, impossible_share}`` of ``items`` (texts
    or id lists, per oracle); ``impossible`` counts samples an exact oracle left out (log P = -inf). When
    every sample is impossible, GenPPL is undefined: ``genppl`` and ``nll_per_token`` are None and
    ``impossible_share`` is 1."""
    items = list(items)
    if not items:
        raise UserError("generative perplexity: no samples to score (empty sample set)")
    if batch_size < 1:
        raise UserError(f"genppl batch_size={batch_size}: must be >= 1")
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="genppl", unit="batch")
    total_nll, total_tokens = 0.0, 0
    impossible_before = getattr(oracle, "impossible", 0)
    for s in starts:
        nll, count = oracle.score(items[s:s + batch_size])
        total_nll += float(nll)
        total_tokens += int(count)
    impossible = getattr(oracle, "impossible", 0) - impossible_before
    counts = {"n_tokens": total_tokens, "n_sequences": len(items), "impossible": impossible,
              "impossible_share": impossible / len(items)}
    if total_tokens == 0:
        if impossible == len(items):
            return {"genppl": None, "nll_per_token": None, **counts}
        raise UserError("generative perplexity: no scorable tokens (every sample is one token or all EOS)")
    per_token = total_nll / total_tokens
    return {"genppl": math.exp(per_token), "nll_per_token": per_token, **counts}


def impossible_note(result: dict[str, Any], judge: str) -> str | None:
    """One line saying how many samples the exact judge ``judge`` gives probability 0, or None if none."""
    k, n = result["impossible"], result["n_sequences"]
    if not k:
        return None
    rest = ("GenPPL is undefined" if k == n else f"GenPPL is over the other {n - k}")
    return f"{k} of {n} samples ({k / n:.0%}) are impossible under {judge} (log P = -inf); {rest}"


def _as_ids(batch: Sequence[Any]) -> torch.Tensor:
    try:
        ids = torch.as_tensor([list(map(int, x)) for x in batch], dtype=torch.long)
    except (TypeError, ValueError):
        raise UserError("this oracle scores token ids: samples need equal-length 'ids' lists") from None
    if ids.dim() != 2 or ids.shape[1] < 1:
        raise UserError(f"token ids must form a (B, L) batch, got shape {tuple(ids.shape)}")
    return ids


class ExactSourceOracle:
    """The synthetic source itself: -log P(x) exactly (forward algorithm), all L tokens counted.

    Parallel unmasking can emit sequences the source cannot (log P = -inf). With ``skip_impossible``
    they are left out of the pool and counted in ``impossible`` (else GenPPL would be infinite for one
    such sample); without it they are an error.
    """

    def __init__(self, source: Any, skip_impossible: bool = True):
        self.source = source
        self.skip_impossible = skip_impossible
        self.impossible = 0

    def score(self, batch: Sequence[Any]) -> tuple[float, int]:
        ids = _as_ids(batch)
        logp = self.source.log_prob(ids)  # (B,) float64, exact
        ok = torch.isfinite(logp)
        if not ok.all():
            if not self.skip_impossible:
                raise UserError("a sample is impossible under the exact source (log P = -inf): GenPPL is infinite")
            self.impossible += int((~ok).sum())
        return float(-logp[ok].sum()), int(ok.sum()) * ids.shape[1]


class ARCheckpointOracle:
    """An autoregressive checkpoint of ours scoring the generator's own ids (same tokenizer)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model = model.to(device).eval().float()
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, batch: Sequence[Any]) -> tuple[float, int]:
        ids = _as_ids(batch).to(self.device)
        if ids.shape[1] < 2:
            return 0.0, 0
        logits = self.model(ids).float()  # (B, L, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
        return float(nll), ids[:, 1:].numel()


class CausalLMOracle:
    """A Hugging Face causal LM scoring decoded texts under ReMDM's re-tokenisation protocol."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 1024, device: str = "cpu"):
        self.model = model.to(device).eval().float()
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise UserError("the oracle tokenizer has no EOS token (needed for padding and EOS weights)")
        self.eos = int(tokenizer.eos_token_id)
        self.max_length = int(max_length)
        self.device = torch.device(device)

    @classmethod
    def load(cls, name_or_path: str, max_length: int = 1024, device: str = "cpu") -> CausalLMOracle:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from dsl.eval.featurizers import hub_offline

            offline = hub_offline()
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=offline)
        except Exception as exc:
            raise UserError(f"oracle={name_or_path!r}: cannot load the causal LM ({type(exc).__name__}); offline, "
                            f"pass a local model directory (e.g. a saved gpt2-large) or oracle=none") from None
        return cls(model, tok, max_length=max_length, device=device)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-tokenised (B, T) ids padded with EOS and the (B, T-1) weights of targets 1..T-1."""
        rows = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                              max_length=self.max_length)["input_ids"]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        real = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        is_eos = ids == self.eos
        first_eos = is_eos & (is_eos.cumsum(-1) == 1)  # cumsum from position 0, as ReMDM
        # ReMDM weights (~EOS | first EOS) over the padded row, so a text without EOS would get its
        # first pad scored; its samples all have length 1024 so that never happens there. We score pads
        # never, which keeps a text's score independent of the batch it lands in.
        weight = real & ((~is_eos) | first_eos)
        return ids, weight[:, 1:]  # the first token is never scored

    @torch.no_grad()
    def score(self, batch: Sequence[Any]) -> tuple[float, int]:
        if not all(isinstance(t, str) for t in batch):
            raise UserError("a Hugging Face oracle scores texts: samples need a 'text' field")
        ids, weight = self.encode(batch)
        ids, weight = ids.to(self.device), weight.to(self.device)
        if ids.shape[1] < 2:
            return 0.0, 0
        # right padding under a causal mask: real tokens never see the pads, so no attention mask needed
        logits = self.model(input_ids=ids).logits.float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return float((nll.double() * weight).sum()), int(weight.sum())


__all__ = ["ARCheckpointOracle", "CausalLMOracle", "ExactSourceOracle", "Oracle", "genppl", "impossible_note"]
