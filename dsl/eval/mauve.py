"""MAUVE between generated samples and a fixed reference set (Sec 6.1 "Metrics", App C.2).

We compute features ourselves (``dsl.eval.featurizers``) and hand them to mauve-text's
``compute_mauve(p_features=..., q_features=...)``; everything else is the library's default unless
overridden, as ReMDM's ``main.py`` calls it (L2-normalise, PCA to 90 % variance, faiss k-means with 5
redos × 500 iterations, c = 5, 25-point divergence curve). Two departures from ReMDM's script, both
deliberate:

- k-means seed variance (≈0.005–0.01, krishnap25/mauve#11) is as large as reported method gaps, so a
  score is the mean ± std over several seeds (default 25, 26, 27; 25 is the library's default);
- references are drawn *without* replacement with a seed (ReMDM's ``main.py`` draws with replacement by
  accident: a fresh shuffled validation iterator per reference) and both sets are cut to one token
  budget (yxuansu/SimCTG#7: MAUVE collapses when lengths differ); the budget is recorded with the score.

Reference features are cached by :mod:`dsl.eval.feature_cache`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch  # noqa: F401  -- before mauve/faiss: the other order can crash OpenMP (facebookresearch/faiss#3401)

from dsl.errors import UserError
from dsl.eval.feature_cache import cached_features
from dsl.utf8 import read_utf8, utf8_lines

log = logging.getLogger(__name__)
DEFAULT_SEEDS = (25, 26, 27)


class Featurizer(Protocol):
    name: str
    max_length: int
    content_length: int
    identity: str

    def featurize(self, texts: list[str], progress: bool = False) -> np.ndarray: ...

    def token_lengths(self, texts: list[str]) -> list[int]: ...

    def truncate(self, texts: list[str], n_tokens: int) -> list[str]: ...


# ----------------------------------------------------------------------------------------------
# The score.


def resolve_num_buckets(num_buckets: int | str, n_p: int, n_q: int) -> int:
    """mauve-text's rule: 'auto' = max(2, round(min(n_p, n_q) / 10)) (K=500 for 5k samples)."""
    if num_buckets == "auto":
        return max(2, int(round(min(n_p, n_q) / 10)))
    try:
        k = int(num_buckets)
    except (TypeError, ValueError):
        raise UserError(f"num_buckets={num_buckets!r}: expected 'auto' or a positive integer") from None
    if k < 2 or k > n_p + n_q:
        raise UserError(f"num_buckets={k}: expected 2..{n_p + n_q} (at most the number of feature vectors)")
    return k


# faiss's k-means asks for this many training points per centroid (faiss/Clustering.cpp,
# min_points_per_centroid) and prints a warning below it; MAUVE clusters the samples and references together.
FAISS_POINTS_PER_BUCKET = 39


@functools.cache
def mauve_floor(scaling_factor: float = 5.0, discretization: int = 25) -> float:
    """The smallest MAUVE mauve-text can return: the score of two histograms with disjoint support (every
    sample and every reference in different k-means buckets), on mauve-text's own divergence curve."""
    import importlib

    from sklearn.metrics import auc

    curve = importlib.import_module("mauve.compute_mauve").get_divergence_curve_for_multinomials
    x, y = curve(np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.linspace(1e-6, 1 - 1e-6, discretization),
                 scaling_factor).T
    return float(0.5 * (auc(x[np.argsort(x)], y[np.argsort(x)]) + auc(y[np.argsort(y)], x[np.argsort(y)])))


def mauve_warnings(values: Sequence[float], n_p: int, n_q: int, k: int, scaling_factor: float = 5.0,
                   discretization: int = 25) -> list[str]:
    """One line each for what makes a MAUVE score hard to read: a score at the floor (the sets do not
    share a single k-means bucket: nothing finer can be ranked), and a clustering with fewer points per
    bucket than faiss asks for (the buckets, and so the score, move with the k-means seed)."""
    out = []
    floor = mauve_floor(scaling_factor, discretization)
    if max(values) <= floor * 1.01:
        out.append(f"MAUVE {np.mean(values):.4f} is at its floor {floor:.4f}: samples and references share no "
                   f"k-means bucket, so this score cannot rank these samples (more samples, or a featurizer that "
                   f"separates less, would)")
    points = n_p + n_q
    if points < FAISS_POINTS_PER_BUCKET * k:
        out.append(f"MAUVE with K={k} buckets on {n_q} samples + {n_p} references: {points / k:.0f} points per "
                   f"bucket, fewer than the {FAISS_POINTS_PER_BUCKET} faiss's k-means asks for, so the buckets move "
                   f"with the k-means seed (read mauve_std; at least {-(-FAISS_POINTS_PER_BUCKET * k // 2)} of each, "
                   f"or a smaller eval.num_buckets, would be steadier)")
    return out


