"""Softmax converter (Sec 4.2): mask-like at γ=0, one-hot at large γ, chunked backward == dense, memory."""

import math

import pytest
import torch

from dsl.converter import SoftmaxConverter, _spans, block_shape, resolve_mask_bias, saved_bytes

torch.set_num_threads(1)


def make(vocab=40, dim=16, hidden=24, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return SoftmaxConverter(vocab, dim, hidden, vocab - 1, 1.0, -1.0, gen, **kw)


def corrupt(conv, ids, gamma, seed=1):
    x = conv.token_embeddings()[ids]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return gamma * x + math.sqrt(gamma) * eps  # z = γx + √γ ε


def test_mask_bias_sentinel_is_log_vocab_plus_two():
    assert resolve_mask_bias(-1.0, 50258) == pytest.approx(math.log(50257) + 2)
    assert resolve_mask_bias(3.5, 50258) == 3.5


def test_gamma_zero_is_mask_like_mixture():
    conv = make()
    z = torch.zeros(2, 5, 16)
    w = conv.weights(z)
    # b[mask] = ln(V−1) + 2 against V−1 zero logits: weight e²/(1+e²) on the mask row
    assert torch.allclose(w[..., conv.mask_id], torch.tensor(math.exp(2) / (1 + math.exp(2))))
    assert (w[..., conv.mask_id] > 0.5).all()
    h = conv(z)
    expected = torch.softmax(conv.bias, -1) @ conv.trans
    assert torch.allclose(h, expected.expand_as(h), atol=1e-6)


def test_mixture_moves_from_mask_to_true_token_as_gamma_grows():
    conv = make(vocab=100, dim=64)
    ids = torch.randint(0, 99, (4, 64), generator=torch.Generator().manual_seed(2))
    mask_w, true_w = [], []
    for gamma in (0.0, 1.0, 5.0, 25.0, 200.0):
        w = conv.weights(corrupt(conv, ids, gamma))
        mask_w.append(w[..., conv.mask_id].mean().item())
        true_w.append(w.gather(-1, ids[..., None]).mean().item())
    assert all(a > b for a, b in zip(mask_w, mask_w[1:])), mask_w
    assert all(a < b for a, b in zip(true_w, true_w[1:])), true_w
    w = conv.weights(corrupt(conv, ids, 200.0))
    assert (w.gather(-1, ids[..., None]) > 0.99).all()


def test_mask_row_is_zero_and_gets_no_gradient():
    conv = make()
    emb = conv.token_embeddings()
    assert emb[conv.mask_id].abs().max() == 0
    norms = emb.norm(dim=1)
    assert torch.allclose(norms[:-1], torch.ones(39))
    z = torch.randn(2, 6, 16)
    conv(z).square().sum().backward()
    assert conv.token_embed.grad[conv.mask_id].abs().max() == 0
    assert conv.token_embed.grad[:-1].abs().sum() > 0


@pytest.mark.parametrize("impl,chunk_elems,vocab_block", [("chunked", 80, 1 << 14), ("chunked", 80, 10),
                                                           ("chunked", 1 << 24, 1 << 14), ("attention", 1 << 24, 1)])
def test_every_implementation_equals_the_dense_reference_float64(impl, chunk_elems, vocab_block):
    # chunk_elems=80 at V=37: 2 positions per block; with vocab_block=10, blocks of 7 positions x 10 (or 7)
    # tokens, so the online softmax rescales across vocabulary blocks and the weight gradients accumulate
    # across position blocks. hidden 12 > d + 1 = 9: the attention path needs 2 heads
    conv = make(vocab=37, dim=8, hidden=12, chunk_elems=chunk_elems, vocab_block=vocab_block, impl=impl).double()
    with torch.no_grad():
        conv.bias.normal_(generator=torch.Generator().manual_seed(3))
        conv.log_beta.fill_(0.4)
    z = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    upstream = torch.randn(3, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [conv.token_embed, conv.log_beta, conv.bias, conv.trans]

    def grads(fn):
        zz = z.clone().requires_grad_()
        out = fn(zz)
        g = torch.autograd.grad((out * upstream).sum(), [zz, *params])
        return out.detach(), g

    out_c, g_c = grads(conv.forward)
    out_d, g_d = grads(conv.dense_forward)
    assert torch.allclose(out_c, out_d, atol=1e-12, rtol=0)
    for name, a, b in zip(["z", "token_embed", "log_beta", "bias", "trans"], g_c, g_d):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), name
        assert b.abs().max() > 0, name  # the comparison is not vacuous


def test_blocks_tile_positions_and_vocabulary_evenly():
    assert block_shape(1024, 50258, 1 << 24, 1 << 13) == (1024, 7180)  # 7 vocabulary blocks, one of positions
    assert block_shape(1024, 4096, 1 << 24, 1 << 14) == (1024, 4096)  # one block
    assert block_shape(21, 37, 80, 10) == (7, 10)
    for total, block in ((1024, 333), (37, 10), (5, 5), (5, 9), (1, 1)):
        spans = _spans(total, block)
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no gap or overlap
        sizes = [hi - lo for lo, hi in spans]
        assert max(sizes) <= block and max(sizes) - min(sizes) <= len(spans) - 1  # no short remainder


def test_large_logits_across_vocabulary_blocks_match_the_dense_reference():
    """Logits in the hundreds, the largest in the last vocabulary block: the online softmax rescales its
    running sums without overflow, in fp32 as in fp64."""
    conv = make(vocab=37, dim=8, hidden=12, chunk_elems=80, vocab_block=10)
    with torch.no_grad():
        conv.log_beta.fill_(math.log(20.0))
        conv.bias[30:36] = 40.0
    z = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(8)) * 10
    assert conv.logits(z).abs().max() > 200
    upstream = torch.randn(2, 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    exact = make(vocab=37, dim=8, hidden=12, chunk_elems=80, vocab_block=10).double()
    exact.load_state_dict(conv.state_dict())

    def grads(fn, module, dtype):
        zz = z.to(dtype).requires_grad_()
        out = fn(zz)
        return out.double(), [g.double() for g in torch.autograd.grad((out * upstream.to(dtype)).sum(),
                                                                      [zz, *module.parameters()])]

    ref, g_ref = grads(exact.dense_forward, exact, torch.float64)
    for module, dtype, tol in ((conv, torch.float32, 1e-4), (exact, torch.float64, 1e-10)):
        out, g = grads(module.forward, module, dtype)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, ref, atol=tol, rtol=0)
        for name, a, b in zip(["z", "token_embed", "log_beta", "bias", "trans"], g, g_ref):
            assert torch.allclose(a, b, atol=tol * b.abs().max(), rtol=0), name


