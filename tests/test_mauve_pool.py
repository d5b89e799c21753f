"""The Ray MAUVE pool on a real local cluster: 2 actors reproduce the single-process path exactly.

The pool's driver runs in a subprocess with the cluster's environment (address, token auth), as a job
on that cluster would: Ray reads its auth settings once per process, so an in-process driver would
depend on whether an earlier test had already imported Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dsl.eval.featurizers import get_featurizer
from dsl.eval.mauve import ReferenceSet, evaluate_mauve, read_records

pytestmark = pytest.mark.integration

DATA = "/work/shared/data/webtext.valid.63tok.jsonl"

DRIVER = textwrap.dedent('''
    import json, os, pickle, sys
    import numpy as np, ray
    from dsl.eval.mauve import ReferenceSet, read_records
    from dsl.service.mauve_pool import MauvePool

    out, cache, data = sys.argv[1], sys.argv[2], sys.argv[3]
    web = [r["text"] for r in read_records(data)]
    samples, pool_texts = web[:120], web[120:300]
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=False)
    pool = MauvePool("minilm", num_workers=2, max_length=64, batch_size=16)
    try:
        features = pool.featurize(samples)
        scored = pool.mauve(samples, ReferenceSet.draw(pool_texts, 150, seed=1), seeds=(25, 26))
        ref_feats = ReferenceSet.draw(pool_texts, 150, seed=1, cache=cache).features(pool)
        on_features = pool.mauve(samples, ref_feats, seeds=(25,))
        clone = pickle.loads(pickle.dumps(pool))
        clone_same = bool(np.array_equal(clone.featurize(samples[:20]), pool.featurize(samples[:20])))
        actors = len(pool._actors)
    finally:
        pool.close()
        ray.shutdown()
    np.save(out + ".npy", features)
    with open(out + ".json", "w") as fh:
        json.dump({"scored": scored, "on_features": on_features, "clone_same": clone_same,
                   "actors": actors}, fh)
''')


@pytest.fixture(scope="module")
def parallel(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    script = root / "driver.py"
    script.write_text(DRIVER)
    out, cache = root / "result", root / "cache"
    proc = subprocess.run([sys.executable, str(script), str(out), str(cache), DATA], env=_base_env() | ray_cluster.env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(str(out) + ".npy"), json.loads((root / "result.json").read_text()), str(cache)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def texts():
    web = [r["text"] for r in read_records(DATA)]
    return web[:120], web[120:300]


def test_two_actors_give_bit_identical_features_and_the_same_mauve(parallel, texts):
    features, result, _ = parallel
    torch.set_num_threads(1)  # the actors' thread count
    samples, pool_texts = texts
    single = get_featurizer("minilm", max_length=64, batch_size=16)
    assert result["actors"] == 2
    np.testing.assert_array_equal(features, single.featurize(samples))
    local = evaluate_mauve(samples, ReferenceSet.draw(pool_texts, 150, seed=1), single, seeds=(25, 26))
    assert result["scored"]["values"] == local["values"]
    assert result["scored"]["length_budget"] == local["length_budget"] and result["scored"]["n_samples"] == 120


def test_pool_fills_the_shared_reference_cache_and_scores_precomputed_features(parallel, texts):
    _, result, cache = parallel
    again = ReferenceSet.draw(texts[1], 150, seed=1, cache=cache)
    again.features(get_featurizer("minilm", max_length=64))
    assert again.computed == 0  # the pool and the single-process featurizer share cache entries
    assert 0.0 <= result["on_features"]["mean"] <= 1.0 and result["on_features"]["n_reference"] == 150


def test_pool_survives_pickling(parallel):
    assert parallel[1]["clone_same"] is True
