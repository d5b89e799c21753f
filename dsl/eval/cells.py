"""One Table 1 cell's numbers from its samples: the single computation every grid uses.

A cell (a row × a step budget T, Sec 6.2 Table 1) is scored from the token ids it drew:

* GenPPL under the judge (Sec 6.1 "Metrics"): an exact source (``oracle:*``) gives every sample's exact
  −log P, so the cell also gets the mean NLL per token ± its standard error over samples and the count
  and share of samples the source gives probability 0 (left out of the NLL, never hidden); a model judge
  (GPT-2 Large, a local causal LM, an AR checkpoint) gives the pooled GenPPL (:mod:`dsl.eval.genppl`);
* MAUVE against reference features computed once per grid: the headline value at the first k-means seed
  (mauve-text's 25), the mean ± std over the seeds, and optionally the std over bootstrap resamples of
  the samples (what another draw of as many samples would move it by);
* sentence entropy (mean per-sample token entropy), NFE and rewrites per token (eq. 25) of the sampler.

Featurizers: a text featurizer (``minilm``, ``gpt2-large``, a local HF dir; in-process or a
:class:`dsl.service.mauve_pool.MauvePool`) on the decoded texts, or ``source-stats``
(:class:`SourceStatsFeaturizer`) on the ids of an HMM-structured synthetic language.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dsl.errors import UserError

SOURCE_STATS = "source-stats"


def nll_stats(source: Any, ids: torch.Tensor) -> dict[str, Any]:
    """Exact per-sample NLL per token under ``source``: mean ± standard error, GenPPL (exp of the mean;
    the samples have one length, so it equals the pooled GenPPL), the impossible count and share."""
    logp = source.log_prob(torch.as_tensor(ids).long())  # (n,) float64, exact
    ok = torch.isfinite(logp)
    n, length = ids.shape
    impossible = int((~ok).sum())
    out: dict[str, Any] = {"n_samples": n, "impossible": impossible, "impossible_share": impossible / n}
    per_token = (-logp[ok] / length).numpy()
    if len(per_token):
        out.update(nll_per_token=float(per_token.mean()),
                   nll_se=float(per_token.std(ddof=1) / math.sqrt(len(per_token))) if len(per_token) > 1 else 0.0,
                   genppl=float(math.exp(per_token.mean())))
    else:
        out.update(nll_per_token=math.inf, nll_se=math.nan, genppl=math.inf)
    return out


class SourceStatsFeaturizer:
    """Features of a sequence under an exact HMM-structured source (the ``source-stats`` featurizer).

    Reading chosen: the expected complete-data sufficient statistics of the HMM given x, i.e. what an
    EM step would read from the sequence: word frequencies (W) and transition statistics
    Σ_i p(s_i | x) p(s_{i+1} | x)ᵀ / (L-1) (S², the product of the exact posterior marginals standing in
    for the pair marginals). They see word order, topic changes and grammar, cost one forward-backward,
    and need no text model. A sequence the source cannot emit (a sparse HMM) has no state posterior: its
    transition statistics are zero, which sets it apart from every sequence the source can emit.
    """

    name = SOURCE_STATS

    def __init__(self, source: Any):
        if not hasattr(source, "state_posterior"):
            raise UserError(f"eval.featurizer={SOURCE_STATS} needs an HMM-structured source (oracle:hmm, "
                            f"oracle:topics), not {type(source).__name__}; use eval.featurizer=minilm")
        self.source = source

    def features(self, ids: torch.Tensor) -> np.ndarray:
        ids = torch.as_tensor(ids).long()
        b, length = ids.shape
        words = torch.nn.functional.one_hot(ids, self.source.n_words).double().mean(1)  # (B, W)
        post = self.source.state_posterior(ids)  # (B, L, S)
        pairs = torch.einsum("bls,blt->bst", post[:, :-1], post[:, 1:]).reshape(b, -1) / max(1, length - 1)
        pairs = torch.nan_to_num(pairs, nan=0.0, posinf=0.0, neginf=0.0)   # impossible rows: no posterior
        return torch.cat([words, pairs], dim=1).float().numpy()


def mauve_with_errors(ref: np.ndarray, feats: np.ndarray, seeds: Sequence[int], resamples: int = 0,
                      seed: int = 0, num_buckets: int | str = "auto") -> dict[str, Any]:
    """MAUVE of sample features ``feats`` against reference features ``ref``: the headline value at the
    first of ``seeds``, mean ± std over all seeds, and the std over ``resamples`` bootstrap draws of the
    samples (headline seed; NaN for fewer than two resamples)."""
    from dsl.eval.mauve import mauve_score

    base = mauve_score(ref, feats, seeds=seeds, num_buckets=num_buckets)
    boots = []
    gen = np.random.default_rng(seed)
    for _ in range(resamples):
        pick = gen.integers(0, len(feats), len(feats))
        boots.append(mauve_score(ref, feats[pick], seeds=list(seeds)[:1], num_buckets=num_buckets)["mean"])
    return {"mauve": base["values"][0], "mauve_mean": base["mean"], "mauve_std": base["std"],
            "mauve_values": base["values"], "mauve_buckets": base["num_buckets"],
            "mauve_std_resamples": float(np.std(boots, ddof=1)) if len(boots) > 1 else math.nan,
            "mauve_warnings": base.get("warnings", [])}


def judge_stats(judge: Any, ids: torch.Tensor, texts: Sequence[str], batch_size: int = 8) -> dict[str, Any]:
    """GenPPL of the samples under ``judge``: an exact source (``.source.log_prob``) → :func:`nll_stats`;
    a model judge → the pooled GenPPL of :func:`dsl.eval.genppl.genppl` (ids for our AR checkpoints,
    texts for a Hugging Face causal LM); ``None`` → nothing."""
    if judge is None:
        return {}
    source = getattr(judge, "source", None)
    if source is not None and hasattr(source, "log_prob"):
        return nll_stats(source, ids)
    from dsl.eval.genppl import ARCheckpointOracle, genppl

    items = ids.tolist() if isinstance(judge, ARCheckpointOracle) else list(texts)
    res = genppl(judge, items, batch_size)
    return {"genppl": res["genppl"] if res["genppl"] is not None else math.inf,
            "nll_per_token": res["nll_per_token"] if res["nll_per_token"] is not None else math.inf,
            "impossible": res["impossible"], "impossible_share": res["impossible_share"]}


def score_cell(ids: torch.Tensor, *, mauve: Any, judge: Any = None, texts: Sequence[str] = (),
               genppl_batch: int = 8) -> dict[str, Any]:
    """The quality numbers of one cell's samples (``ids`` (n, L); ``texts`` their decoding).

    ``mauve(ids, texts) -> dict`` is the grid's MAUVE against its reference features (see
    :func:`mauve_with_errors`); ``judge`` an exact source oracle, a model judge or None."""
    from dsl.eval.entropy import sentence_entropy

    ids = torch.as_tensor(ids).long()
    out: dict[str, Any] = {"n_samples": int(ids.shape[0])}
    out.update(judge_stats(judge, ids, texts, genppl_batch))
    out["sentence_entropy"] = sentence_entropy(ids.tolist())
    out.update(mauve(ids, texts))
    return out


def sampler_stats(nfe: torch.Tensor, mean_rewrites: torch.Tensor, eta_cap: float | None,
                  eta_cap_source: str) -> dict[str, Any]:
    """NFE (mean real denoiser forwards per sample) and rewrites per token (eq. 25's (1/L) Σ_i R_i, mean
    over samples) of one cell's draw, and the η_cap it used."""
    return {"nfe": float(torch.as_tensor(nfe).double().mean()),
            "rewrites_per_token": float(torch.as_tensor(mean_rewrites).double().mean()),
            "eta_cap": eta_cap, "eta_cap_source": eta_cap_source}


__all__ = ["SOURCE_STATS", "nll_stats", "SourceStatsFeaturizer", "mauve_with_errors", "judge_stats", "score_cell",
           "sampler_stats"]
