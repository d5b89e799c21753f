"""Official top-p rule (keep cumulative mass ≤ p plus the top-1) and the sharpness statistics."""

from __future__ import annotations

import pytest
import torch

from dsl.sampling.nucleus import keys, sort_top_p_filter, top_p_filter

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


# ------------------------------------------------------------------------------------------------
# Exactness of the sort-free filter against the full stable sort (kept set, k_t, probabilities).


def _reference(rows: torch.Tensor, top_p: float, diag_p: float, kind: str):
    # the rule's probabilities: softmax in the logits' own precision; sums and comparisons in float64
    probs = torch.softmax(rows, -1).double() if kind == "logits" else rows.double() / rows.double().sum(-1, keepdim=True)
    cums = probs.sort(dim=-1, descending=True, stable=True).values.cumsum(-1)
    size = ((cums < diag_p).sum(-1) + 1).clamp(max=rows.shape[1]).double()
    first = probs.argmax(-1)  # the lowest id among the most probable
    return sort_top_p_filter(probs, top_p), size, first


def _assert_exact(rows: torch.Tensor, top_p: float, kind: str = "logits", diag_p: float = 0.9):
    res = top_p_filter(rows, top_p, diag_p, kind)
    ref, size, first = _reference(rows, top_p, diag_p, kind)
    ours = res.dense(rows.shape[1])
    assert torch.equal(ours > 0, ref > 0), "kept sets differ"
    assert torch.equal(res.kept, (ref > 0).sum(-1))
    assert torch.equal(res.nucleus_size, size)
    assert torch.equal(res.most_probable(), first)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    return res


def _zipf_logits(n: int, vocab: int, exponent: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(n, vocab, generator=gen), dim=-1).float() + 1
    logits = -exponent * ranks.log()
    logits[:, -1] = -1.0e30  # a masked-out id, as the denoiser passes it
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_broad_rows_are_decided_by_the_histogram_band_exactly(dtype, monkeypatch):
    from dsl.sampling import nucleus

    calls = {"band": 0, "reference": 0}
    band, reference = nucleus._band, nucleus._reference_rows

    def spy_band(p, *args):
        calls["band"] += p.shape[0]
        return band(p, *args)

    def spy_reference(p, *args):
        calls["reference"] += p.shape[0]
        return reference(p, *args)

    monkeypatch.setattr(nucleus, "_band", spy_band)
    monkeypatch.setattr(nucleus, "_reference_rows", spy_reference)
    logits = _zipf_logits(24, 20_000, 1.0, seed=0).to(dtype)  # nucleus ~ 7e3: far past the topk window
    res = _assert_exact(logits, 0.9)
    assert (res.kept > 1000).all()
    assert calls["band"] == 24 and calls["reference"] <= 2  # the sort is a rare last resort
    assert torch.allclose(res.max_prob, torch.softmax(logits.double(), -1).amax(-1), rtol=1e-6)
    entropy = torch.special.entr(torch.softmax(logits.double(), -1)).sum(-1)
    assert torch.allclose(res.entropy, entropy, rtol=1e-4)


@pytest.mark.parametrize("exponent,top_p", [(0.6, 0.9), (1.0, 0.5), (1.6, 0.95), (3.0, 0.9), (1.2, 0.3)])
def test_mixed_sharpness_matches_the_full_sort(exponent, top_p):
    logits = _zipf_logits(32, 6000, exponent, seed=int(exponent * 10))
    logits[::4] *= 8.0  # a few sharp rows among broad ones
    _assert_exact(logits, top_p)
    _assert_exact(logits.double(), top_p)
    _assert_exact(torch.softmax(logits.double(), -1), top_p, kind="probs")


@pytest.mark.parametrize("vocab", [9, 300, 5000])
def test_ties_keep_the_lowest_ids_like_the_stable_sort(vocab):
    gen = torch.Generator().manual_seed(vocab)
    # logits on a coarse grid: tie groups everywhere, also across the cut and the topk window's end
    logits = (torch.randn(40, vocab, generator=gen) * 1.5).round() / 2
    logits[0] = 0.0  # one uniform row: every token tied
    logits[1, :3] = 5.0  # a tied top-1 that alone exceeds p
    for top_p in (0.9, 0.5, 0.05):
        _assert_exact(logits, top_p)
        _assert_exact(torch.softmax(logits.double(), -1), top_p, kind="probs")


