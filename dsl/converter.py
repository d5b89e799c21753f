"""Softmax converter (Sec 4.2): noisy embeddings z -> a mixture of token rows in the backbone's width.

    Convert(z) = softmax(β z W_tokenᵀ + b) · W_trans

The paper prints ``W_trans softmax(β z W_tokenᵀ) + b`` with ``b`` outside the softmax, yet says ``b`` is
"initialized to favor the mask token" and that "γ = 0 maps to mask-like inputs". A bias added after the
projection cannot favour a token, so we read ``b`` as a logit bias **inside** the softmax: at z = 0 the
mixture is softmax(b), which puts most of its weight on the mask row when b[mask] = ln(V−1) + 2.

Memory: at V ≈ 50k a dense implementation keeps B×L×V probabilities alive for backward (about 200 MB per
1024 tokens in fp32). :func:`convert` never does; it has two implementations of the same map:

* ``chunked`` — (positions × vocabulary) blocks, at most ``vocab_block`` tokens wide and ``chunk_elems``
  elements; the forward runs an online softmax over the vocabulary blocks (the running-max rescaling of
  Milakov & Gimelshein 2018, "Online normalizer calculation for softmax") and saves the row log-sum-exp,
  so backward recomputes each block's probabilities as exp(a − lse) in one pass. Only the inputs, the
  output and lse (N,) are saved; the blocks are written into reused buffers. Seven GEMMs of n·V·(d or
  hidden) in all, which is the whole cost at paper shape;
* ``attention`` — the map is one attention head from the positions to the vocabulary: queries [βz, 1],
  keys [W_token, b] (the bias rides on the constant column), values W_trans, scale 1. Fused
  ``scaled_dot_product_attention`` kernels compute it blockwise with an online softmax and keep only the
  row log-sum-exp for backward. Same GEMMs; on a CPU it is slower than chunked (bench/bench_train.py),
  on a GPU the fused kernel saves the softmax passes through memory when a fused backend accepts the shapes.
``impl="auto"`` picks per device (:data:`AUTO_IMPL`); ``bench/gpu_check.py`` times both.

Precision: under bf16 autocast (the backbone's precision, as in MDLM) the GEMMs take bf16 inputs and
accumulate in fp32; the logits come out in fp32 and the softmax stays in fp32 (a 50k-way softmax in bf16
is too coarse). Without autocast everything is fp32 (fp64 for an fp64 module).

Run ``python -m dsl.converter`` to print the activation bytes each path pins for backward at the OWT shape
(V=50258, L=1024, d=64, hidden=768).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one (positions, vocabulary) block: 2**24 fp32 = 64 MiB. More positions per block mean fewer
# passes over the (V, hidden) gradient of W_trans; two such blocks are alive at a time (backward).
DEFAULT_CHUNK_ELEMS = 1 << 24

# Vocabulary columns of one block at most (V=50258: 7 blocks of 7180). Narrower blocks keep the (rows, V)
# GEMM outputs short-rowed: g = gh W_transᵀ ran about 1.4x faster into (1024, 16384) blocks than into
# (333, 50258) ones, and the whole converter at the OWT shape about 8 % faster with 8192 than with 16384
# or 4096 (2-thread CPU, MKL; bench/bench_train.py).
DEFAULT_VOCAB_BLOCK = 8192

# The implementation "auto" resolves to, per device type. CPU: chunked, about 80 % of the fp32 matmul rate
# at paper shape against about 44 % for attention (bench/bench_train.py, 2 threads); CUDA: chunked until
# bench/gpu_check.py has measured the fused attention kernels at these shapes.
AUTO_IMPL = {"cpu": "chunked", "cuda": "chunked"}
IMPLS = ("auto", "chunked", "attention")


def resolve_mask_bias(mask_bias: float, vocab_size: int) -> float:
    """ChannelConfig.mask_bias, with the sentinel −1 meaning ln(V−1) + 2.

    V−1 is the paper's |V| (real tokens). With b[mask] = ln|V| + 2 and all other logits 0, the mask row
    gets weight e²/(1+e²) ≈ 0.88 at z = 0, whatever the vocabulary size.
    """
    if mask_bias == -1.0:
        return math.log(max(vocab_size - 1, 1)) + 2.0
    return float(mask_bias)


def unit_rows(raw: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Rows of ``raw`` scaled to unit norm, with the mask row forced to zero (and no gradient into it)."""
    keep = torch.ones(raw.shape[0], 1, dtype=raw.dtype, device=raw.device)
    keep[mask_id] = 0.0
    return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12) * keep


