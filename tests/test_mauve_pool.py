"""The Ray MAUVE pool on a real local cluster: 2 actors reproduce the single-process path exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dsl.eval.featurizers import get_featurizer
from dsl.eval.mauve import ReferenceSet, evaluate_mauve, read_records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def texts():
    web = [r["text"] for r in read_records("/work/shared/data/webtext.valid.63tok.jsonl")]
    return web[:120], web[120:300]


@pytest.fixture(scope="module")
def pool(ray_cluster):
    import ray

    from dsl.service.mauve_pool import MauvePool

    saved = dict(os.environ)
    os.environ.update(ray_cluster.env)  # the cluster's address and auth settings, as a driver there has
    ray.init(address=ray_cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        p = MauvePool("minilm", num_workers=2, max_length=64, batch_size=16)
        try:
            yield p
        finally:
            p.close()
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_two_actors_give_bit_identical_features_and_the_same_mauve(pool, texts, tmp_path):
    torch.set_num_threads(1)  # the actors' thread count
    samples, pool_texts = texts
    single = get_featurizer("minilm", max_length=64, batch_size=16)
    np.testing.assert_array_equal(pool.featurize(samples), single.featurize(samples))

    refs = ReferenceSet.draw(pool_texts, 150, seed=1)
    seeds = (25, 26)
    parallel = pool.mauve(samples, refs, seeds=seeds)
    local = evaluate_mauve(samples, refs, single, seeds=seeds)
    assert parallel["values"] == local["values"]
    assert parallel["length_budget"] == local["length_budget"] and parallel["n_samples"] == 120


def test_pool_features_fill_the_reference_cache_and_precomputed_features_work(pool, texts, tmp_path):
    samples, pool_texts = texts
    refs = ReferenceSet.draw(pool_texts, 150, seed=1, cache=str(tmp_path / "cache"))
    ref_feats = refs.features(pool)
    again = ReferenceSet.draw(pool_texts, 150, seed=1, cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.features(get_featurizer("minilm", max_length=64)), ref_feats)
    assert again.computed == 0  # the pool and the single-process featurizer share cache entries
    r = pool.mauve(samples, ref_feats, seeds=(25,))
    assert 0.0 <= r["mean"] <= 1.0 and r["n_reference"] == 150


def test_pool_survives_pickling(pool, texts):
    import pickle

    clone = pickle.loads(pickle.dumps(pool))
    np.testing.assert_array_equal(clone.featurize(texts[0][:20]), pool.featurize(texts[0][:20]))