def test_cumulative_sum_exactly_at_p_follows_the_float64_comparison():
    # dyadic probabilities: 0.5 + 0.375 is exactly 0.875, so the second token is kept at p = 0.875 and
    # dropped one ulp below
    rows = torch.tensor([[0.5, 0.375, 0.125], [0.125, 0.375, 0.5]], dtype=torch.float64)
    assert _assert_exact(rows, 0.875, kind="probs").kept.tolist() == [2, 2]
    assert _assert_exact(rows, float(torch.nextafter(torch.tensor(0.875, dtype=torch.float64),
                                                     torch.tensor(0.0, dtype=torch.float64))),
                         kind="probs").kept.tolist() == [1, 1]
    gen = torch.Generator().manual_seed(7)
    for kind, dtype in (("probs", torch.float64), ("logits", torch.float64), ("logits", torch.float32)):
        logits = _zipf_logits(16, 3000, 0.8, seed=3).to(dtype)
        rows = torch.softmax(logits, -1) if kind == "probs" else logits
        probs = torch.softmax(logits, -1).double()
        cums = probs.sort(dim=-1, descending=True, stable=True).values.cumsum(-1)
        for row in range(4):
            at = int(torch.randint(100, 2000, (1,), generator=gen))
            boundary = float(cums[row, at])  # p equal to one float64 cumulative sum, and one ulp on each side
            for p in (boundary, float(torch.nextafter(cums[row, at], torch.tensor(2.0, dtype=torch.float64))),
                      float(torch.nextafter(cums[row, at], torch.tensor(0.0, dtype=torch.float64)))):
                _assert_exact(rows, p, kind=kind)


def test_each_row_is_decided_on_its_own():
    logits = _zipf_logits(12, 4000, 1.0, seed=5)
    logits[::3] *= 6.0
    batch = top_p_filter(logits, 0.9, kind="logits")
    dense = batch.dense(4000)
    for i in range(12):
        one = top_p_filter(logits[i:i + 1], 0.9, kind="logits")
        assert torch.equal(dense[i], one.dense(4000)[0])  # the same kept set and the same float64 values
        assert int(batch.kept[i]) == int(one.kept[0]) and int(batch.most_probable()[i]) == int(one.most_probable()[0])


def test_broad_rows_list_only_their_band(monkeypatch):
    from dsl.sampling import nucleus

    # a broad row keeps ~10^3 tokens but lists only the band's share: the rest is implied by its threshold
    logits = _zipf_logits(8, 20_000, 1.0, seed=11)
    res = _assert_exact(logits, 0.9)
    assert res.implicit is not None and res.implicit.rows.numel() == 8
    assert res.ids.shape[1] * 10 < int(res.kept.min())
    listed = (res.probs > 0).sum(-1)
    implied = (res.implicit.probs() > 0).sum(-1)
    assert torch.equal(listed[res.implicit.rows] + implied, res.kept[res.implicit.rows])
    total = res.probs.sum(-1)
    total[res.implicit.rows] += res.implicit.probs().sum(-1)
    assert torch.allclose(total, torch.ones(8, dtype=torch.float64), atol=1e-12)
    # the implicit mass is the exact float64 sum of the implicitly kept probabilities, in id order
    p = torch.softmax(logits, -1)[res.implicit.rows]
    kept = keys(p) > res.implicit.threshold.unsqueeze(-1)
    exact = torch.tensor([sum(map(float, row[k].double())) for row, k in zip(p, kept)], dtype=torch.float64)
    assert torch.equal(res.implicit.mass, exact)
    # ... and a draw inside it lands where the id-ordered cumulative mass crosses the target
    cdf = (p.double() * kept).cumsum(-1) * res.implicit.scale.unsqueeze(-1)
    target = 0.37 * res.implicit.mass * res.implicit.scale
    for rows_at_a_time in (20, 3):  # all rows at once; blocks of 3 rows, the last one short
        monkeypatch.setattr(nucleus, "_WIDE_BLOCK", rows_at_a_time * 20_000)
        token, prob = res.implicit.locate(target, torch.arange(8))
        assert torch.equal(token, (cdf <= target.unsqueeze(-1)).sum(-1))
        assert torch.equal(prob, p.double().gather(1, token.unsqueeze(-1)).squeeze(-1) * res.implicit.scale)


