"""Parallel MAUVE: long-lived Ray actors featurize shards of texts; the caller reduces to MAUVE.

Featurization dominates MAUVE's cost (``bench/bench_mauve.py`` times both parts), and mauve-text reloads its model per process,
so each actor loads the featurizer once and keeps it. :meth:`MauvePool.featurize` plans batches exactly
as the single-process featurizer does (``HFFeaturizer.batch_plan``: a function of the texts alone),
deals whole batches to actors round-robin and reassembles rows in input order. Every batch is computed
by the same code on the same padded tensor with the same thread count (``threads_per_worker``,
default 1), so the features are bit-identical to ``get_featurizer(...).featurize`` run in one process
with that many torch threads. The k-means/MAUVE reduction runs in the caller
(``dsl.eval.mauve.mauve_score``) on the gathered features.

The pool is itself a featurizer (``name, max_length, content_length, identity, featurize,
token_lengths, truncate``), so ``ReferenceSet.features(pool)`` caches reference features computed in
parallel, and it pickles (actor handles travel; the local tokenizer is re-made), so Ray Tune trials can
share one pool.

    with ray_session(address):                 # the caller owns the Ray connection
        pool = MauvePool("minilm", num_workers=2, max_length=128)
        result = pool.mauve(sample_texts, ReferenceSet.from_spec(...), seeds=(25, 26, 27))
        pool.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dsl.errors import UserError, one_line
from dsl.eval.mauve import DEFAULT_SEEDS, ReferenceSet, evaluate_mauve, mauve_score


class FeaturizerWorker:
    """The body of one actor: a featurizer whose model loads once, in the actor's process."""

    def __init__(self, featurizer: str, max_length: int, batch_size: int, device: str, threads: int):
        import torch  # first: faiss/torch OpenMP clash in the other order (facebookresearch/faiss#3401)

        torch.set_num_threads(threads)
        from dsl.eval.featurizers import get_featurizer

        self.featurizer = get_featurizer(featurizer, max_length=max_length, device=device, batch_size=batch_size)

    def ready(self) -> int:
        """Loads the weights now (so a bad model fails at pool start) and returns the feature width."""
        return int(self.featurizer.featurize_batch(["warm up"]).shape[1])

    def featurize_batch(self, texts: list[str]) -> np.ndarray:
        return self.featurizer.featurize_batch(texts)


