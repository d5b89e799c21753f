"""Softmax converter (Sec 4.2): mask-like at γ=0, one-hot at large γ, chunked backward == dense, memory."""

import math

import pytest
import torch

from dsl.converter import SoftmaxConverter, resolve_mask_bias, saved_bytes

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


def test_chunked_backward_equals_dense_reference_float64():
    conv = make(vocab=37, dim=8, hidden=12, chunk_elems=80).double()  # 2 positions per chunk
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
    assert torch.allclose(out_c, out_d, atol=1e-12)
    for name, a, b in zip(["z", "token_embed", "log_beta", "bias", "trans"], g_c, g_d):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
        assert b.abs().max() > 0, name  # the comparison is not vacuous


def test_chunked_path_saves_far_less_than_dense_for_backward():
    vocab, n = 4000, 512
    conv = make(vocab=vocab, dim=16, hidden=32)
    z = torch.randn(1, n, 16, requires_grad=True)
    params = tuple(conv.parameters())
    chunked = saved_bytes(conv.forward, z, exclude=params)
    dense = saved_bytes(conv.dense_forward, z, exclude=params)
    one_activation = n * vocab * 4  # a single fp32 (B·L, V) tensor
    print(f"saved for backward: dense {dense / 2**20:.2f} MiB, chunked {chunked / 2**20:.2f} MiB")
    assert dense >= one_activation  # dense keeps at least the probabilities
    # chunked keeps z (B·L, d), h (B·L, hidden), W_token (V, d) and row norms: nothing of size B·L·V
    assert chunked <= 4 * (n * (16 + 32) + vocab * (16 + 4))
    assert chunked * 10 < dense


def test_bf16_autocast_keeps_the_softmax_in_fp32():
    conv = make()
    z = torch.randn(2, 5, 16)
    ref = conv(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(z)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_init_trans_from_reproduces_pretrained_inputs_at_high_snr():
    conv = make(vocab=30, dim=64, hidden=8)
    embedding = torch.randn(30, 8, generator=torch.Generator().manual_seed(6))
    conv.init_trans_from(embedding)
    ids = torch.randint(0, 29, (2, 10), generator=torch.Generator().manual_seed(7))
    h = conv(corrupt(conv, ids, 400.0))
    assert torch.allclose(h, embedding[ids], atol=1e-4)
    with pytest.raises(ValueError, match=r"\(31, 8\)"):
        conv.init_trans_from(torch.zeros(31, 8))
