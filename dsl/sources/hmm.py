"""A seeded hidden Markov language with exact likelihoods and exact oracle denoisers.

Structure (fixed by ``seed``): state 0 ends a sentence and emits only the word "."; the other states
are word classes. Each class state emits a small set of pseudo-words with Zipf-like weights (every
word belongs to about two classes), moves to the next class on a seeded cycle, to one or two other
classes, or ends the sentence. Sequences start at a sentence start. The sparse, skewed tables keep
the entropy low (a couple of nats per token) so a small model can learn the language, and the
rendered text reads like sentences of made-up words ("Tova rel kimu. Sa pelo.").

All inference runs in float64 log space: the forward algorithm for ``log_prob`` and forward-backward
with per-position log-evidence for the oracles (never a dense (B, L, S, W) tensor).
"""

from __future__ import annotations

import math
import random

import torch

from dsl.seeding import derive_seed
from dsl.sources import ExactSource

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "th", "br",
           "tr", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "l"]
_CHUNK_ELEMENTS = 1 << 22  # bound on the gathered (rows, R, width) temporary of the exact path


class HMMSource(ExactSource):
    """``states`` hidden states, ``words`` word types (word 0 is "."), mask id ``words``."""

    def __init__(self, states: int, words: int, seed: int, length: int):
        if states < 2:
            raise ValueError(f"hmm states={states} must be >= 2 (a sentence end and one word class)")
        if words < 2:
            raise ValueError(f"hmm words={words} must be >= 2 ('.' and one word)")
        if length < 1:
            raise ValueError(f"hmm length={length} must be >= 1")
        self.seed = seed
        word_strings = ["."] + pseudo_words(words - 1, random.Random(derive_seed(seed, "hmm-words")))
        gen = torch.Generator().manual_seed(derive_seed(seed, "hmm-tables"))
        self._install(*_tables(states, words, gen), word_strings, length)

    def _install(self, init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, word_strings: list[str],
                 length: int) -> None:
        """Set the tables (float64 probabilities: init (S,), trans (S, S) [from, to], emit (S, W)) and the
        word spellings (word 0 is "."); every HMM-structured source shares the inference below."""
        states, words = emit.shape
        self.n_states = states
        self.length = int(length)
        self.vocab_size = words + 1
        self.mask_id = words
        self.word_strings = list(word_strings)
        with torch.no_grad():
            self.log_init = init.log()  # (S,)
            self.log_trans = trans.log()  # (S, S): [from, to]
            self.log_emit = emit.log()  # (S, W)
        self._emit_by_state = _LogWeights(self.log_emit)  # φ_i(s): sums over the words of state s
        self._emit_by_word = _LogWeights(self.log_emit.T)  # marginals: sums over the states of word w
        self._trans_forward = _LogWeights(self.log_trans.T)
        self._trans_backward = _LogWeights(self.log_trans)

    # -- sampling and likelihood --------------------------------------------------------------
    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        emit, trans = self.log_emit.exp(), self.log_trans.exp()
        state = torch.multinomial(self.log_init.exp().expand(n, -1), 1, generator=gen).squeeze(1)
        ids = torch.empty(n, self.length, dtype=torch.long)
        for i in range(self.length):
            ids[:, i] = torch.multinomial(emit[state], 1, generator=gen).squeeze(1)
            state = torch.multinomial(trans[state], 1, generator=gen).squeeze(1)
        return ids

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact log P(ids) by the forward algorithm: (n,) float64 (-inf for impossible sequences)."""
        ids = self._check_ids(ids, allow_mask=False, what="ids")
        log_phi = self.log_emit.T[ids]  # (n, L, S): log P(x_i | state)
        return self._forward(log_phi)[1]

    def state_posterior(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact p(s_i = s | x) (B, L, S) float64 by forward-backward."""
        ids = self._check_ids(ids, allow_mask=False, what="ids")
        log_phi = self.log_emit.T[ids]  # (B, L, S)
        log_pred, log_z = self._forward(log_phi)
        return (log_pred + log_phi + self._backward(log_phi) - log_z[:, None, None]).exp()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Readable text: words separated by spaces, "." closes a sentence, ``_`` marks a mask."""
        out: list[str] = []
        start = True
        for t in torch.as_tensor(ids).tolist():
            if t == 0:
                out.append(".")
                start = True
                continue
            word = "_" if t == self.mask_id else self.word_strings[t]
            out.append((" " if out else "") + (word.capitalize() if start else word))
            start = False
        return "".join(out)

    # -- exact inference ----------------------------------------------------------------------
    def _forward(self, log_phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive forward messages F_i(s) = log P(evidence_<i, s_i = s) (B, L, S) and log Z (B,)."""
        b, length, s = log_phi.shape
        log_pred = log_phi.new_empty(b, length, s)
        msg = self.log_init.expand(b, s)
        for i in range(length):
            log_pred[:, i] = msg
            alpha = msg + log_phi[:, i]  # (B, S)
            msg = self._trans_forward(alpha)  # (B, S): log Σ_s' exp(α(s')) P(s | s')
        return log_pred, torch.logsumexp(alpha, dim=1)

    def _backward(self, log_phi: torch.Tensor) -> torch.Tensor:
        """β_i(s) = log P(evidence_>i | s_i = s): (B, L, S)."""
        b, length, s = log_phi.shape
        beta = log_phi.new_zeros(b, length, s)
        for i in range(length - 2, -1, -1):
            nxt = beta[:, i + 1] + log_phi[:, i + 1]  # (B, S)
            beta[:, i] = self._trans_backward(nxt)  # log Σ_s' P(s' | s) exp(nxt(s'))
        return beta

    def _log_partition(self, log_evidence: torch.Tensor) -> torch.Tensor:
        return self._forward(self._emit_by_state(log_evidence))[1]

    def _log_marginals(self, log_evidence: torch.Tensor) -> torch.Tensor:
        b, length, w = log_evidence.shape
        # φ_i(s) = log Σ_w P(w | s) exp(e_i(w)): the evidence of position i given its state
        log_phi = self._emit_by_state(log_evidence)  # (B, L, S)
        log_pred, log_z = self._forward(log_phi)
        beta = self._backward(log_phi)
        # p(x_i = w, evidence) = Σ_s F_i(s) β_i(s) P(w | s) exp(e_i(w)); no φ is ever subtracted, so
        # states with zero evidence cannot produce -inf - (-inf)
        log_joint = self._emit_by_word(log_pred + beta)  # (B, L, W)
        return log_joint + log_evidence - log_z[:, None, None]


