"""Softmax converter (Sec 4.2): noisy embeddings z -> a mixture of token rows in the backbone's width.

    Convert(z) = softmax(β z W_tokenᵀ + b) · W_trans

The paper prints ``W_trans softmax(β z W_tokenᵀ) + b`` with ``b`` outside the softmax, yet says ``b`` is
"initialized to favor the mask token" and that "γ = 0 maps to mask-like inputs". A bias added after the
projection cannot favour a token, so we read ``b`` as a logit bias **inside** the softmax: at z = 0 the
mixture is softmax(b), which puts most of its weight on the mask row when b[mask] = ln(V−1) + 2.

Memory: at V ≈ 50k a dense implementation keeps B×L×V probabilities alive for backward (about 200 MB per
1024 tokens in fp32). :class:`_ChunkedConvert` processes positions in chunks and recomputes the softmax in
backward, so only the inputs are saved.

Run ``python -m dsl.converter`` to print the activation bytes each path pins for backward at the OWT shape
(V=50258, L=1024, d=64, hidden=768).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Elements of one (chunk, V) block: 2**24 fp32 = 64 MiB, 333 positions per chunk at V=50258. Larger chunks
# mean fewer passes over the (V, hidden) gradient of W_trans; two such blocks are alive at a time.
DEFAULT_CHUNK_ELEMS = 1 << 24


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


def _chunk_probs(zc: torch.Tensor, scaled: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(zc (βW)ᵀ + b) (n, V), computed in place in one (n, V) buffer."""
    probs = torch.addmm(bias, zc, scaled.T)
    probs.sub_(probs.amax(-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(-1, keepdim=True))


class _ChunkedConvert(torch.autograd.Function):
    """h = softmax(β z Wᵀ + b) @ T over positions in chunks; backward recomputes each chunk's softmax.

    Inputs: z (N, d), W (V, d), beta (), b (V,), T (V, H), chunk (int). Output: h (N, H).
    Saved for backward: the inputs and h (N, H), never an (N, V) tensor.
    """

    @staticmethod
    def forward(ctx, z, weight, beta, bias, trans, chunk):
        scaled = beta * weight  # (V, d): β folded into W_token once
        out = z.new_empty(z.shape[0], trans.shape[1])
        for start in range(0, z.shape[0], chunk):
            probs = _chunk_probs(z[start:start + chunk], scaled, bias)  # (n, V)
            torch.mm(probs, trans, out=out[start:start + chunk])
        ctx.save_for_backward(z, weight, beta, bias, trans, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, beta, bias, trans, out = ctx.saved_tensors
        chunk = ctx.chunk
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(trans) if ctx.needs_input_grad[4] else None
        grad_scaled = torch.zeros_like(weight)  # dℓ/d(βW)
        grad_b = torch.zeros_like(bias)
        with torch.autocast(device_type=z.device.type, enabled=False):
            scaled = beta * weight
            for start in range(0, z.shape[0], chunk):
                zc = z[start:start + chunk]  # (n, d)
                gh = grad_out[start:start + chunk]  # (n, H)
                probs = _chunk_probs(zc, scaled, bias)  # (n, V), recomputed
                if grad_t is not None:
                    grad_t.addmm_(probs.T, gh)
                # softmax backward, a = z(βW)ᵀ + b, g = gh Tᵀ: dℓ/da = p ⊙ (g − Σ_v p_v g_v), where
                # Σ_v p_v g_v = gh · (p T) = gh · h, so no second (n, V) reduction is needed
                row_dot = (gh * out[start:start + chunk]).sum(-1, keepdim=True)  # (n, 1)
                grad_a = torch.addmm(-row_dot, gh, trans.T).mul_(probs)  # (n, V)
                del probs
                grad_b += grad_a.sum(0)
                grad_scaled.addmm_(grad_a.T, zc)
                if grad_z is not None:
                    torch.mm(grad_a, scaled, out=grad_z[start:start + chunk])
        # βW: dℓ/dW = β dℓ/d(βW), dℓ/dβ = Σ W ⊙ dℓ/d(βW)
        return grad_z, beta * grad_scaled, (weight * grad_scaled).sum(), grad_b, grad_t, None


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
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__()
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
        if beta_init <= 0:
            raise ValueError(f"beta_init={beta_init} must be > 0")
        self.vocab_size, self.embed_dim, self.hidden, self.mask_id = vocab_size, embed_dim, hidden, mask_id
        self.chunk_elems = chunk_elems
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
        """h (B, L, hidden) from z (B, L, d), fp32 (fp64 for an fp64 module); keeps no B×L×V for backward."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"converter expects z (..., {self.embed_dim}), got {tuple(z.shape)}")
        lead = z.shape[:-1]
        chunk = max(1, self.chunk_elems // self.vocab_size)
        # fp32 at least (a 50k-way softmax in bf16 is too coarse); fp64 when the module is fp64
        dtype = torch.float64 if self.trans.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=z.device.type, enabled=False):
            # Sec 4.2 with b inside the softmax: Convert(z) = softmax(β z W_tokenᵀ + b) W_trans
            h = _ChunkedConvert.apply(z.reshape(-1, self.embed_dim).to(dtype),
                                      self.token_embeddings().to(dtype), self.beta.to(dtype),
                                      self.bias.to(dtype), self.trans.to(dtype), chunk)
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
