"""The small-scale Table 1's science: Table 1's step budgets, the η_cap(T) scaling of its loop row, exact
scoring under the source and the source-stats featurizer (the cells themselves run through the grid:
tests/test_reproduce_job.py)."""

import math

import pytest
import torch

from dsl.config import JobConfig, SamplingConfig
from dsl.eval.cells import SourceStatsFeaturizer, mauve_with_errors, nll_stats
from dsl.reproduce import eta_cap_table
from dsl.sampling import OracleDenoiser, generate, load_eta_cap
from dsl.seeding import sample_generator
from dsl.service.grid_spec import load_spec
from dsl.service.reproduce import study_spec
from dsl.sources import CyclicSource, TopicSource

torch.set_num_threads(1)


def gen(*keys):
    return sample_generator(0, "test-reproduce", *keys)


def test_step_budgets_are_table1s_fractions_of_l():
    table1 = load_spec("table1")
    assert table1.budgets(64) == [8, 16, 32, 64]
    assert table1.budgets(1024) == [128, 256, 512, 1024]  # the paper's columns
    assert table1.budgets(4) == [1, 2, 4]


def test_the_study_grids_loop_row_has_an_eta_cap_at_each_of_its_budgets():
    cfg = JobConfig()
    cfg.model.length, cfg.data.source = 64, "topics"
    spec = study_spec(cfg)
    assert [r.label for r in spec.rows[:2]] == ["Data (exact samples)", "Exact oracle + MDLM sampler"]
    (loop,) = [r for r in spec.rows if r.sampler == "dsl-budget"]
    assert loop.eta_cap_table == eta_cap_table(64, spec.budgets(64))
    eta = load_eta_cap(loop.eta_cap_table)
    assert [eta(t) for t in spec.budgets(64)] == pytest.approx([0.16, 0.128, 0.112, 0.064])


def test_eta_cap_table_keeps_the_papers_rewrites_per_token():
    # η_mini(T) = η_eq24(T·1024/L)·1024/L: at L = 1024 it is eq. 24 itself
    paper = load_eta_cap(eta_cap_table(1024, [128, 256, 512, 1024]))
    assert [paper(t) for t in (128, 256, 512, 1024)] == pytest.approx([0.010, 0.008, 0.007, 0.004])
    mini = load_eta_cap(eta_cap_table(64, [8, 16, 32, 64]))
    assert [mini(t) for t in (8, 16, 32, 64)] == pytest.approx([0.16, 0.128, 0.112, 0.064])
    assert eta_cap_table(64, [8, 16, 32, 64], "sec6.1") == "sec6.1"  # the paper's printed values, unscaled
    # and the sampler then rewrites as often as Table 5 says at T = L (1.849 per token); at T = L/8 the
    # scaled η = 0.16 saturates the loop's unmasking, so it rewrites less than Table 5's 0.580
    source = TopicSource(2, 0, 64, class_words=(1, 2, 1))
    rewrites = {}
    for steps in (8, 64):
        cfg = SamplingConfig(sampler="dsl-budget", steps=steps, eta_cap_table=eta_cap_table(64, [8, 64]),
                             batch_size=48)
        rewrites[steps] = float(generate(OracleDenoiser(source), cfg, 48, 64, seed=0).mean_rewrites.mean())
    assert rewrites[64] == pytest.approx(1.849, rel=0.15)
    assert 0.3 < rewrites[8] < 0.580


def test_nll_stats_are_exact_and_count_impossible_samples():
    source = TopicSource(3, 0, 12)
    ids = source.sample(50, gen("nll"))
    stats = nll_stats(source, ids)
    per_token = -source.log_prob(ids) / 12
    assert stats["nll_per_token"] == pytest.approx(float(per_token.mean()), rel=1e-12)
    assert stats["nll_se"] == pytest.approx(float(per_token.std() / math.sqrt(50)), rel=1e-9)
    assert stats["genppl"] == pytest.approx(math.exp(stats["nll_per_token"]))
    assert (stats["impossible"], stats["impossible_share"], stats["n_samples"]) == (0, 0.0, 50)
    # a sparse source: impossible samples are counted and left out of the NLL, never hidden
    cyclic = CyclicSource(5)
    mixed = torch.cat([cyclic.sample(3, gen("c")), torch.zeros(1, 5, dtype=torch.long)])
    c = nll_stats(cyclic, mixed)
    assert (c["impossible"], c["impossible_share"]) == (1, 0.25)
    assert c["nll_per_token"] == pytest.approx(math.log(5) / 5)
    only_bad = nll_stats(cyclic, torch.zeros(2, 5, dtype=torch.long))
    assert only_bad["impossible_share"] == 1.0 and only_bad["genppl"] == math.inf


def test_source_stats_features_see_word_order():
    source = TopicSource(4, 0, 32)
    feat = SourceStatsFeaturizer(source)
    ref, same = source.sample(200, gen("ref")), source.sample(200, gen("same"))
    shuffled = torch.stack([row[torch.randperm(32, generator=gen("perm", i))] for i, row in enumerate(same)])
    assert feat.features(ref).shape == (200, source.n_words + source.n_states ** 2)
    rf = feat.features(ref)
    alike = mauve_with_errors(rf, feat.features(same), seeds=(25,), resamples=0)
    broken = mauve_with_errors(rf, feat.features(shuffled), seeds=(25,), resamples=0)
    assert alike["mauve"] > 0.8 and broken["mauve"] < alike["mauve"] - 0.4
