"""Scoring a grid's cells: the judge, the featurizer and the reference features of one grid, computed
once (:class:`GridScorer`), and the one cell computation (:func:`cell_result`) over a draw — sampled
shards, a batch drawn in process, or a data row's exact samples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dsl.config import ConfigError, JobConfig
from dsl.service.grid_spec import DATA_ROW


class GridScorer:
    """The judge, the featurizer and the reference features of one grid (computed once, used by every
    cell): ``scorer.score(ids, texts)`` is :func:`dsl.eval.cells.score_cell` with them. ``source``: the
    exact source ``eval.judge=oracle:*`` names, built from ``data.*`` (None for another judge)."""

    def __init__(self, job: JobConfig, length: int, *, progress: bool = False):
        from dsl.eval.cells import SOURCE_STATS, SourceStatsFeaturizer
        from dsl.eval.protocols import load_judge

        ev = job.eval
        self.job, self.length = job, length
        self.seeds = tuple(ev.mauve_seeds)
        self.source = exact_source(job, length)
        self.judge, _ = load_judge(job, [[0] * length])
        self.n_ref = ev.references or job.sampling.num_samples
        self._close: Callable[[], None] = lambda: None
        if ev.featurizer == SOURCE_STATS:
            if self.source is None:
                raise ConfigError(f"eval.featurizer={SOURCE_STATS} reads an exact source: give eval.judge=oracle:"
                                  f"<hmm|topics>")
            self.featurizer = SourceStatsFeaturizer(self.source)
            self.ref_features = self.featurizer.features(self.reference_ids(self.n_ref))
            self.references = None
            return
        from dsl.eval.mauve import ReferenceSet
        from dsl.eval.protocols import feature_cache
        from dsl.service.mauve_pool import open_featurizer

        cache = feature_cache(ev.feature_cache)
        if ev.reference == "source":
            if self.source is None:
                raise ConfigError("eval.reference=source draws the exact source's samples: give eval.judge=oracle:*")
            texts = [self.source.decode(r) for r in self.reference_ids(self.n_ref)]
            refs = ReferenceSet(texts, origin=f"exact samples of {ev.judge}", cache=cache, eot=ev.eot)
        elif not ev.reference:
            raise ConfigError("eval.reference='' : give eval.reference=<file.jsonl|file.txt|hf:dataset> or "
                              "source (with eval.judge=oracle:*)")
        else:
            tokenizer = None
            if ev.reference_blocks > 0:
                from dsl.eval.references import load_reference_tokenizer

                tokenizer = load_reference_tokenizer(ev.reference_tokenizer)
            refs = ReferenceSet.from_spec(ev.reference, self.n_ref, ev.reference_seed, cache=cache,
                                          text_field=job.data.text_field, split=ev.reference_split,
                                          words_per_text=ev.words_per_reference, blocks=ev.reference_blocks,
                                          tokenizer=tokenizer, heldout_docs=ev.heldout_docs, eot=ev.eot,
                                          progress=progress)
        self.references = _OnceReferences(refs)
        self.featurizer, self._close = open_featurizer(ev.featurizer, ev.workers, ev.max_length,
                                                       gpus_per_worker=ev.gpus_per_worker,
                                                       batch_size=ev.featurize_batch, device=job.service.device,
                                                       ray_address=job.service.ray_address)

    def reference_ids(self, n: int, key: str = "mauve") -> torch.Tensor:
        """``n`` exact samples from a generator keyed apart from every sampling stream."""
        from dsl.seeding import sample_generator

        return self.source.sample(n, sample_generator(self.job.seed, "grid-reference", key))

    def mauve(self, ids: torch.Tensor, texts: Sequence[str]) -> dict[str, Any]:
        from dsl.eval.cells import mauve_with_errors
        from dsl.eval.mauve import evaluate_mauve
        from dsl.eval.protocols import parse_num_buckets

        ev = self.job.eval
        if self.references is None:
            return mauve_with_errors(self.ref_features, self.featurizer.features(ids), self.seeds,
                                     self.job.table.mauve_resamples, self.job.seed, parse_num_buckets(ev.num_buckets))
        res = evaluate_mauve(list(texts), self.references, self.featurizer, seeds=self.seeds,
                             num_buckets=parse_num_buckets(ev.num_buckets), match_length=ev.match_length,
                             n_tokens=ev.length_budget)
        return {"mauve": res["mauve"], "mauve_mean": res["mean"], "mauve_std": res["std"],
                "mauve_values": res["values"], "mauve_buckets": res["num_buckets"], "mauve_std_resamples": math.nan,
                "mauve_warnings": res.get("warnings", [])}

    def score(self, ids: torch.Tensor, texts: Sequence[str]) -> dict[str, Any]:
        from dsl.eval.cells import score_cell

        return score_cell(ids, mauve=self.mauve, judge=self.judge, texts=texts, genppl_batch=self.job.eval.genppl_batch)

    def close(self) -> None:
        self._close()


class _OnceReferences:
    """A reference set whose features are computed once per token budget for the whole grid."""

    def __init__(self, refs: Any):
        self._refs = refs
        self._memo: dict[Any, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._refs, name)

    def __len__(self) -> int:
        return len(self._refs)

    def features(self, featurizer: Any, n_tokens: int | None = None, progress: bool = False) -> np.ndarray:
        if n_tokens not in self._memo:
            self._memo[n_tokens] = self._refs.features(featurizer, n_tokens, progress)
        return self._memo[n_tokens]


def exact_source(job: JobConfig, length: int) -> Any:
    """The exact source of ``eval.judge=oracle:*`` at length L (None for another judge)."""
    if not job.eval.judge.startswith("oracle:"):
        return None
    from dsl.sources import build_source

    return build_source(job.eval.judge.split(":", 1)[1], job.data, length)


def cell_result(draw: dict[str, Any], scorer: GridScorer) -> dict[str, Any]:
    """The one cell computation: the draw's sampler numbers and its samples' scores."""
    from dsl.eval.cells import sampler_stats

    out = sampler_stats(draw["nfe"], draw["mean_rewrites"], draw["eta_cap"], draw["eta_cap_source"])
    out.update(scorer.score(draw["ids"], draw["texts"]))
    return out


def batch_draw(batch: Any, decode: Callable[[Any], str]) -> dict[str, Any]:
    """A draw (what :func:`cell_result` scores) from a :class:`dsl.sampling.SampleBatch` drawn in process."""
    return {"ids": batch.ids.cpu(), "texts": [decode(r) for r in batch.ids], "nfe": batch.nfe.cpu(),
            "mean_rewrites": batch.mean_rewrites, "diagnostics": batch.diagnostics, "settings": batch.settings,
            "eta_cap": batch.eta_cap, "eta_cap_source": batch.eta_cap_source,
            "eta_cap_extrapolation": batch.eta_cap_extrapolation}


def data_draw(scorer: GridScorer, n: int) -> dict[str, Any]:
    """A data row's "draw": ``n`` exact samples of the judge's source, keyed apart from the references."""
    if scorer.source is None:
        raise ConfigError(f"a {DATA_ROW} row draws exact samples of the judge's source: give eval.judge=oracle:*")
    ids = scorer.reference_ids(n, "data-row")
    return {"ids": ids, "texts": [scorer.source.decode(r) for r in ids], "nfe": torch.zeros(n),
            "mean_rewrites": torch.zeros(n), "diagnostics": None, "settings": {"length": int(ids.shape[1])},
            "eta_cap": None, "eta_cap_source": "none", "eta_cap_extrapolation": None}


__all__ = ["GridScorer", "exact_source", "cell_result", "batch_draw", "data_draw"]