class _LogWeights:
    """out[..., r] = log Σ_j W[r, j] exp(values[..., j]) for a fixed sparse non-negative W (R, J).

    Fast path: one matmul on exp(values - row max). Where that could have lost an output to underflow
    (a sum below 1e-250 although the output's support holds a finite value), the row is recomputed
    exactly by logsumexp over the padded support, so the result is exact in log space either way.
    """

    _TINY = 1e-250

    def __init__(self, log_table: torch.Tensor):
        finite = torch.isfinite(log_table)  # (R, J)
        self.weight = torch.where(finite, log_table.exp(), torch.zeros_like(log_table))
        self.support = finite.to(log_table.dtype)
        width = int(finite.sum(1).max())
        self.index = torch.zeros(log_table.shape[0], width, dtype=torch.long)
        self.log_weight = torch.full((log_table.shape[0], width), -math.inf, dtype=log_table.dtype)
        for r in range(log_table.shape[0]):
            cols = finite[r].nonzero().squeeze(1)
            self.index[r, : len(cols)] = cols
            self.log_weight[r, : len(cols)] = log_table[r, cols]

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        lead = values.shape[:-1]
        flat = values.reshape(-1, values.shape[-1])  # (N, J)
        shift = flat.max(-1, keepdim=True).values
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        total = torch.exp(flat - shift) @ self.weight.T  # (N, R)
        out = shift + total.log()
        tiny = (total < self._TINY).any(-1).nonzero().squeeze(1)
        if len(tiny):
            # an output is exactly -inf (not underflowed) when its whole support is -inf
            reachable = (torch.isfinite(flat[tiny]).to(flat.dtype) @ self.support.T) > 0
            risky = tiny[((total[tiny] < self._TINY) & reachable).any(-1)]
            per_chunk = max(1, _CHUNK_ELEMENTS // self.index.numel())
            for rows in risky.split(per_chunk):
                out[rows] = torch.logsumexp(flat[rows][:, self.index] + self.log_weight, dim=-1)
        return out.reshape(*lead, self.weight.shape[0])


def _tables(states: int, words: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial (S,), transition (S, S) and emission (S, W) probabilities, float64, sparse and skewed."""
    classes = states - 1  # states 1..S-1 are word classes; state 0 is the sentence end
    content_words = words - 1  # words 1..W-1; word 0 is "."
    trans = torch.zeros(states, states, dtype=torch.float64)
    emit = torch.zeros(states, words, dtype=torch.float64)
    emit[0, 0] = 1.0

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64)

    def pick(n: int, k: int) -> torch.Tensor:
        return torch.randperm(n, generator=gen)[:k]

    # sentence starts: one or two classes
    starts = 1 + pick(classes, min(2, classes))
    trans[0, starts] = 0.3 + rand(len(starts))
    # every class: the next class on a seeded cycle (keeps the chain irreducible), up to two more
    # classes, and the sentence end from about half of the classes (sentences of ~8 words)
    cycle = 1 + torch.randperm(classes, generator=gen)
    for j in range(classes):
        s, nxt = int(cycle[j]), int(cycle[(j + 1) % classes])
        trans[s, nxt] = 1.0 + rand(1).item()
        extra = 1 + pick(classes, min(2, classes))
        trans[s, extra] += 0.5 * rand(len(extra))
        if j % 2 == 1 or classes == 1:
            trans[s, 0] = 0.8
    # emissions: each word belongs to one class by a seeded permutation, then classes are filled
    # up to ~2·(W-1)/(S-1) words; weights fall off like rank^-2 (Zipf-like, low entropy)
    per_class = max(1, min(content_words, math.ceil(2 * content_words / classes)))
    order = 1 + torch.randperm(content_words, generator=gen)
    support = [set() for _ in range(classes)]
    for j, w in enumerate(order.tolist()):
        support[j % classes].add(w)
    for c in range(classes):
        for w in (1 + torch.randperm(content_words, generator=gen)).tolist():
            if len(support[c]) >= per_class:
                break
            support[c].add(w)
        ranked = [list(support[c])[i] for i in torch.randperm(len(support[c]), generator=gen).tolist()]
        emit[c + 1, ranked] = torch.arange(1, len(ranked) + 1, dtype=torch.float64) ** -2.0
    init = trans[0].clone()
    trans = trans / trans.sum(1, keepdim=True)
    return init / init.sum(), trans, emit / emit.sum(1, keepdim=True)


def pseudo_words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct pronounceable words of one to three syllables."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        syllables = rng.choice([1, 1, 2, 2, 2, 3])
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out
