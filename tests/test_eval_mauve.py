"""MAUVE on real English text with the offline featurizer, cache and edge cases.

Texts are short web-text excerpts (~60 tokens) so 2,000 texts featurize in well under a minute on 2
cores; features are computed once per module and shared.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dsl.errors import UserError
from dsl.eval.feature_cache import cache_key
from dsl.eval.featurizers import get_featurizer
from dsl.eval.mauve import ReferenceSet, chunk_words, evaluate_mauve, mauve_score, read_records

DATA = "/work/shared/data"
N = 500


def _shuffle_words(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def feats():
    # two threads for these 2,000 MiniLM forwards only: the count is per process, and the tests after this
    # module keep the one thread tests/conftest.py sets
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        web = [r["text"] for r in read_records(f"{DATA}/webtext.valid.63tok.jsonl")]
        shakespeare = chunk_words([r["text"] for r in read_records(f"{DATA}/tinyshakespeare.txt")], 45)
        fz = get_featurizer("minilm", max_length=128, batch_size=64)
        return {
            "web_a": fz.featurize(web[:N]),
            "web_b": fz.featurize(web[N:2 * N]),
            "web_b_shuffled": fz.featurize(_shuffle_words(web[N:2 * N], seed=0)),
            "shakespeare": fz.featurize(shakespeare[:N]),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scores(feats):
    """The three acceptance comparisons, 3 k-means seeds each (25, 26, 27), computed once."""
    return {name: mauve_score(feats["web_a"], feats[name]) for name in ("web_b", "web_b_shuffled", "shakespeare")}


@pytest.mark.slow
def test_same_corpus_halves_score_high(scores):
    r = scores["web_b"]
    assert r["mean"] > 0.9
    assert len(r["values"]) == 3 and r["num_buckets"] == 50


@pytest.mark.slow
def test_word_shuffled_text_scores_low(scores):
    # the offline featurizer must see word order (MiniLM's last layer is blind to it: dsl/eval/featurizers.py)
    assert scores["web_b_shuffled"]["mean"] < 0.3


@pytest.mark.slow
def test_different_corpora_score_near_zero(scores):
    assert scores["shakespeare"]["mean"] < 0.1


@pytest.mark.slow
def test_std_over_seeds_is_reported(scores):
    for r in scores.values():
        assert r["std"] == pytest.approx(float(np.std(r["values"], ddof=1)))
        assert r["mean"] == pytest.approx(float(np.mean(r["values"])))
    assert len(set(scores["web_b"]["values"])) > 1  # k-means seeds really differ


@pytest.mark.slow
def test_one_seed_reproduces_its_value_in_the_mean(feats, scores):
    one = mauve_score(feats["web_a"], feats["web_b"], seeds=(26,))
    assert one["values"] == [scores["web_b"]["values"][1]] and one["std"] == 0.0


@pytest.mark.slow
def test_num_buckets_rule_and_override(feats):
    assert mauve_score(feats["web_a"][:100], feats["web_b"][:80], seeds=(25,))["num_buckets"] == 8
    assert mauve_score(feats["web_a"][:100], feats["web_b"][:100], seeds=(25,), num_buckets=5)["num_buckets"] == 5
    with pytest.raises(UserError, match="num_buckets"):
        mauve_score(feats["web_a"], feats["web_b"], num_buckets="many")


# --------------------------------------------------------------------------------------------
# Reference sets, length matching, cache.


class CountingFeaturizer:
    """The real MiniLM featurizer, counting the texts it featurizes."""

    def __init__(self, max_length: int):
        self.inner = get_featurizer("minilm", max_length=max_length, batch_size=64)
        self.name, self.max_length = self.inner.name, self.inner.max_length
        self.content_length, self.identity = self.inner.content_length, self.inner.identity
        self.texts_featurized = 0

    def featurize(self, texts, progress=False):
        self.texts_featurized += len(texts)
        return self.inner.featurize(texts, progress)

    def token_lengths(self, texts):
        return self.inner.token_lengths(texts)

    def truncate(self, texts, n_tokens):
        return self.inner.truncate(texts, n_tokens)


@pytest.fixture(scope="module")
def web_pool():
    return [r["text"] for r in read_records(f"{DATA}/webtext.valid.63tok.jsonl")][:200]


def test_reference_draw_is_without_replacement_and_seeded(web_pool):
    a = ReferenceSet.draw(web_pool, 150, seed=1)
    b = ReferenceSet.draw(web_pool, 150, seed=1)
    c = ReferenceSet.draw(web_pool, 150, seed=2)
    assert a.texts == b.texts and a.texts != c.texts
    assert len(set(a.texts)) == 150 and set(a.texts) <= set(web_pool)
    with pytest.raises(UserError, match="fewer than the 201 needed"):
        ReferenceSet.draw(web_pool, 201, seed=1)


def test_cached_features_are_reused_and_invalidated(web_pool, tmp_path):
    cache = str(tmp_path / "cache")
    fz = CountingFeaturizer(max_length=64)
    refs = ReferenceSet.draw(web_pool, 40, seed=0, cache=cache)
    first = refs.features(fz)
    assert fz.texts_featurized == 40
    # a second run (a fresh object, as in a new process) computes nothing and reads the same values
    again = ReferenceSet.draw(web_pool, 40, seed=0, cache=cache)
    second = again.features(fz)
    assert fz.texts_featurized == 40 and again.computed == 0
    np.testing.assert_array_equal(first, second)
    # another max length, another token budget or other texts are other entries
    other_len = CountingFeaturizer(max_length=32)
    again.features(other_len)
    assert other_len.texts_featurized == 40
    again.features(fz, n_tokens=10)
    assert fz.texts_featurized == 80
    ReferenceSet.draw(web_pool, 40, seed=5, cache=cache).features(fz)
    assert fz.texts_featurized == 120


def test_cache_entry_from_other_inputs_is_not_trusted(web_pool, tmp_path):
    from dsl.storage import open_storage

    cache = str(tmp_path / "cache")
    fz = CountingFeaturizer(max_length=64)
    refs = ReferenceSet.draw(web_pool, 20, seed=0, cache=cache)
    good = refs.features(fz)
    key = cache_key(fz, refs.texts)
    storage = open_storage(cache)
    storage.put_bytes(key, b"garbage, as if a partial write had happened")
    np.testing.assert_array_equal(refs.features(fz), good)
    assert fz.texts_featurized == 40  # recomputed instead of trusting the broken entry


def test_failed_featurization_leaves_no_cache_entry(web_pool, tmp_path):
    from dsl.storage import open_storage

    class Failing(CountingFeaturizer):
        def featurize(self, texts, progress=False):
            raise RuntimeError("worker died")

    cache = str(tmp_path / "cache")
    refs = ReferenceSet.draw(web_pool, 20, seed=0, cache=cache)
    with pytest.raises(RuntimeError):
        refs.features(Failing(max_length=64))
    assert open_storage(cache).list("") == []


def test_length_matching_cuts_both_sets_and_is_recorded(web_pool):
    fz = get_featurizer("minilm", max_length=128)
    samples = fz.truncate(web_pool[:20], 12)  # short "samples" against full-length references
    refs = ReferenceSet.draw(web_pool[20:], 30, seed=0)
    r = evaluate_mauve(samples, refs, fz, seeds=(25,), num_buckets=2)
    assert r["length_budget"] == 12
    assert r["n_samples"] == 20 and r["n_reference"] == 30 and r["featurizer"] == "minilm"
    assert max(fz.token_lengths(fz.truncate(refs.texts, r["length_budget"]))) <= 12


def test_truncate_keeps_original_characters():
    fz = get_featurizer("minilm", max_length=128)
    text = "The Quick brown fox, obviously, jumped."
    cut = fz.truncate([text], 3)[0]
    assert text.startswith(cut) and fz.token_lengths([cut]) == [3]


def test_bad_inputs_are_one_clear_line(web_pool, tmp_path):
    fz = get_featurizer("minilm", max_length=64)
    refs = ReferenceSet.draw(web_pool, 5, seed=0)
    with pytest.raises(UserError, match="at least as large"):
        evaluate_mauve(web_pool[:10], refs, fz)
    with pytest.raises(UserError, match="empty"):
        evaluate_mauve([], refs, fz)
    with pytest.raises(UserError, match="unknown featurizer 'bert-huge'"):
        get_featurizer("bert-huge")
    with pytest.raises(UserError, match="file not found"):
        read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="empty"):
        fz.featurize(["fine", "  "])


def test_a_score_at_the_floor_and_too_few_points_per_bucket_each_get_one_warning(capfd, caplog):
    """Disjoint sets score mauve-text's floor (0.0041 at c=5, 25 curve points) whatever their distance;
    100 + 100 points in K=10 buckets is below faiss's 39 per bucket. Faiss's own message goes to the log."""
    import logging

    from dsl.eval.mauve import mauve_floor

    rng = np.random.default_rng(0)
    p = rng.normal(size=(100, 8)).astype(np.float32)
    q = p.copy()
    p[:, 0] += 50.0
    q[:, 1] += 50.0  # another direction (MAUVE L2-normalises): no bucket holds both
    caplog.set_level(logging.INFO, logger="dsl.eval.mauve")
    result = mauve_score(p, q, seeds=(25, 26), num_buckets=10)
    assert result["values"] == pytest.approx([mauve_floor()] * 2, abs=1e-9)
    assert mauve_floor() == pytest.approx(0.004072, abs=1e-6)
    floor, few = result["warnings"]
    assert "at its floor 0.0041" in floor and "K=10 buckets on 100 samples + 100 references" in few
    assert "\n" not in floor + few
    assert "please provide at least" not in capfd.readouterr().err
    assert any("please provide at least" in r.getMessage() for r in caplog.records)
    close = mauve_score(p, p + rng.normal(scale=0.001, size=p.shape).astype(np.float32), seeds=(25,), num_buckets=2)
    assert close["warnings"] == [] and close["mean"] > 0.9