def test_parameter_gradients_without_a_gradient_for_z():
    conv = make(vocab=37, dim=8, hidden=12, chunk_elems=80, vocab_block=10).double()
    z = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [conv.token_embed, conv.log_beta, conv.bias, conv.trans]
    g = torch.autograd.grad(conv(z).square().sum(), params)
    g_ref = torch.autograd.grad(conv.dense_forward(z).square().sum(), params)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="accepted: auto, chunked, attention"):
        make(impl="flash")


@pytest.mark.parametrize("impl", ["chunked", "attention"])
def test_no_implementation_keeps_positions_by_vocabulary_for_backward(impl):
    vocab, dim, hidden = 4000, 16, 32
    conv = make(vocab=vocab, dim=dim, hidden=hidden, impl=impl)
    params = tuple(conv.parameters())

    def saved(n):
        z = torch.randn(1, n, dim, requires_grad=True)
        return saved_bytes(conv.forward, z, exclude=params)

    dense = saved_bytes(conv.dense_forward, torch.randn(1, 512, dim, requires_grad=True), exclude=params)
    assert dense >= 512 * vocab * 4  # the dense reference keeps at least the (B·L, V) probabilities
    # 256 more positions add their z, h and per-row softmax statistics (padded widths), never a V-wide row
    per_position = (saved(512) - saved(256)) / 256
    print(f"{impl}: {per_position:.0f} bytes saved per position; dense {dense / 512:.0f}")
    assert per_position <= 4 * 4 * (dim + hidden + 8)
    assert saved(512) * 5 < dense