@contextlib.contextmanager
def native_stderr_to_log(what: str):
    """Send what native code (faiss's k-means) writes to file descriptor 2 during the block to the log
    (``dsl.eval.mauve`` at INFO), not to the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    log.info("%s: %s", what, line.strip())


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seeds: Sequence[int] = DEFAULT_SEEDS,
                num_buckets: int | str = "auto", **mauve_kwargs: Any) -> dict[str, Any]:
    """MAUVE(P, Q) for each k-means seed → ``{mean, std, values, num_buckets, warnings}``.

    ``p_features`` are the references (mauve-text's P), ``q_features`` the samples. ``std`` is the
    sample standard deviation over seeds (0 for one seed); ``warnings`` are :func:`mauve_warnings`' lines.
    """
    import mauve

    p = np.ascontiguousarray(p_features, dtype=np.float32)
    q = np.ascontiguousarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise UserError(f"MAUVE features must be (n, d) with the same d; got {p.shape} and {q.shape}")
    if len(p) < 2 or len(q) < 2:
        raise UserError(f"MAUVE needs at least 2 samples and 2 references; got {len(q)} and {len(p)}")
    if not seeds:
        raise UserError("seeds: give at least one k-means seed (e.g. 25,26,27)")
    for bad in ("p_text", "q_text", "p_tokens", "q_tokens", "seed", "p_features", "q_features"):
        if bad in mauve_kwargs:
            raise UserError(f"mauve option {bad!r} is set by dsl.eval.mauve itself; remove it")
    k = resolve_num_buckets(num_buckets, len(p), len(q))
    mauve_kwargs.setdefault("device_id", -1)
    mauve_kwargs.setdefault("verbose", False)
    with native_stderr_to_log("faiss"):
        values = [float(mauve.compute_mauve(p_features=p, q_features=q, num_buckets=k, seed=int(s),
                                            **mauve_kwargs).mauve) for s in seeds]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    warnings = mauve_warnings(values, len(p), len(q), k, mauve_kwargs.get("mauve_scaling_factor", 5.0),
                              mauve_kwargs.get("divergence_curve_discretization_size", 25))
    return {"mean": float(np.mean(values)), "std": std, "values": values, "num_buckets": k, "warnings": warnings}


# ----------------------------------------------------------------------------------------------
# Reading texts.


def read_records(path: str, text_field: str = "text") -> list[dict[str, Any]]:
    """Records ``{"text": str, ["ids": list[int]], ["settings": dict]}`` from a file.

    ``.jsonl``/``.json`` lines: one JSON object per line with ``text_field`` (and optionally ``ids`` and
    the sampler ``settings``, as jobs/sample.py writes them). ``.txt``: documents separated by ``<|endoftext|>`` if the file has
    any, else one document per non-empty line.
    """
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path!r} (expected a .jsonl with a {text_field!r} field or a .txt)")
    records: list[dict[str, Any]] = []
    if path.endswith((".jsonl", ".json")):
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno}: not a JSON line (expected one object per line)") from None
            if not isinstance(obj, dict) or (text_field not in obj and "ids" not in obj):
                raise UserError(f"{path}:{lineno}: needs a {text_field!r} field (or 'ids')")
            rec: dict[str, Any] = {"text": obj.get(text_field)}
            if "settings" in obj:
                rec["settings"] = obj["settings"]
            if "ids" in obj:
                ids = obj["ids"]
                if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                        for i in ids):
                    raise UserError(f"{path}:{lineno}: 'ids' must be a list of token ids (integers >= 0)")
                rec["ids"] = ids
            records.append(rec)
    elif path.endswith(".txt"):
        body = read_utf8(path)
        docs = body.split("<|endoftext|>") if "<|endoftext|>" in body else body.splitlines()
        records = [{"text": d.strip()} for d in docs if d.strip()]
    else:
        raise UserError(f"{path!r}: unsupported file type; expected .jsonl (field {text_field!r}) or .txt")
    if not records:
        raise UserError(f"{path!r} holds no texts")
    return records


def chunk_words(texts: Sequence[str], words: int) -> list[str]:
    """Concatenate ``texts`` and cut the word stream into consecutive ``words``-word chunks (the tail
    shorter than ``words`` is dropped): turns line-per-verse corpora into comparable passages."""
    stream = " ".join(texts).split()
    return [" ".join(stream[i:i + words]) for i in range(0, len(stream) - words + 1, words)]


# ----------------------------------------------------------------------------------------------
# Reference sets with cached features.


class ReferenceSet:
    """A fixed set of reference texts and, per featurizer, their cached features.

    Build it with :meth:`draw` (``n`` texts drawn without replacement, seeded) or :meth:`from_spec`
    (a file or ``hf:<dataset>[:<config>]``, as stored documents or as MDLM's wrapped blocks).
    ``cache`` is a storage URI (local dir or ``s3://``); '' turns caching off. ``computed`` counts
    featurizations this object ran (0 = all from cache). ``eot`` is the text rule its texts went through
    (:func:`dsl.eval.references.apply_eot_rule`); ``layout`` says what one text is.
    """

    def __init__(self, texts: Sequence[str], *, origin: str = "", seed: int | None = None, cache: str = "",
                 eot: str = "keep", layout: str = "documents"):
        self.texts = list(texts)
        if not self.texts:
            raise UserError(f"reference set {origin!r} is empty; give a file or dataset with texts")
        self.origin = origin
        self.seed = seed
        self.cache = cache
        self.eot = eot
        self.layout = layout
        self.computed = 0

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def draw(cls, pool: Sequence[str], n: int, seed: int, *, origin: str = "", cache: str = "",
             eot: str = "keep") -> ReferenceSet:
        """``n`` texts of ``pool`` drawn without replacement by a seeded permutation (then the ``eot`` rule)."""
        from dsl.eval.references import apply_eot_rule

        pool = [t for t in pool if isinstance(t, str) and t.strip()]
        if n < 1:
            raise UserError(f"number of references must be >= 1, got {n}")
        if n > len(pool):
            raise UserError(f"reference {origin or 'pool'} has {len(pool)} texts, fewer than the {n} needed; "
                            f"use a larger reference corpus or fewer samples")
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(pool), generator=gen)[:n].tolist()
        return cls(apply_eot_rule([pool[i] for i in order], eot), origin=origin, seed=seed, cache=cache, eot=eot)

    @classmethod
    def from_spec(cls, spec: str, n: int, seed: int, *, cache: str = "", text_field: str = "text",
                  split: str = "", words_per_text: int = 0, blocks: int = 0, tokenizer: Any = None,
                  heldout_docs: int = 100_000, eot: str = "keep", progress: bool = False) -> ReferenceSet:
        """References from a .jsonl/.txt file (its texts) or ``hf:<dataset>[:<config>]`` (the documents of
        ``split``; '' = MDLM's held-out split, :func:`dsl.data.corpora.heldout_split`).

        ``blocks`` > 0: MDLM's layout — the documents wrapped by ``tokenizer`` into ``blocks``-token
        ``[BOS] … [EOS]`` blocks, ``n`` of them drawn without replacement, each decoded with its special
        tokens; ``words_per_text`` > 0 instead cuts the document stream into passages of that many words."""
        from dsl.eval.references import apply_eot_rule, load_documents, sample_blocks

        if blocks > 0 and words_per_text > 0:
            raise UserError("eval.reference_blocks and eval.words_per_reference are two layouts; set one")
        if spec.startswith("hf:"):
            docs, split = load_documents(spec, split, text_field, heldout_docs)
            origin = f"{spec}[{split}]"
        elif blocks > 0:
            raise UserError(f"eval.reference={spec}: wrapped reference blocks are drawn from a dataset's held-out "
                            f"split; give hf:<dataset> or hf:<local dataset dir or file>")
        else:
            docs = (r["text"] for r in read_records(spec, text_field) if isinstance(r.get("text"), str))
            origin = spec
        if blocks > 0:
            if tokenizer is None:
                raise UserError("wrapped reference blocks need the samples' tokenizer (eval.reference_tokenizer)")
            kept, total = sample_blocks(docs, tokenizer, blocks, n, seed, progress)
            texts = apply_eot_rule([tokenizer.decode(b) for b in kept], eot)
            return cls(texts, origin=origin, seed=seed, cache=cache, eot=eot,
                       layout=f"{blocks}-token wrapped blocks (n of {total})")
        pool = list(docs)
        if words_per_text > 0:
            pool = chunk_words(pool, words_per_text)
        return cls.draw(pool, n, seed, origin=origin, cache=cache, eot=eot)

    def features(self, featurizer: Featurizer, n_tokens: int | None = None, progress: bool = False) -> np.ndarray:
        """(n, d) features of the texts cut to ``n_tokens`` tokens (None = uncut), from cache if there."""
        texts = self.texts if n_tokens is None else featurizer.truncate(self.texts, n_tokens)
        if not self.cache:
            self.computed += 1
            return featurizer.featurize(texts, progress=progress)
        feats, computed = cached_features(self.cache, featurizer, texts, progress)
        self.computed += computed
        return feats


# ----------------------------------------------------------------------------------------------
# Samples against references, lengths matched.


def length_budget(featurizer: Featurizer, samples: Sequence[str], references: Sequence[str]) -> int:
    """Token budget both sets are cut to: the shorter of the two sets' longest text, within what the
    featurizer reads. Our reading of "matching token lengths" (yxuansu/SimCTG#7): fixed-length samples
    keep their length and long reference documents are cut to it."""
    longest_sample = max(featurizer.token_lengths(list(samples)))
    longest_ref = max(featurizer.token_lengths(list(references)))
    return max(1, min(featurizer.content_length, longest_sample, longest_ref))


def evaluate_mauve(samples: Sequence[str], references: ReferenceSet, featurizer: Featurizer, *,
                   seeds: Sequence[int] = DEFAULT_SEEDS, num_buckets: int | str = "auto",
                   match_length: bool = True, n_tokens: int = 0, progress: bool = False,
                   **mauve_kwargs: Any) -> dict[str, Any]:
    """MAUVE of ``samples`` against the whole reference set, which must be at least as large.

    The samples go through the reference set's text rule (``references.eot``) first, so P and Q are
    decoded alike; ``mauve`` is the score at the first seed (the headline), ``mean``/``std`` over all.
    ``n_tokens`` > 0 fixes the token budget; 0 with ``match_length`` = :func:`length_budget`; without
    ``match_length`` texts are only cut at the featurizer's max length.
    """
    from dsl.eval.references import apply_eot_rule, eot_share

    samples = apply_eot_rule(list(samples), references.eot)
    if not samples:
        raise UserError("no samples to evaluate (the sample set is empty)")
    if len(references) < len(samples):
        raise UserError(f"{len(references)} references for {len(samples)} samples: the reference set must be "
                        f"at least as large; use more references or fewer samples")
    if n_tokens > 0:
        budget: int | None = min(n_tokens, featurizer.content_length)
    elif match_length:
        budget = length_budget(featurizer, samples, references.texts)
    else:
        budget = None
    cut = samples if budget is None else featurizer.truncate(samples, budget)
    p = references.features(featurizer, budget, progress=progress)
    q = featurizer.featurize(cut, progress=progress)
    result = mauve_score(p, q, seeds=seeds, num_buckets=num_buckets, **mauve_kwargs)
    result.update(
        mauve=result["values"][0], headline_seed=int(seeds[0]), length_budget=budget,
        sample_tokens_mean=float(np.mean(featurizer.token_lengths(cut))),
        n_samples=len(samples), n_reference=len(references), featurizer=featurizer.name,
        max_length=featurizer.max_length, seeds=list(seeds), eot=references.eot,
        eot_share={"samples": eot_share(samples), "references": eot_share(references.texts)},
        reference_layout=references.layout, reference_origin=references.origin)
    return result


__all__ = ["DEFAULT_SEEDS", "mauve_floor", "mauve_warnings", "native_stderr_to_log", "ReferenceSet", "chunk_words", "evaluate_mauve", "length_budget", "mauve_score",
           "read_records", "resolve_num_buckets"]