def test_top_p_one_reports_the_nucleus_size_of_broad_rows():
    logits = _zipf_logits(6, 8000, 1.0, seed=9)
    res = top_p_filter(logits, 1.0, 0.9, kind="logits")
    _, size, _ = _reference(logits, 0.9, 0.9, "logits")
    assert torch.equal(res.nucleus_size, size)
    assert torch.equal(res.dense(8000), torch.softmax(logits, -1).double())


@pytest.mark.parametrize("size,density", [(0, 0.5), (7, 0.5), (8, 1.0), (1001, 0.01), (4096, 0.3), (333, 0.0)])
def test_true_positions_match_nonzero(size, density):
    from dsl.sampling.nucleus import _true_positions

    flags = torch.rand(size, generator=torch.Generator().manual_seed(size)) < density
    assert torch.equal(_true_positions(flags), flags.nonzero().squeeze(-1))


def test_blocks_and_overwrite_give_the_same_result_as_one_pass(monkeypatch):
    from dsl.sampling import nucleus

    logits = _zipf_logits(23, 3000, 1.0, seed=4)
    logits[::3] *= 6.0  # sharp rows between broad ones, in every block
    logits[5] = 0.0  # a uniform row: p_max < 2^-10, an empty window
    whole = _assert_exact(logits, 0.9)
    monkeypatch.setattr(nucleus, "_BLOCK", 4 * 3000)  # blocks of 4 rows, the last one short
    buffer = logits.clone()
    blocked = top_p_filter(buffer, 0.9, kind="logits", overwrite=True)
    assert torch.equal(blocked.dense(3000), whole.dense(3000))
    for name in ("kept", "top1", "nucleus_size", "max_prob", "entropy"):
        assert torch.equal(getattr(blocked, name), getattr(whole, name)), name
    assert torch.equal(blocked.most_probable(), whole.most_probable())
    # the buffer now holds p where the result reads it (the rows a band decides)
    implicit = blocked.implicit
    assert implicit is not None and implicit.rows.numel() < 23
    assert torch.equal(implicit.p, torch.softmax(logits, -1)[implicit.rows])


def test_row_blocks_bound_a_gpu_steps_temporaries_and_keep_the_cpu_cache_sized():
    from dsl.sampling.nucleus import _ACCELERATOR_BLOCK, _BLOCK, _row_blocks

    vocab, rows = 50_258, 64 * 1024  # a B = 64, L = 1,024 step at the paper's vocabulary
    for device, limit in (("cuda", _ACCELERATOR_BLOCK), ("cpu", _BLOCK)):
        blocks = _row_blocks(rows, vocab, torch.device(device))
        assert blocks[0][0] == 0 and blocks[-1][1] == rows  # every row once, in order
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert max((j - i) * vocab for i, j in blocks) <= limit
        assert len(blocks) == -(-rows // (limit // vocab))  # as few blocks as the limit allows
    assert _row_blocks(0, vocab, torch.device("cuda")) == []
    assert _row_blocks(3, 10 * _ACCELERATOR_BLOCK, torch.device("cuda")) == [(0, 1), (1, 2), (2, 3)]


def test_a_high_entropy_row_with_a_small_nucleus_is_still_exact():
    # 100 tokens hold 0.92 of the mass, the rest is spread thin over 30,000: entropy above log 2^7, so the
    # row skips the window, yet its nucleus is small; the band decides it exactly
    vocab = 30_000
    probs = torch.full((2, vocab), 0.08 / (vocab - 100), dtype=torch.float64)
    probs[:, :100] = 0.92 / 100
    logits = probs.log().float()
    logits[1, 7] += 0.1  # and one row with a distinct top-1
    res = _assert_exact(logits, 0.9)
    assert (res.entropy > torch.log(torch.tensor(2.0 ** 7))).all()
    assert (res.kept <= 100).all() and res.most_probable().tolist() == [0, 7]