def _mm(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> torch.Tensor:
    """a @ b in a's dtype; with ``bf16``: bf16 inputs, fp32 accumulation, the result back in a's dtype."""
    if not bf16:
        return a @ b
    return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).to(a.dtype)


def _logits_mm(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> torch.Tensor:
    """a @ b for the softmax's logits: with ``bf16``, bf16 inputs and an fp32 (not bf16-rounded) result.

    CUDA's GEMM can write fp32 from bf16 inputs; elsewhere the inputs are rounded to bf16 and multiplied
    in fp32, which is the same arithmetic (products of bf16 values are exact in fp32).
    """
    if not bf16:
        return a @ b
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.is_cuda:
        try:
            return torch.mm(a16, b16, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(out_dtype=)
            pass
    return a16.to(a.dtype) @ b16.to(a.dtype)


def _view(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The first rows·cols elements of a flat buffer as a contiguous (rows, cols) matrix."""
    return buf[:rows * cols].view(rows, cols)


def _logits_into(buf: torch.Tensor, zc: torch.Tensor, scaled: torch.Tensor, bias: torch.Tensor,
                 bf16: bool) -> torch.Tensor:
    """zc (βW)ᵀ + b (n, v) in zc's dtype: written into ``buf`` (n·v elements, reused), fresh under bf16."""
    if bf16:
        return _logits_mm(zc, scaled.T, True).add_(bias)
    # mm + add_, not addmm(bias): addmm first copies the broadcast bias into the output, which is slower
    return torch.mm(zc, scaled.T, out=_view(buf, zc.shape[0], scaled.shape[0])).add_(bias)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bf16: bool, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b with ``accumulate`` (in place, no (out)-sized temporary in fp32)."""
    if bf16:
        prod = _mm(a, b, True)
        out.add_(prod) if accumulate else out.copy_(prod)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _spans(total: int, block: int) -> list[tuple[int, int]]:
    """[0, total) in ⌈total/block⌉ spans of near-equal length (no short remainder span)."""
    count = -(-total // block)
    size = -(-total // count)
    return [(lo, min(lo + size, total)) for lo in range(0, total, size)]


def block_shape(positions: int, vocab: int, chunk_elems: int, vocab_block: int) -> tuple[int, int]:
    """(rows, columns) of one softmax block: at most ``vocab_block`` vocabulary columns and ``chunk_elems``
    elements, split evenly over the positions and the vocabulary."""
    cols = -(-vocab // -(-vocab // max(1, min(vocab, vocab_block))))
    rows = max(1, min(positions, chunk_elems // cols))
    return -(-positions // -(-positions // rows)), cols


_WORKSPACE = threading.local()


def block_buffers(count: int, numel: int, like: torch.Tensor) -> list[torch.Tensor]:
    """``count`` flat buffers of ``numel`` elements of ``like``'s dtype and device.

    On a CPU they are views of one per-thread workspace that later calls reuse: a fresh block of tens of
    MiB is page-faulted in on every first touch, which costs as much as a pass over it (the CUDA caching
    allocator already reuses its blocks). The workspace keeps the largest size asked for (at most two
    blocks of ``chunk_elems`` elements) alive for the life of the thread.
    """
    if like.device.type != "cpu":
        return [like.new_empty(numel) for _ in range(count)]
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = cache.get(like.dtype)
    if buf is None or buf.numel() < count * numel:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buf = cache[like.dtype] = torch.empty(count * numel, dtype=like.dtype)
    return [buf[k * numel:(k + 1) * numel] for k in range(count)]


class _ChunkedConvert(torch.autograd.Function):
    """h = softmax(β z Wᵀ + b) @ T in (positions × vocabulary) blocks; backward recomputes each block.

    Inputs: z (N, d), W (V, d), beta (), b (V,), T (V, H), chunk_elems, vocab_block (ints), bf16 (bool).
    Output: h (N, H). Saved for backward: the inputs, h and the row log-sum-exp (N,), never an (N, V)
    tensor. The forward runs an online softmax over the vocabulary blocks (running max m, running sum s,
    rescaled accumulator), so backward gets p = exp(a − lse) from one pass instead of a softmax; both
    directions write every block into reused buffers (:func:`block_buffers`).
    """

    @staticmethod
    def forward(ctx, z, weight, beta, bias, trans, chunk_elems, vocab_block, bf16):
        n, vocab = z.shape[0], weight.shape[0]
        rows, cols = block_shape(n, vocab, chunk_elems, vocab_block)
        scaled = beta * weight  # (V, d): β folded into W_token once
        out = z.new_empty(n, trans.shape[1])
        lse = z.new_empty(n, 1)
        (buf,) = block_buffers(1, rows * cols, z)
        for r0, r1 in _spans(n, rows):
            zc, acc = z[r0:r1], out[r0:r1]
            m = s = None
            for v0, v1 in _spans(vocab, cols):
                e = _logits_into(buf, zc, scaled[v0:v1], bias[v0:v1], bf16)  # (n, v) logits
                m_blk = e.amax(-1, keepdim=True)
                m_new = m_blk if m is None else torch.maximum(m, m_blk)
                e.sub_(m_new).exp_()  # exp(a − m)
                if m is None:
                    s = e.sum(-1, keepdim=True)
                    _mm_into(acc, e, trans[v0:v1], bf16, accumulate=False)
                else:  # a larger running max rescales what the earlier blocks summed
                    rescale = (m - m_new).exp_()
                    s.mul_(rescale).add_(e.sum(-1, keepdim=True))
                    acc.mul_(rescale)
                    _mm_into(acc, e, trans[v0:v1], bf16, accumulate=True)
                m = m_new
            acc.div_(s)
            torch.add(m, s.log_(), out=lse[r0:r1])
        ctx.save_for_backward(z, weight, beta, bias, trans, out, lse)
        ctx.block, ctx.bf16 = (rows, cols), bf16
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, beta, bias, trans, out, lse = ctx.saved_tensors
        (rows, cols), bf16 = ctx.block, ctx.bf16
        n, vocab = z.shape[0], weight.shape[0]
        grad_z = z.new_empty(z.shape) if ctx.needs_input_grad[0] else None
        grad_t = torch.empty_like(trans)
        grad_scaled, grad_b = torch.empty_like(weight), torch.empty_like(bias)  # dℓ/d(βW), dℓ/db
        scaled = beta * weight
        buf_p, buf_g = block_buffers(2, rows * cols, z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            for i, (r0, r1) in enumerate(_spans(n, rows)):
                zc, lse_c = z[r0:r1], lse[r0:r1]  # (n, d), (n, 1)
                gh = grad_out[r0:r1].to(z.dtype)  # (n, H)
                # softmax backward, a = z(βW)ᵀ + b, g = gh Tᵀ: dℓ/da = p ⊙ (g − Σ_v p_v g_v), where
                # Σ_v p_v g_v = gh · (p T) = gh · h, so no (n, V) reduction is needed
                row_dot = (gh * out[r0:r1]).sum(-1, keepdim=True)  # (n, 1)
                for j, (v0, v1) in enumerate(_spans(vocab, cols)):
                    if bf16:
                        probs = _logits_into(buf_p, zc, scaled[v0:v1], bias[v0:v1], True).sub_(lse_c).exp_()
                        grad_a = _mm(gh, trans[v0:v1].T, True)
                    else:  # p = exp(b − lse + z(βW)ᵀ): the GEMM adds onto b − lse
                        probs = torch.sub(bias[v0:v1], lse_c, out=_view(buf_p, r1 - r0, v1 - v0))
                        probs.addmm_(zc, scaled[v0:v1].T).exp_()
                        grad_a = torch.mm(gh, trans[v0:v1].T, out=_view(buf_g, r1 - r0, v1 - v0))
                    _mm_into(grad_t[v0:v1], probs.T, gh, bf16, accumulate=i > 0)
                    grad_a.sub_(row_dot).mul_(probs)  # (n, v)
                    _mm_into(grad_scaled[v0:v1], grad_a.T, zc, bf16, accumulate=i > 0)
                    if i > 0:
                        grad_b[v0:v1] += grad_a.sum(0)
                    else:
                        torch.sum(grad_a, 0, out=grad_b[v0:v1])
                    if grad_z is not None:
                        _mm_into(grad_z[r0:r1], grad_a, scaled[v0:v1], bf16, accumulate=j > 0)
        # βW: dℓ/dW = β dℓ/d(βW), dℓ/dβ = Σ W ⊙ dℓ/d(βW)
        return grad_z, beta * grad_scaled, (weight * grad_scaled).sum(), grad_b, grad_t, None, None, None


def _attention_convert(z: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor,
                       trans: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The same map as attention: softmax([βz, 1]·[W, b]ᵀ) W_trans with scale 1.

    Fused kernels want one head width for queries, keys and values (CPU and CUDA flash; ≤ 256 on CUDA), so
    queries/keys are zero-padded (no dot product changes) to a width w and W_trans is cut into ⌈H/w⌉ value
    heads that share them: the logits are computed once per head, ≈ n·V·max(H, d + 1) multiply-adds.
    """
    n, d = z.shape
    hidden = trans.shape[1]
    width = min(max(-(-(d + 1) // 8) * 8, -(-hidden // 8) * 8), 256)
    if width < d + 1:
        raise ValueError(f"converter impl=attention needs embed_dim + 1 <= 256 (got embed_dim={d}); use chunked")
    heads = -(-hidden // width)
    q = torch.cat([beta * z, z.new_ones(n, 1), z.new_zeros(n, width - d - 1)], dim=1)
    k = torch.cat([weight, bias.unsqueeze(1), weight.new_zeros(weight.shape[0], width - d - 1)], dim=1)
    v = F.pad(trans, (0, heads * width - hidden)).view(-1, heads, width).transpose(0, 1)  # (heads, V, w)
    dtype = torch.bfloat16 if bf16 else z.dtype
    q = q.to(dtype).expand(1, heads, n, width)
    k = k.to(dtype).expand(1, heads, weight.shape[0], width)
    v = v.to(dtype).unsqueeze(0)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # a fused kernel or nothing: the math fallback keeps the (N, V) weights for backward
    fused = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
                                            if z.is_cuda else [])
    with sdpa_kernel(fused):
        h = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (1, heads, n, w)
    return h[0].transpose(0, 1).reshape(n, heads * width)[:, :hidden].to(z.dtype)


def convert(z: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, bias: torch.Tensor, trans: torch.Tensor,
            *, impl: str = "auto", bf16: bool = False, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
            vocab_block: int = DEFAULT_VOCAB_BLOCK) -> torch.Tensor:
    """softmax(β z Wᵀ + b) @ T for z (N, d), W (V, d), β (), b (V,), T (V, H): h (N, H), without keeping
    an (N, V) tensor for backward. ``impl``: "chunked", "attention" or "auto" (:data:`AUTO_IMPL`)."""
    if impl not in IMPLS:
        raise ValueError(f"converter impl={impl!r}; accepted: {', '.join(IMPLS)}")
    if impl == "auto":
        impl = AUTO_IMPL.get(z.device.type, "chunked")
    if impl == "attention":
        return _attention_convert(z, weight, beta, bias, trans, bf16)
    return _ChunkedConvert.apply(z, weight, beta, bias, trans, chunk_elems, vocab_block, bf16)


class SoftmaxConverter(nn.Module):
    """Convert(z) of Sec 4.2 with learnable spherical token rows, temperature β and mask-favouring bias.

    Parameters (V counts the mask id):
      ``token_embed`` (V, d): raw rows; :meth:`token_embeddings` normalises them to the unit sphere and
      zeroes the mask row, which therefore stays zero and gets no gradient.
      ``log_beta`` (): β = exp(log_beta) > 0.  ``bias`` (V,): logit bias, 0 except b[mask] = mask_bias.
      ``trans`` (V, hidden): W_trans; :meth:`init_trans_from` copies MDLM's input embedding into it.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, mask_id: int, beta_init: float = 1.0,
                 mask_bias: float = -1.0, gen: torch.Generator | None = None, *,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS, vocab_block: int = DEFAULT_VOCAB_BLOCK, impl: str = "auto"):
        super().__init__()
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
        if beta_init <= 0:
            raise ValueError(f"beta_init={beta_init} must be > 0")
        self.vocab_size, self.embed_dim, self.hidden, self.mask_id = vocab_size, embed_dim, hidden, mask_id
        if impl not in IMPLS:
            raise ValueError(f"converter impl={impl!r}; accepted: {', '.join(IMPLS)}")
        self.chunk_elems, self.vocab_block, self.impl = chunk_elems, vocab_block, impl
        self.token_embed = nn.Parameter(torch.empty(vocab_size, embed_dim))
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta_init)))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.trans = nn.Parameter(torch.empty(vocab_size, hidden))
        self._init_weights(resolve_mask_bias(mask_bias, vocab_size), gen)

    @torch.no_grad()
    def _init_weights(self, mask_bias: float, gen: torch.Generator | None) -> None:
        if self.token_embed.is_meta:
            return
        from dsl.channel import spherical_embeddings

        if gen is None:  # follow the global RNG (torch.manual_seed) when no generator is given
            gen = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,)).item()))
        self.token_embed.copy_(spherical_embeddings(self.vocab_size, self.embed_dim, self.mask_id, gen))
        self.bias.zero_()
        self.bias[self.mask_id] = mask_bias
        # Same scale as MDLM's embedding init (kaiming-uniform, a=√5, on a (V, hidden) matrix).
        nn.init.kaiming_uniform_(self.trans, a=math.sqrt(5), generator=gen)

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def token_embeddings(self) -> torch.Tensor:
        """W_token (V, d): unit rows, zero mask row."""
        return unit_rows(self.token_embed, self.mask_id)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Mixture logits β z W_tokenᵀ + b (B, L, V). Dense: for diagnostics and small vocabularies."""
        return self.beta * (z @ self.token_embeddings().T) + self.bias  # (B, L, V)

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        """The mixture softmax(β z W_tokenᵀ + b) (B, L, V). Dense; see :meth:`logits`."""
        return torch.softmax(self.logits(z), dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """h (B, L, hidden) from z (B, L, d); keeps no B×L×V for backward.

        fp32 (fp64 for an fp64 module); under bf16 autocast the GEMMs take bf16 inputs with fp32
        accumulation while the logits and the softmax stay fp32.
        """
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"converter expects z (..., {self.embed_dim}), got {tuple(z.shape)}")
        lead = z.shape[:-1]
        device = z.device.type
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        dtype = torch.float64 if self.trans.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=device, enabled=False):
            # Sec 4.2 with b inside the softmax: Convert(z) = softmax(β z W_tokenᵀ + b) W_trans
            h = convert(z.reshape(-1, self.embed_dim).to(dtype), self.token_embeddings().to(dtype),
                        self.beta.to(dtype), self.bias.to(dtype), self.trans.to(dtype), impl=self.impl,
                        bf16=bf16, chunk_elems=self.chunk_elems, vocab_block=self.vocab_block)
        return h.reshape(*lead, self.hidden)

    def dense_forward(self, z: torch.Tensor) -> torch.Tensor:
        """The same map with plain autograd (keeps B×L×V for backward): the reference for tests."""
        return self.weights(z.to(self.trans.dtype)) @ self.trans

    @torch.no_grad()
    def init_trans_from(self, embedding: torch.Tensor) -> None:
        """W_trans ← MDLM's ``vocab_embed.embedding`` (V, hidden), mask row included.

        At high SNR the mixture is one-hot on the true token, so Convert(z) ≈ embedding[token]: the
        fine-tuned backbone starts from exactly the inputs it was pretrained on.
        """
        if tuple(embedding.shape) != tuple(self.trans.shape):
            raise ValueError(f"vocab_embed.embedding has shape {tuple(embedding.shape)}; the converter's "
                             f"W_trans needs {tuple(self.trans.shape)} (V, hidden)")
        self.trans.copy_(embedding.to(self.trans.dtype))


def saved_bytes(fn, *args, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn(*args)``.

    Storages of ``exclude`` (typically the module's parameters, alive anyway) are not counted, so the
    figure is the activation memory a forward pass pins until its backward.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def _main() -> None:
    """Activation memory pinned for backward, dense vs chunked, at the OWT shape (exact byte counts)."""
    torch.set_num_threads(2)
    vocab, length = 50258, 1024
    conv = SoftmaxConverter(vocab, 64, 768, vocab - 1, gen=torch.Generator().manual_seed(0))
    params = tuple(conv.parameters())
    print(f"converter activations saved for backward, V={vocab}, L={length}, d=64, hidden=768, fp32")
    print(f"{'batch':>5} {'dense MiB':>10} {'chunked MiB':>12} {'ratio':>7}")
    for batch in (1, 4):
        z = (torch.randn(batch, length, 64, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
        dense = saved_bytes(conv.dense_forward, z, exclude=params) / 2**20
        chunked = saved_bytes(conv.forward, z, exclude=params) / 2**20
        print(f"{batch:>5} {dense:>10.1f} {chunked:>12.1f} {dense / chunked:>6.0f}x")


if __name__ == "__main__":
    _main()
