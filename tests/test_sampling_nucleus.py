"""Official top-p rule (keep cumulative mass ≤ p plus the top-1) and the sharpness statistics."""

from __future__ import annotations

import pytest
import torch

from dsl.sampling.nucleus import sort_top_p_filter, top_p_filter

torch.set_num_threads(1)


def _brute_force(row: torch.Tensor, p: float) -> torch.Tensor:
    order = sorted(range(len(row)), key=lambda v: (-float(row[v]), v))
    out, total = torch.zeros_like(row), 0.0
    for rank, v in enumerate(order):
        total += float(row[v])
        if total <= p or rank == 0:
            out[v] = row[v]
    return out / out.sum()


def test_exact_example_drops_the_crossing_token():
    row = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    res = top_p_filter(row, 0.85)
    # cumsum 0.5, 0.8, 0.95: the token that crosses 0.85 is dropped (unlike HF top-p)
    assert res.ids.tolist() == [[0, 1]] and torch.allclose(res.probs, torch.tensor([[0.625, 0.375]], dtype=torch.float64))
    assert torch.allclose(res.dense(4), torch.tensor([[0.625, 0.375, 0.0, 0.0]], dtype=torch.float64))
    assert res.kept.tolist() == [2]
    assert res.nucleus_size.tolist() == [3.0]  # Sec 7.4: smallest set with mass ≥ 0.9 (diag_p default)
    assert res.max_prob.tolist() == [0.5]
    assert res.entropy.item() == pytest.approx(-sum(p * torch.log(torch.tensor(p)).item()
                                                    for p in (0.5, 0.3, 0.15, 0.05)))


def test_top1_is_always_kept():
    row = torch.tensor([[0.95, 0.05]], dtype=torch.float64)
    assert top_p_filter(row, 0.5).dense(2).tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("vocab,temp", [(10, 1.0), (300, 0.2), (5000, 0.01), (5000, 3.0)])
def test_matches_brute_force_and_full_sort(vocab, temp):
    # broad rows (small temp on gaussian logits) force the widening path up to a full sort
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen, dtype=torch.float64) / temp * 0.1
    rows = torch.softmax(logits, -1)
    ref = torch.stack([_brute_force(r, 0.9) for r in rows]) if vocab <= 300 else sort_top_p_filter(rows, 0.9)
    cums = rows.sort(-1, descending=True).values.cumsum(-1)
    for res in (top_p_filter(rows, 0.9), top_p_filter(logits, 0.9, kind="logits"),
                top_p_filter(logits.float(), 0.9, kind="logits")):
        tol = 1e-12 if res.probs.dtype == torch.float64 and logits.dtype == torch.float64 else 1e-6
        assert torch.allclose(res.dense(vocab), ref, atol=tol)
        assert torch.equal(res.nucleus_size, ((cums < 0.9).sum(-1) + 1).double())
        assert torch.allclose(res.max_prob, rows.max(-1).values, atol=1e-6)
        assert torch.allclose(res.entropy, torch.special.entr(rows).sum(-1), rtol=1e-4, atol=1e-5)  # fp32 sums


def test_top_p_one_leaves_rows_untouched():
    rows = torch.softmax(torch.randn(3, 50, dtype=torch.float64), -1)
    res = top_p_filter(rows, 1.0)
    assert torch.allclose(res.dense(50), rows, atol=1e-15)
    logit_res = top_p_filter(rows.log(), 1.0, kind="logits")
    assert torch.allclose(logit_res.dense(50), rows, atol=1e-12)
