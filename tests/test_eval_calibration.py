"""Token ECE under teacher forcing: exact posteriors are calibrated, mis-tempered ones are caught."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.channel import spherical_embeddings
from dsl.eval.calibration import (
    calibrated_ece_quantile,
    calibration_by_snr,
    plot_calibration,
    reliability,
    teacher_forced,
)
from dsl.sources import HMMSource


def test_reliability_matches_a_hand_computation():
    conf = torch.tensor([0.1, 0.15, 0.9, 0.95, 0.85, 0.6])
    correct = torch.tensor([0, 1, 1, 1, 0, 1])
    r = reliability(conf, correct, n_bins=4)
    # bins (0,.25]: conf .125 acc .5; (.5,.75]: .6 vs 1; (.75,1]: .9 vs 2/3
    expected = (2 * abs(0.5 - 0.125) + 1 * abs(1 - 0.6) + 3 * abs(2 / 3 - 0.9)) / 6
    assert r.ece == pytest.approx(expected)
    assert r.bin_counts == [2, 0, 1, 3]
    assert math.isnan(r.bin_accuracy[1])
    assert r.accuracy == pytest.approx(4 / 6)


class IIDSource:
    """Tokens i.i.d. from p: the exact posterior is p(v | z_i) ∝ p(v) exp(x_v · z_i) (App A.1)."""

    def __init__(self, vocab: int, dim: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.p = torch.softmax(torch.randn(vocab, generator=gen, dtype=torch.float64), 0)
        self.emb = spherical_embeddings(vocab + 1, dim, vocab, gen, dtype=torch.float64)[:vocab]

    def sample(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.p, n * length, replacement=True, generator=gen).reshape(n, length)

    def posterior(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        logits = self.p.log() + z.double() @ self.emb.T  # (B, L, V)
        return torch.softmax(logits / temperature, -1)


def _ece_and_floor(posterior, embed, ids, snr, seed, floor=True):
    conf, correct = teacher_forced(posterior, embed, ids, snr, torch.Generator().manual_seed(seed))
    return reliability(conf, correct).ece, (calibrated_ece_quantile(conf, q=0.99, draws=100) if floor else None)


def test_exact_posterior_is_calibrated_and_mistempered_is_detected_iid():
    src = IIDSource(vocab=12, dim=6, seed=0)
    ids = src.sample(64, 64, torch.Generator().manual_seed(1))  # 4096 tokens
    embed = src.emb.__getitem__
    for snr in (1.0, 3.0):
        exact, floor = _ece_and_floor(src.posterior, embed, ids, snr, seed=2)
        assert exact <= floor  # within sampling error of a perfectly calibrated predictor
        for temp in (0.5, 2.0):  # over- and under-confident
            tempered, _ = _ece_and_floor(lambda z, t=temp: src.posterior(z, t), embed, ids, snr, seed=2, floor=False)
            assert tempered > 2 * floor


def test_exact_hmm_posterior_is_calibrated_and_mistempered_is_detected():
    source = HMMSource(states=8, words=30, seed=0, length=32)
    emb = spherical_embeddings(source.vocab_size, 8, source.mask_id, torch.Generator().manual_seed(5),
                               dtype=torch.float64)
    ids = source.sample(96, torch.Generator().manual_seed(6))  # 3072 tokens

    def exact(z):
        return source.dsl_posterior(z, emb)

    def sharpened(z):
        return torch.softmax(source.dsl_posterior(z, emb).clamp_min(1e-300).log() * 2.0, -1)

    ece, floor = _ece_and_floor(exact, emb.__getitem__, ids, 3.0, seed=7)
    assert ece <= floor
    bad, _ = _ece_and_floor(sharpened, emb.__getitem__, ids, 3.0, seed=7, floor=False)
    assert bad > 2 * floor


def test_calibration_by_snr_uses_the_mask_and_plots(tmp_path):
    src = IIDSource(vocab=6, dim=4, seed=1)
    ids = src.sample(8, 16, torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    mask[:, :10] = 1
    res = calibration_by_snr(src.posterior, src.emb.__getitem__, [{"ids": ids, "mask": mask}], [1.0, 100.0],
                             torch.Generator().manual_seed(0))
    assert sorted(res) == [1.0, 100.0]
    assert res[1.0].n_tokens == 80
    assert res[100.0].accuracy == 1.0  # near-clean: the true token is recovered
    path = tmp_path / "fig4.png"
    plot_calibration({"exact": res, "again": res}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
