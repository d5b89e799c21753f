"""dsl.objectives: DSL / MDLM / AR losses and the path-integral NLL against exact sources."""

import math

import pytest
import torch
from torch import nn

from dsl.channel import corrupt_rows, sample_snr_rows, spherical_embeddings
from dsl.config import ChannelConfig, MDLMLossConfig, ModelConfig
from dsl.objectives import ar_loss, dsl_loss, mdlm_loss, mdlm_times, nll_to_bits, path_integral_nll
from dsl.seeding import sample_generator
from dsl.sources import CyclicSource, HMMSource

torch.set_num_threads(1)  # small ops: threads only add overhead on a shared machine

V, MASK, L, D = 7, 6, 10, 4


def gens(n, *keys, start=0):
    return [sample_generator(0, "test-objectives", *keys, start + b) for b in range(n)]


class TokenwiseDSL(nn.Module):
    """Stand-in with the DSLModel interface: per-token logits from z, mask logit -inf; keeps its input."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.emb = nn.Parameter(spherical_embeddings(V, D, MASK, g))
        self.out = nn.Linear(D, V)
        self.seen = []

    def embed(self, ids):
        return self.emb[ids]

    def forward(self, z):
        self.seen.append(z.detach().clone())
        return self.out(z).index_fill(-1, torch.tensor([MASK]), float("-inf"))


class TableLM(nn.Module):
    """Stand-in denoiser / LM: logits[b, i] = table[i, ids[b, i]] (position-wise); keeps its input."""

    mask_id, vocab_size = MASK, V

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(L, V, V, generator=torch.Generator().manual_seed(4)))
        self.seen = []

    def forward(self, ids, logit_bias=None):
        self.seen.append(ids.clone())
        logits = self.table[torch.arange(ids.shape[1]), ids]  # (B, L, V)
        return logits if logit_bias is None else logits + logit_bias


def batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(MASK, (b, L), generator=g)
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row
    mask[3, 4:] = 0
    ids[mask == 0] = MASK  # pad with the mask id, as GPT-2 MDLM data does
    return ids, mask


# -- DSL loss ----------------------------------------------------------------------------------


def test_dsl_loss_is_alg1_cross_entropy_over_the_padding_mask():
    model, cfg = TokenwiseDSL(), ChannelConfig()
    ids, mask = batch()
    loss_sum, n_tokens, stats = dsl_loss(model, ids, mask, cfg, gens(4, "dsl"))
    # the same corruption, drawn independently from fresh copies of the row generators
    fresh = gens(4, "dsl")
    gamma, _ = sample_snr_rows(fresh, L, cfg)
    z = corrupt_rows(model.embed(ids).detach(), gamma, fresh)
    assert torch.equal(model.seen[0], z)
    logp = torch.log_softmax(model.out(z).index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
    nll = -logp.gather(-1, ids[..., None])[..., 0]
    expected = nll[mask.bool()].sum()
    torch.testing.assert_close(loss_sum, expected)
    assert int(n_tokens) == int(mask.sum()) == 4 * L - 3 - 6
    assert math.isfinite(float(loss_sum.detach()))  # padded positions hold the mask id (-inf logit): excluded
    assert stats["loss"] == pytest.approx(float(expected.detach()) / int(n_tokens), rel=1e-6)
    loss_sum.backward()
    assert model.emb.grad is not None and model.emb.grad.abs().sum() > 0  # W_token is trained (line 20)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # pads at -inf logits: no NaN


def test_dsl_loss_ignores_padded_tokens():
    model, cfg = TokenwiseDSL(), ChannelConfig()
    ids, mask = batch()
    changed = ids.clone()
    changed[mask == 0] = 2  # different content where the mask is 0
    a, na, _ = dsl_loss(model, ids, mask, cfg, gens(4, "pad"))
    b, nb, _ = dsl_loss(model, changed, mask, cfg, gens(4, "pad"))
    torch.testing.assert_close(a, b)
    assert int(na) == int(nb)


def _toy_dsl_model():
    from dsl.models.dsl_model import DSLModel

    cfg = ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, dropout=0.0, length=L, vocab_size=V)
    return DSLModel(cfg, ChannelConfig(embed_dim=D), torch.Generator().manual_seed(0)).eval()


def test_dsl_loss_is_independent_of_the_batch_split():
    model, cfg = _toy_dsl_model(), ChannelConfig()
    ids, mask = batch()
    whole, n_whole, _ = dsl_loss(model, ids, mask, cfg, gens(4, "split"))
    first, n1, _ = dsl_loss(model, ids[:2], mask[:2], cfg, gens(2, "split"))
    second, n2, _ = dsl_loss(model, ids[2:], mask[2:], cfg, gens(2, "split", start=2))
    torch.testing.assert_close(whole, first + second, rtol=1e-6, atol=1e-5)
    assert int(n_whole) == int(n1) + int(n2)


# -- MDLM loss ---------------------------------------------------------------------------------


def test_mdlm_times_are_stratified_over_the_global_batch():
    cfg = MDLMLossConfig()
    t = mdlm_times(gens(8, "t"), range(8), 8, cfg)
    t_prime = (t - cfg.sampling_eps) / (1 - cfg.sampling_eps)
    assert ((t_prime >= torch.arange(8) / 8 - 1e-12) & (t_prime < (torch.arange(8) + 1) / 8)).all()
    # the same rows in another micro-batch split get the same times
    torch.testing.assert_close(mdlm_times(gens(3, "t", start=5), [5, 6, 7], 8, cfg), t[5:])
    plain = mdlm_times(gens(8, "t"), range(8), 8, MDLMLossConfig(stratified=False))
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens(8, "t")])
    torch.testing.assert_close(plain, (1 - 1e-3) * u + 1e-3)


def test_mdlm_loss_weight_one_over_t_and_carry_over():
    model, cfg = TableLM(), MDLMLossConfig()
    ids, mask = batch()
    rows = [4, 5, 6, 7]
    loss_sum, n_tokens, stats = mdlm_loss(model, ids, mask, cfg, gens(4, "mdlm"), rows, 8)
    noisy = model.seen[0]
    is_masked = noisy == MASK
    assert torch.equal(noisy[~is_masked], ids[~is_masked])  # only the mask id is ever written
    t = mdlm_times(gens(4, "mdlm"), rows, 8, cfg)
    logits = model.table[torch.arange(L), noisy].detach().clone()
    logits[..., MASK] -= 1e6  # SUBS
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    scored = is_masked & mask.bool()
    expected = (nll / t[:, None].float())[scored].sum()  # unmasked positions contribute exactly 0
    assert scored.any() and (~is_masked & mask.bool()).any()
    torch.testing.assert_close(loss_sum, expected)
    assert int(n_tokens) == int(mask.sum())  # the denominator counts masked and unmasked tokens
    assert stats["t_mean"] == pytest.approx(float(t.mean()))


def test_mdlm_masking_rate_is_one_minus_alpha_t():
    model, cfg = TableLM(), MDLMLossConfig()
    n = 400
    ids = torch.zeros(n, L, dtype=torch.long)
    mdlm_loss(model, ids, torch.ones_like(ids), cfg, gens(n, "rate"), range(n), n)
    t = mdlm_times(gens(n, "rate"), range(n), n, cfg)
    masked = (model.seen[0] == MASK).double().sum(1)  # (n,) ~ Binomial(L, (1-ε)t)
    p = (1 - cfg.eps) * t
    z = (masked.sum() - (L * p).sum()) / (L * p * (1 - p)).sum().sqrt()
    assert abs(float(z)) < 5


def test_mdlm_loss_is_independent_of_the_batch_split_and_finds_mask_id_in_model_cfg():
    from dsl.models.dit import DiT

    model = DiT(ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, dropout=0.0, length=L, vocab_size=V))
    model.eval()
    cfg = MDLMLossConfig()
    ids, mask = batch()
    whole, n_whole, _ = mdlm_loss(model, ids, mask, cfg, gens(4, "msplit"), [0, 1, 2, 3], 4)
    a, na, _ = mdlm_loss(model, ids[:2], mask[:2], cfg, gens(2, "msplit"), [0, 1], 4)
    b, nb, _ = mdlm_loss(model, ids[2:], mask[2:], cfg, gens(2, "msplit", start=2), [2, 3], 4)
    torch.testing.assert_close(whole, a + b, rtol=1e-6, atol=1e-5)
    assert int(n_whole) == int(na) + int(nb)


def test_mdlm_loss_on_a_dit_matches_subs_on_the_logits_in_value_and_every_gradient():
    """The SUBS -1e6 rides on the output layer's bias and the cross-entropy's backward reuses its
    log-probabilities; both must give what MDLM's own formulation (logits[..., mask] += -1e6, log_softmax,
    gather) gives, for the loss and for every parameter's gradient."""
    from dsl.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden=16, blocks=1, heads=2, cond_dim=8, dropout=0.0, length=L, vocab_size=V))
    with torch.no_grad():  # MDLM zero-initialises the output layer: make every logit differ
        for p in model.output_layer.parameters():
            p.normal_(0.0, 0.5)
    cfg = MDLMLossConfig()
    ids, mask = batch()
    mask[1, 6:] = 0
    loss_sum, _, _ = mdlm_loss(model, ids, mask, cfg, gens(4, "dit-subs"), range(4), 4)
    loss_sum.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    row_gens = gens(4, "dit-subs")  # t first, then the masking uniforms, from the same generators
    t = mdlm_times(row_gens, range(4), 4, cfg)
    move = torch.stack([torch.rand(L, generator=g, dtype=torch.float64) for g in row_gens])
    is_masked = move < ((1 - cfg.eps) * t)[:, None]
    logits = model(torch.where(is_masked, torch.full_like(ids, MASK), ids)).clone()
    logits[..., MASK] += -1e6
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    expected = (nll / t[:, None].float())[is_masked & mask.bool()].sum()
    expected.backward()
    torch.testing.assert_close(loss_sum, expected, rtol=1e-6, atol=1e-6)  # fp32: the DiT's logits are fp32
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fused["output_layer.linear.weight"].abs().sum() > 0


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_token_cross_entropy_gradient_equals_log_softmax_and_gather(layout):
    """Exact against autograd's log_softmax + gather in float64: per-token upstream weights (zeros for
    scored-out positions), a -inf column, and the sliced (non-contiguous) logits of the AR loss."""
    from dsl.objectives import _token_nll

    g = torch.Generator().manual_seed(5)
    raw = torch.randn(3, 9, V, generator=g, dtype=torch.float64) * 4
    raw[..., MASK] = float("-inf")
    targets = torch.randint(MASK, (3, 9), generator=g)
    weights = torch.rand(3, 9, generator=g, dtype=torch.float64)
    weights[0, :3] = 0.0
    cut = (slice(None), slice(0, -1)) if layout == "sliced" else (slice(None), slice(None))
    grads = []
    for fused in (True, False):
        logits = raw.clone().requires_grad_()
        a, s = logits[cut], targets[cut]
        nll = _token_nll(a, s) if fused else -torch.log_softmax(a, -1).gather(-1, s[..., None])[..., 0]
        (nll * weights[cut]).sum().backward()
        grads.append((nll.detach(), logits.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-13, atol=1e-15)
    assert torch.isfinite(grads[0][1]).all() and (grads[0][1][..., MASK] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_token_cross_entropy_on_half_logits_equals_the_fp32_reference_block_by_block(dtype, layout, monkeypatch):
    """Half-precision logits (the output layer under autocast) are upcast a block of positions at a time:
    the loss must equal fp32 log_softmax + gather of the same logits, and the gradient that reference's
    gradient rounded once to the logits' dtype, with blocks that do not divide the positions evenly."""
    import dsl.objectives as objectives

    monkeypatch.setattr(objectives, "_HEAD_BLOCK_ELEMS", 4 * V + 3)  # 4 positions per block
    g = torch.Generator().manual_seed(6)
    raw = (torch.randn(3, 9, V, generator=g) * 4).to(dtype)
    raw[..., MASK] = float("-inf")
    targets = torch.randint(MASK, (3, 9), generator=g)
    weights = torch.rand(3, 9, generator=g)
    weights[0, :3] = 0.0
    cut = (slice(None), slice(0, -1)) if layout == "sliced" else (slice(None), slice(None))

    half = raw.clone().requires_grad_()
    nll = objectives._token_nll(half[cut], targets[cut])
    (nll * weights[cut]).sum().backward()
    ref = raw.float().requires_grad_()
    ref_nll = -torch.log_softmax(ref[cut], -1).gather(-1, targets[cut][..., None])[..., 0]
    (ref_nll * weights[cut]).sum().backward()

    assert nll.dtype == torch.float32 and half.grad.dtype == dtype
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half.grad, ref.grad.to(dtype), rtol=0, atol=0)
    assert (half.grad[..., MASK] == 0).all() and (half.grad[:, -1].abs().sum() == 0) == (layout == "sliced")
    assert torch.equal(half.detach(), raw)  # a leaf's (or a leaf view's) logits are not overwritten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_logits_of_a_computation_take_their_gradient_in_place(dtype, layout):
    """Logits an op computed (the output layer's) hold their own gradient after backward, and what flows on
    to the op's inputs equals the fp32 reference's (bf16: rounded once, bit for bit); the leaf is untouched."""
    from dsl.objectives import _token_nll

    g = torch.Generator().manual_seed(7)
    raw = (torch.randn(3, 9, V, generator=g) * 4).to(dtype)
    targets = torch.randint(MASK, (3, 9), generator=g)
    cut = (slice(None), slice(0, -1)) if layout == "sliced" else (slice(None), slice(None))
    leaf = raw.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as the output layer's logits are
    _token_nll(logits[cut], targets[cut]).sum().backward()
    ref = raw.float().requires_grad_()
    (-torch.log_softmax(ref[cut], -1).gather(-1, targets[cut][..., None])).sum().backward()
    exact = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(leaf.grad, ref.grad.to(dtype), **exact)
    assert torch.equal(leaf.detach(), raw)
    assert torch.equal(logits[cut].detach(), leaf.grad[cut])  # the storage now holds the gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_changed_between_forward_and_backward_are_refused(dtype):
    from dsl.objectives import _token_nll

    logits = (torch.randn(2, 4, V, requires_grad=True) * 1).to(dtype)  # a non-leaf
    loss = _token_nll(logits, torch.zeros(2, 4, dtype=torch.long)).sum()
    with torch.no_grad():
        logits.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mdlm_loss_makes_no_second_tensor_of_the_logits_size(precision, monkeypatch):
    """The logits are the only (B, L, V) tensor of the loss, forward and backward: no log-probabilities, no
    fp32 copy under bf16 autocast (the DiT's logits stay bf16, as MDLM's DIT returns its output layer's),
    no separate gradient. The loss and the output layer's gradient stay those of log_softmax + gather on the
    same logits (upcast to fp32 under autocast)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import dsl.objectives as objectives
    from dsl.models.dit import DiT

    vocab, hidden, rows = 512, 16, 8
    logits_size = rows * L * vocab

    class LogitsSizedStorages(TorchDispatchMode):
        """(dtype, storage address) of every op output with at least half the logits' elements."""
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and 2 * t.numel() >= logits_size:
                    self.seen.add((t.dtype, t.untyped_storage().data_ptr()))
            return out

    torch.manual_seed(0)
    model = DiT(ModelConfig(hidden=hidden, blocks=1, heads=2, cond_dim=8, dropout=0.0, length=L, vocab_size=vocab))
    with torch.no_grad():
        for p in model.output_layer.parameters():
            p.normal_(0.0, 0.5)
    ids = torch.randint(vocab - 1, (rows, L), generator=torch.Generator().manual_seed(1))
    cfg = MDLMLossConfig()
    assert logits_size > 4 * vocab * hidden  # twice any weight or its gradient
    half = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    monkeypatch.setattr(objectives, "_HEAD_BLOCK_ELEMS", 8 * vocab)
    with LogitsSizedStorages() as mode:
        with half:
            loss_sum, _, _ = mdlm_loss(model, ids, torch.ones_like(ids), cfg, gens(rows, "head"), range(rows), rows,
                                       mask_id=vocab - 1)
        loss_sum.backward()
    logits_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert [dtype for dtype, _ in mode.seen] == [logits_dtype], mode.seen
    fused_grad = model.output_layer.linear.weight.grad.clone()
    model.zero_grad()

    row_gens = gens(rows, "head")
    t = mdlm_times(row_gens, range(rows), rows, cfg)
    move = torch.stack([torch.rand(L, generator=g, dtype=torch.float64) for g in row_gens])
    is_masked = move < ((1 - cfg.eps) * t)[:, None]
    subs = torch.zeros(vocab).index_fill_(0, torch.tensor([vocab - 1]), -1e6)
    with half:
        logits = model(torch.where(is_masked, torch.full_like(ids, vocab - 1), ids), logit_bias=subs)
    assert logits.dtype == logits_dtype
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    expected = (nll / t[:, None].float())[is_masked].sum()
    expected.backward()
    torch.testing.assert_close(loss_sum, expected, rtol=1e-6, atol=1e-5)
    tolerance = dict(rtol=2e-2, atol=1e-4) if precision == "bf16" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, model.output_layer.linear.weight.grad, **tolerance)
    assert model(ids).dtype == torch.float32  # outside autocast the logits are fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_refuses_a_second_backward_instead_of_a_wrong_gradient(dtype):
    from dsl.objectives import _token_nll

    logits = torch.randn(2, 4, V, requires_grad=True).to(dtype)
    loss = _token_nll(logits, torch.zeros(2, 4, dtype=torch.long)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# -- AR loss -----------------------------------------------------------------------------------


def test_ar_loss_scores_next_tokens_under_the_mask():
    model = TableLM()
    ids, mask = batch()
    loss_sum, n_tokens, _ = ar_loss(model, ids, mask)
    logp = torch.log_softmax(model.table[torch.arange(L), ids].detach(), -1)  # (B, L, V)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # position i predicts token i+1
    expected = nll[mask[:, 1:].bool()].sum()
    torch.testing.assert_close(loss_sum, expected)
    assert int(n_tokens) == int(mask[:, 1:].sum())  # the first token of a row is never a target


# -- path-integral NLL -------------------------------------------------------------------------


def _exact_check(source, emb, n, n_mc, key, **kw):
    ids = source.sample(n, sample_generator(0, "pi-ids", key))
    nll, stderr = path_integral_nll(lambda z: source.posterior_mean(z, emb), emb[ids], n_mc,
                                    sample_generator(0, "pi-mc", key), **kw)
    exact = -source.log_prob(ids)
    return nll, stderr, exact


@pytest.mark.parametrize("name", ["cyclic", "hmm"])
def test_path_integral_with_exact_denoiser_recovers_exact_nll(name):
    if name == "cyclic":
        source = CyclicSource(5)
        emb, kw = source.circle_embeddings(torch.float64), {"log_t_loc": 0.0}
    else:
        source = HMMSource(4, 8, 2, 6)
        emb = spherical_embeddings(9, 8, 8, sample_generator(0, "pi-emb"), dtype=torch.float64)
        kw = {"log_t_loc": 1.0}
    nll, stderr, exact = _exact_check(source, emb, 16, 256, name, **kw)
    assert nll.shape == stderr.shape == (16,)
    se = float(stderr.pow(2).sum().sqrt()) / 16
    assert abs(float(nll.mean() - exact.mean())) < 3 * se
    assert se < 0.05 * float(exact.mean())  # precise enough to catch a wrong factor


@pytest.mark.parametrize("t_end", [0.5, 4.0])
def test_eq10_truncated_path_plus_end_term_recovers_exact_nll(t_end):
    """eq. 10: ½ ∫₀^t* f dt - E log P(x | z_t*) = -log P(x) for any t*, with the exact end term."""
    source = HMMSource(4, 8, 2, 6)
    emb = spherical_embeddings(9, 8, 8, sample_generator(0, "eq10-emb"), dtype=torch.float64)
    ids = source.sample(16, sample_generator(0, "eq10-ids"))
    nll, stderr = path_integral_nll(lambda z: source.posterior_mean(z, emb), emb[ids], 256,
                                    sample_generator(0, "eq10-mc", str(t_end)), t_end=t_end,
                                    end_log_prob=lambda z, rows: source.log_posterior(ids[rows], z, emb))
    exact = -source.log_prob(ids)
    se = float(stderr.pow(2).sum().sqrt()) / 16
    assert abs(float(nll.mean() - exact.mean())) < 3 * se and se < 0.05 * float(exact.mean())
    with pytest.raises(ValueError, match="together"):
        path_integral_nll(lambda z: z, emb[ids], 4, sample_generator(0), t_end=t_end)


def test_path_integral_of_a_mismatched_denoiser_exceeds_the_nll():
    """The exact denoiser is the MMSE one: any other x̂ integrates to more than -log P(x)."""
    source = CyclicSource(5)
    emb = source.circle_embeddings(torch.float64)

    def independent_tokens(z):  # exact for a uniform prior over all 5^5 sequences, wrong here
        return torch.softmax(z @ emb[:5].T, -1) @ emb[:5]

    ids = source.sample(16, sample_generator(0, "mm"))
    nll, stderr = path_integral_nll(independent_tokens, emb[ids], 256, sample_generator(0, "mm-mc"),
                                    log_t_loc=0.0)
    se = float(stderr.pow(2).sum().sqrt()) / 16
    assert float(nll.mean()) > math.log(5) + 10 * se


def test_path_integral_is_seeded_and_validates_its_proposal():
    source = CyclicSource(5)
    emb = source.circle_embeddings(torch.float64)
    a = _exact_check(source, emb, 4, 16, "seeded")
    b = _exact_check(source, emb, 4, 16, "seeded")
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="log_t_scale"):
        path_integral_nll(lambda z: z, emb[source.sample(2, sample_generator(0))], 8,
                          sample_generator(0), log_t_scale=0.5)


def test_nll_to_bits():
    assert nll_to_bits(math.log(2) * 12, 6) == pytest.approx(2.0)
    assert nll_to_bits(math.log(2) * 12, 6, n_chars=24) == pytest.approx(0.5)
    torch.testing.assert_close(nll_to_bits(torch.tensor([math.log(2)]), 1), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        nll_to_bits(1.0, 0)