@pytest.mark.parametrize("impl,vocab_block", [("chunked", 1 << 14), ("chunked", 128), ("attention", 1 << 14)])
def test_bf16_autocast_stays_close_to_float64(impl, vocab_block):
    """Under bf16 autocast the GEMMs take bf16 inputs (fp32 accumulation) and the logits and softmax stay
    fp32: the output and a downstream cross-entropy stay within measured bounds of the float64 map."""
    vocab, dim, hidden = 500, 64, 48
    gen = torch.Generator().manual_seed(0)
    conv = make(vocab=vocab, dim=dim, hidden=hidden, impl=impl, chunk_elems=vocab * 37, vocab_block=vocab_block)
    ids = torch.randint(0, vocab - 1, (4, 64), generator=gen)
    gamma = torch.exp(1.65 + 0.9 * torch.randn(4, 64, 1, generator=gen))  # eq. 18's lognormal SNRs
    x = conv.token_embeddings()[ids].detach()
    z = gamma * x + gamma.sqrt() * torch.randn(x.shape, generator=gen)
    readout = torch.randn(hidden, vocab, generator=gen) / math.sqrt(hidden)

    def loss_of(h):
        return torch.nn.functional.cross_entropy((h @ readout.to(h.dtype)).reshape(-1, vocab), ids.reshape(-1))

    exact = make(vocab=vocab, dim=dim, hidden=hidden).double()
    exact.load_state_dict(conv.state_dict())
    h64 = exact.dense_forward(z.double()).detach()
    h32 = conv(z).detach()  # values only: the gradient is checked below through its own forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = conv(z).detach()
    assert h16.dtype == torch.float32

    def rel(h):
        return float((h.double() - h64).norm() / h64.norm())

    loss64 = float(loss_of(h64))
    print(f"{impl}: relative error fp32 {rel(h32):.1e}, bf16 {rel(h16):.1e}; loss error fp32 "
          f"{abs(float(loss_of(h32)) - loss64):.1e}, bf16 {abs(float(loss_of(h16)) - loss64):.1e}")
    assert rel(h32) < 1e-5
    assert 1e-4 < rel(h16) < 2e-2  # bf16 inputs are really used, and the error stays bounded
    assert abs(float(loss_of(h32)) - loss64) < 1e-5
    assert abs(float(loss_of(h16)) - loss64) < 1e-4
    # the gradient of the loss w.r.t. W_trans, through the bf16 backward GEMMs
    g64 = torch.autograd.grad(loss_of(exact.dense_forward(z.double())), exact.trans)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g16 = torch.autograd.grad(loss_of(conv(z).float()), conv.trans)[0]
    assert float((g16.double() - g64).norm() / g64.norm()) < 3e-2


def test_init_trans_from_reproduces_pretrained_inputs_at_high_snr():
    conv = make(vocab=30, dim=64, hidden=8)
    embedding = torch.randn(30, 8, generator=torch.Generator().manual_seed(6))
    conv.init_trans_from(embedding)
    ids = torch.randint(0, 29, (2, 10), generator=torch.Generator().manual_seed(7))
    h = conv(corrupt(conv, ids, 400.0))
    assert torch.allclose(h, embedding[ids], atol=1e-4)
    with pytest.raises(ValueError, match=r"\(31, 8\)"):
        conv.init_trans_from(torch.zeros(31, 8))


def test_reused_block_buffers_serve_inference_mode_then_training():
    """Blocks go through a per-thread workspace that later calls reuse: a call under inference mode, then
    training calls of other sizes, still equal the dense reference."""
    z = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        make(vocab=37, dim=8, hidden=12, chunk_elems=40, vocab_block=5).double()(z)
    for chunk_elems, vocab_block in ((80, 10), (1 << 24, 1 << 14)):
        conv = make(vocab=37, dim=8, hidden=12, chunk_elems=chunk_elems, vocab_block=vocab_block).double()
        params = list(conv.parameters())
        zz = z.clone().requires_grad_()
        g = torch.autograd.grad(conv(zz).square().sum(), [zz, *params])
        g_ref = torch.autograd.grad(conv.dense_forward(zz).square().sum(), [zz, *params])
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=1e-10, rtol=0)