class MauvePool:
    """``num_workers`` featurizer actors (``num_gpus_per_worker`` GPUs each) on the connected Ray cluster."""

    def __init__(self, featurizer: str = "minilm", num_workers: int = 2, max_length: int = 0,
                 num_gpus_per_worker: float = 0, *, batch_size: int = 32, cpus_per_worker: float = 1,
                 threads_per_worker: int = 1):
        import ray

        if num_workers < 1:
            raise UserError(f"MauvePool num_workers={num_workers}: must be >= 1")
        if not ray.is_initialized():
            raise UserError("MauvePool needs a Ray connection: open dsl.service.ray_session.ray_session first "
                            "(or run the evaluation in-process with workers=0)")
        self.featurizer_name = featurizer
        self.num_workers = int(num_workers)
        self.batch_size = int(batch_size)
        self.cpus_per_worker = float(cpus_per_worker)
        self.num_gpus_per_worker = float(num_gpus_per_worker)
        self.threads_per_worker = int(threads_per_worker)
        self._local = None
        self.max_length = max_length  # 0 = the featurizer's default, resolved by the local featurizer
        local = self._tokenizer_side()  # validates the name before any actor starts
        self.name, self.max_length = local.name, local.max_length
        self.content_length, self.identity = local.content_length, local.identity
        device = "cuda" if self.num_gpus_per_worker > 0 else "cpu"  # a GPU actor sees its GPU as cuda:0
        threads = str(self.threads_per_worker)
        actor_cls = ray.remote(FeaturizerWorker)
        self._actors = [
            actor_cls.options(num_cpus=self.cpus_per_worker, num_gpus=self.num_gpus_per_worker,
                              runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                                        "TOKENIZERS_PARALLELISM": "false"}})
            .remote(featurizer, self.max_length, self.batch_size, device, self.threads_per_worker)
            for _ in range(self.num_workers)]
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except Exception as exc:
            self.close()
            cause = getattr(exc, "cause", None) or exc
            raise UserError(f"MauvePool: featurizer {featurizer!r} failed to start in a worker "
                            f"({one_line(cause)[:200]})") from None

    # --- the featurizer interface ----------------------------------------------------------------

    def _tokenizer_side(self):
        """The local featurizer: its tokenizer plans batches and cuts texts; its model never loads here."""
        if self._local is None:
            from dsl.eval.featurizers import get_featurizer

            self._local = get_featurizer(self.featurizer_name, max_length=self.max_length,
                                         batch_size=self.batch_size)
        return self._local

    def token_lengths(self, texts: list[str]) -> list[int]:
        return self._tokenizer_side().token_lengths(texts)

    def truncate(self, texts: list[str], n_tokens: int) -> list[str]:
        return self._tokenizer_side().truncate(texts, n_tokens)

    def featurize(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, d) float32 features, rows in the order of ``texts``; bit-identical to one process."""
        import ray

        from dsl.eval.featurizers import check_texts

        texts = check_texts(list(texts), self.name)
        plan = self._tokenizer_side().batch_plan(texts)
        pending = {self._actors[i % self.num_workers].featurize_batch.remote([texts[j] for j in idx]): idx
                   for i, idx in enumerate(plan)}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan), desc=f"featurize[{self.name} x{self.num_workers}]", unit="batch")
        feats: np.ndarray | None = None
        waiting = list(pending)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                part = ray.get(ref)
                if feats is None:
                    feats = np.empty((len(texts), part.shape[1]), dtype=np.float32)
                feats[pending[ref]] = part
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return feats

    # --- MAUVE ----------------------------------------------------------------------------------

    def mauve(self, samples: Sequence[str], references: ReferenceSet | np.ndarray,
              seeds: Sequence[int] = DEFAULT_SEEDS, num_buckets: int | str = "auto", progress: bool = False,
              **kwargs: Any) -> dict[str, Any]:
        """MAUVE of ``samples`` against a :class:`ReferenceSet` (lengths matched, features cached) or
        against reference features already computed by this pool (texts cut at ``max_length`` only)."""
        if isinstance(references, ReferenceSet):
            return evaluate_mauve(samples, references, self, seeds=seeds, num_buckets=num_buckets,
                                  progress=progress, **kwargs)
        p = np.asarray(references)
        samples = list(samples)
        if not samples:
            raise UserError("no samples to evaluate (the sample set is empty)")
        if p.ndim != 2 or len(p) < len(samples):
            raise UserError(f"reference features {p.shape} for {len(samples)} samples: need an (n_ref, d) array "
                            f"with n_ref >= the number of samples")
        result = mauve_score(p, self.featurize(samples, progress=progress), seeds=seeds, num_buckets=num_buckets,
                             **kwargs)
        result.update(length_budget=None, n_samples=len(samples), n_reference=len(p), featurizer=self.name,
                      max_length=self.max_length, seeds=list(seeds))
        return result

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the actors (idempotent)."""
        import ray

        for actor in getattr(self, "_actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already gone with its cluster
                pass
        self._actors = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_local"] = None  # re-made where the pool is unpickled (a Tune trial)
        return state

    def __enter__(self) -> MauvePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()




def open_featurizer(featurizer: str, workers: int, max_length: int, *, gpus_per_worker: float = 0.0,
                    batch_size: int = 32, device: str = "cpu", ray_address: str = "") -> tuple[Any, Any]:
    """``(featurizer, close)``: in this process when ``workers`` is 0, else a :class:`MauvePool` of
    ``workers`` actors on the Ray cluster at ``ray_address`` (or a private loopback Ray started here and
    stopped by ``close()``)."""
    if workers == 0:
        from dsl.eval.featurizers import get_featurizer

        return get_featurizer(featurizer, max_length, device=device, batch_size=batch_size), lambda: None
    from contextlib import ExitStack

    from dsl.service.ray_session import ray_session

    ray_ctx = ExitStack()
    ray_ctx.enter_context(ray_session(ray_address, cpus=max(1, workers),
                                      temp_prefix="ray-eval-"))
    try:
        pool = MauvePool(featurizer, workers, max_length, gpus_per_worker, batch_size=batch_size)
    except BaseException:
        ray_ctx.close()
        raise

    def close() -> None:
        pool.close()
        ray_ctx.close()

    return pool, close


__all__ = ["FeaturizerWorker", "MauvePool", "open_featurizer"]
