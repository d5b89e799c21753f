"""dsl.sources: exact likelihoods and oracle posteriors against brute-force enumeration."""

import itertools
import math

import pytest
import torch

from dsl.channel import corrupt, spherical_embeddings
from dsl.config import ConfigError, DataConfig
from dsl.seeding import sample_generator
from dsl.sources import CyclicSource, HMMSource, TopicSource, build_source

torch.set_num_threads(1)  # small ops: threads only add overhead on a shared machine


def gen(*keys):
    return sample_generator(0, "test-sources", *keys)


def tiny_hmm():
    return HMMSource(states=3, words=4, seed=1, length=4)


def tiny_topics():
    """2 topics with one adjective, two nouns and one verb each: 12 words, 14 states, 12^4 sequences."""
    return TopicSource(topics=2, seed=1, length=4, switch=0.3, smoothing=0.05, class_words=(1, 2, 1))


SOURCES = {"hmm": tiny_hmm, "cyclic": lambda: CyclicSource(5), "topics": tiny_topics}


def all_sequences(source):
    """Every sequence over the words, (W^L, L), with its exact log P."""
    seqs = torch.tensor(list(itertools.product(range(source.n_words), repeat=source.length)))
    return seqs, source.log_prob(seqs)


def brute_marginals(source, log_weight_fn):
    """p(x_i = w | evidence) by enumeration: weights P(x)·exp(log_weight_fn(x)) over all sequences."""
    seqs, log_p = all_sequences(source)
    log_w = log_p[None, :] + log_weight_fn(seqs)  # (B, N)
    post = torch.softmax(log_w, dim=-1)
    one_hot = torch.nn.functional.one_hot(seqs, source.vocab_size).to(torch.float64)  # (N, L, V)
    return torch.einsum("bn,nlv->blv", post, one_hot)


# -- likelihoods and samplers ------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_log_prob_sums_to_one_over_all_sequences(name):
    source = SOURCES[name]()
    _, log_p = all_sequences(source)
    assert log_p.dtype == torch.float64
    assert float(torch.logsumexp(log_p, 0).exp()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", SOURCES)
def test_sample_frequencies_match_log_prob(name):
    source = SOURCES[name]()
    seqs, log_p = all_sequences(source)
    n = 20_000
    ids = source.sample(n, gen("freq", name))
    assert ids.shape == (n, source.length) and ids.dtype == torch.long
    index = (ids * source.n_words ** torch.arange(source.length - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=len(seqs)).double()
    expected = log_p.exp() * n
    assert (counts[expected == 0] == 0).all()  # never samples an impossible sequence
    # Pearson's test needs expected counts >= 5: the rarer sequences are pooled into one cell
    big, rare = expected >= 5, (expected > 0) & (expected < 5)
    observed = torch.cat([counts[big], counts[rare].sum().view(1)])
    expected = torch.cat([expected[big], expected[rare].sum().view(1)])
    seen = expected > 0
    chi2 = float(((observed[seen] - expected[seen]) ** 2 / expected[seen]).sum())
    dof = int(seen.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)


def test_cyclic_sequences_log_prob_decode_and_circle():
    source = CyclicSource(7)
    assert (source.vocab_size, source.mask_id, source.length) == (8, 7, 7)
    seqs = source.sequences()
    assert torch.equal(seqs[3], torch.roll(torch.arange(7), 3))  # App B: roll(x⁽⁰⁾, i)
    assert source.decode(seqs[0]) == "ABCDEFG"
    assert source.decode(torch.tensor([0, 7, 2])) == "A_C"
    wrong = torch.tensor([[0, 1, 2, 3, 1, 5, 3]])  # ABCDBFD, the recovery toy's draft
    assert source.log_prob(wrong)[0] == -math.inf
    torch.testing.assert_close(source.log_prob(seqs), torch.full((7,), -math.log(7), dtype=torch.float64))
    circle = source.circle_embeddings()
    assert circle.shape == (8, 2)
    torch.testing.assert_close(circle[:7].norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(circle[1], torch.tensor([math.cos(2 * math.pi / 7), math.sin(2 * math.pi / 7)]))
    assert torch.equal(circle[7], torch.zeros(2))
    with pytest.raises(ValueError, match="K <= 7"):
        CyclicSource(9).circle_embeddings()
    longer = CyclicSource(3, length=8)
    assert longer.decode(longer.sequences()[0]) == "ABCABCAB"


def test_hmm_is_seeded_readable_and_low_entropy():
    a, b = HMMSource(24, 120, 0, 32), HMMSource(24, 120, 0, 32)
    assert a.word_strings == b.word_strings and torch.equal(a.log_trans, b.log_trans)
    other = HMMSource(24, 120, 7, 32)
    assert other.word_strings != a.word_strings
    assert a.vocab_size == 121 and a.mask_id == 120 and len(set(a.word_strings)) == 120
    ids = a.sample(200, gen("hmm-text"))
    assert torch.equal(ids, b.sample(200, gen("hmm-text")))
    text = a.decode(ids[0])
    assert text[0].isupper() and all(w.strip(".").isalpha() for w in text.split())
    assert (ids == 0).any(dim=1).float().mean() > 0.8  # sentences end with "." tokens
    # low entropy: a few nats per token, far below the uniform log(120) ≈ 4.8
    nats_per_token = float(-a.log_prob(ids).mean()) / 32
    assert 0.5 < nats_per_token < 3.0
    # sparse structure: each class state emits a small subset of the words
    assert int(torch.isfinite(a.log_emit).sum(1).max()) <= 20


def test_topics_language_has_full_support_and_sticky_topics():
    source = TopicSource(8, 0, 64)
    assert source.n_states == 8 * 7 and source.vocab_size == 1 + 3 + 8 * 15 + 1
    assert torch.isfinite(source.log_init).all() and torch.isfinite(source.log_trans).all()
    assert torch.isfinite(source.log_emit).all()  # every word from every state: full support
    noise = torch.randint(source.n_words, (64, 64), generator=gen("topics-noise"))
    assert torch.isfinite(source.log_prob(noise)).all()
    ids = source.sample(256, gen("topics"))
    # exact samples are mostly single-topic: the most likely topic of every token agrees
    topic = source.topic_posterior(ids).argmax(-1)  # (256, 64)
    changes = (topic[:, 1:] != topic[:, :-1]).sum(1)
    assert float((changes == 0).double().mean()) > 0.5
    torch.testing.assert_close(source.topic_posterior(ids).sum(-1), torch.ones(256, 64, dtype=torch.float64))
    # shuffling a sequence's tokens breaks the grammar: far less likely than the sequence itself
    shuffled = torch.stack([row[torch.randperm(64, generator=gen("shuf", i))] for i, row in enumerate(ids)])
    assert float((source.log_prob(shuffled) < source.log_prob(ids) - 20).double().mean()) > 0.95
    # mixing two topics' sequences position by position costs ~ln(W/ε) per off-topic word
    other = ids[topic[:, 0] != topic[0, 0]][0]
    mixed = torch.where(torch.arange(64) % 2 == 0, ids[0], other).unsqueeze(0)
    assert float(source.log_prob(mixed)) < float(source.log_prob(ids[:1])) - 100
    text = source.decode(ids[0])
    assert text[0].isupper() and all(w.strip(".").isalpha() for w in text.split())
    assert source.word_strings[1:4] == sorted(source.word_strings[1:], key=len)[:3]  # short function words
    # seeded: same tables and words for the same seed, other words for another
    again, other_seed = TopicSource(8, 0, 64), TopicSource(8, 5, 64)
    assert torch.equal(again.log_emit, source.log_emit) and again.word_strings == source.word_strings
    assert other_seed.word_strings != source.word_strings
    # entropy rate: a structured language, far below uniform ln(124) ≈ 4.8 nats per token
    assert 1.0 < float(-source.log_prob(ids).mean()) / 64 < 2.0


def test_topics_rejects_bad_parameters():
    with pytest.raises(ValueError, match="smoothing"):
        TopicSource(4, 0, 8, smoothing=0.0)
    with pytest.raises(ValueError, match="switch"):
        TopicSource(4, 0, 8, switch=1.5)
    with pytest.raises(ValueError, match="topics"):
        TopicSource(0, 0, 8)


def test_log_prob_rejects_mask_and_out_of_range_ids():
    source = tiny_hmm()
    with pytest.raises(ValueError, match="words only"):
        source.log_prob(torch.tensor([[0, 1, 4, 2]]))
    with pytest.raises(ValueError, match="shape"):
        source.log_prob(torch.tensor([0, 1, 2, 3]))


# -- oracle posteriors against enumeration ----------------------------------------------------


def _masked_drafts(source, n, p_mask, key):
    ids = source.sample(n, gen("draft", key))
    hide = torch.rand(ids.shape, generator=gen("hide", key)) < p_mask
    return torch.where(hide, source.mask_id, ids)


@pytest.mark.parametrize("name", SOURCES)
def test_masked_posterior_matches_enumeration(name):
    source = SOURCES[name]()
    draft = _masked_drafts(source, 12, 0.6, name)
    visible = draft != source.mask_id

    def consistent(seqs):  # (B, N): 0 if the sequence agrees with every visible token, else -inf
        agree = ((seqs[None] == draft[:, None]) | ~visible[:, None]).all(-1)
        return torch.where(agree, 0.0, -math.inf).double()

    probs = source.masked_posterior(draft)
    assert probs.shape == (12, source.length, source.vocab_size) and probs.dtype == torch.float64
    torch.testing.assert_close(probs, brute_marginals(source, consistent), rtol=0, atol=1e-10)
    assert (probs[..., source.mask_id] == 0).all()
    one_hot = torch.nn.functional.one_hot(draft.clamp(max=source.n_words - 1), source.vocab_size).double()
    torch.testing.assert_close(probs[visible], one_hot[visible], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", SOURCES)
def test_masked_posterior_with_visible_error_matches_enumeration(name):
    source = SOURCES[name]()
    eps = 0.2
    w = source.n_words
    # arbitrary drafts, including visible tokens no sequence agrees with
    draft = torch.randint(source.vocab_size, (10, source.length), generator=gen("noisy", name))
    visible = draft != source.mask_id

    def observation(seqs):  # Σ_i log P(o_i | x_i) with o = x w.p. 1-ε, uniform word w.p. ε
        same = seqs[None] == draft[:, None]
        log_obs = torch.where(same, math.log(1 - eps + eps / w), math.log(eps / w)).double()
        return torch.where(visible[:, None], log_obs, torch.zeros_like(log_obs)).sum(-1)

    probs = source.masked_posterior(draft, visible_error=eps)
    torch.testing.assert_close(probs, brute_marginals(source, observation), rtol=0, atol=1e-10)


def test_zero_visible_error_on_an_impossible_draft_is_the_fewest_mismatch_limit():
    source = CyclicSource(7)
    draft = torch.tensor([[0, 1, 2, 3, 1, 5, 3]])  # ABCDBFD: no cyclic shift agrees with it
    probs = source.masked_posterior(draft)
    assert torch.isfinite(probs).all()
    # shift 0 (ABCDEFG) disagrees in 2 places, every other shift in more: it is the limit
    torch.testing.assert_close(probs[0], torch.nn.functional.one_hot(torch.arange(7), 8).double())
    # a small ε agrees with the limit
    near = source.masked_posterior(draft, visible_error=1e-9)
    torch.testing.assert_close(near, probs, rtol=0, atol=1e-6)


def test_zero_visible_error_limit_on_an_impossible_hmm_draft():
    source = tiny_hmm()
    draft = torch.tensor([[0, 4, 4, 4], [1, 4, 4, 4]])  # "." never starts a sequence: row 0 is impossible
    seqs, log_p = all_sequences(source)
    assert not torch.isfinite(log_p[seqs[:, 0] == 0]).any()
    probs = source.masked_posterior(draft)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, source.masked_posterior(draft, visible_error=1e-12), rtol=0, atol=1e-6)


def test_log_sum_is_exact_over_huge_dynamic_ranges():
    """The HMM's fast exp-matmul path falls back to exact logsumexp where it could underflow."""
    from dsl.sources.hmm import _LogWeights

    table = torch.randn(5, 7, generator=gen("lw"), dtype=torch.float64)
    table[table < -0.5] = -math.inf  # sparse weights
    weights = _LogWeights(table)
    values = 400.0 * torch.randn(300, 7, generator=gen("lw-v"), dtype=torch.float64)
    values[::7, 2] = -math.inf
    exact = torch.logsumexp(values[:, None, :] + table[None], dim=-1)  # (300, 5)
    torch.testing.assert_close(weights(values), exact, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", SOURCES)
def test_dsl_posterior_matches_gaussian_bayes_at_mixed_snrs(name):
    """App A.1: p(x | z) from Gaussian densities at per-token γ equals the γ-free tilted oracle."""
    source = SOURCES[name]()
    emb = (source.circle_embeddings(torch.float64) if name == "cyclic" else
           spherical_embeddings(source.vocab_size, 3, source.mask_id, gen("emb"), dtype=torch.float64))
    ids = source.sample(16, gen("dsl", name))
    gamma = torch.exp(torch.randn(16, source.length, generator=gen("gamma", name), dtype=torch.float64))
    z = corrupt(emb[ids], gamma, gen("z", name))  # (16, L, d)

    def gaussian(seqs):  # Σ_i log N(z_i; γ_i x_i, γ_i I), dropping x-independent terms
        x = emb[seqs]  # (N, L, d)
        sq = ((z[:, None] - gamma[:, None, :, None] * x[None]) ** 2).sum(-1)  # (B, N, L)
        return (-sq / (2 * gamma[:, None])).sum(-1)

    probs = source.dsl_posterior(z, emb)
    torch.testing.assert_close(probs, brute_marginals(source, gaussian), rtol=0, atol=1e-10)
    torch.testing.assert_close(source.posterior_mean(z, emb), probs @ emb)


@pytest.mark.parametrize("name", SOURCES)
def test_log_posterior_is_the_normalised_gaussian_bayes_posterior(name):
    source = SOURCES[name]()
    emb = spherical_embeddings(source.vocab_size, 3, source.mask_id, gen("lp-emb"), dtype=torch.float64)
    seqs, log_p = all_sequences(source)
    ids = source.sample(3, gen("lp", name))
    gamma = torch.exp(torch.randn(3, source.length, generator=gen("lp-gamma", name), dtype=torch.float64))
    z = corrupt(emb[ids], gamma, gen("lp-z", name))  # (3, L, d)
    every = source.log_posterior(seqs.repeat(3, 1), z.repeat_interleave(len(seqs), 0), emb).view(3, -1)
    torch.testing.assert_close(torch.logsumexp(every, -1), torch.zeros(3, dtype=torch.float64))
    sq = ((z[:, None] - gamma[:, None, :, None] * emb[seqs][None]) ** 2).sum(-1)  # (3, N, L)
    bayes = torch.log_softmax(log_p[None] - (sq / (2 * gamma[:, None])).sum(-1), dim=-1)
    possible = torch.isfinite(log_p)
    torch.testing.assert_close(every[:, possible], bayes[:, possible], rtol=0, atol=1e-9)


def test_single_token_uniform_prior_posterior_is_softmax():
    source = CyclicSource(6, length=1)  # one position: the uniform prior over six words
    emb = spherical_embeddings(7, 4, 6, gen("one"), dtype=torch.float64)
    z = 3.0 * torch.randn(50, 1, 4, generator=gen("one-z"), dtype=torch.float64)
    probs = source.dsl_posterior(z, emb)
    torch.testing.assert_close(probs[:, 0, :6], torch.softmax(z[:, 0] @ emb[:6].T, dim=-1))


@pytest.mark.parametrize("name", SOURCES)
def test_dsl_posterior_is_stable_at_huge_snr(name):
    source = SOURCES[name]()
    emb = spherical_embeddings(source.vocab_size, 8, source.mask_id, gen("big"), dtype=torch.float64)
    ids = source.sample(8, gen("big", name))
    probs = source.dsl_posterior(2000.0 * emb[ids], emb)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.argmax(-1), ids)


def test_default_hmm_oracles_are_normalised():
    source = HMMSource(24, 120, 0, 16)
    emb = spherical_embeddings(121, 64, 120, gen("default"), dtype=torch.float64)
    ids = source.sample(4, gen("default"))
    probs = source.dsl_posterior(corrupt(emb[ids], torch.full((4, 16), 2.0, dtype=torch.float64),
                                         gen("default-z")), emb)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 16, dtype=torch.float64))
    masked = source.masked_posterior(torch.full((4, 16), 120))
    # with everything masked the first position's posterior is the emission of the start states
    first = (source.log_init.exp()[:, None] * source.log_emit.exp()).sum(0)
    torch.testing.assert_close(masked[0, 0, :120], first)


def test_build_source():
    data = DataConfig(hmm_states=5, hmm_words=9, hmm_seed=3, cyclic_k=4)
    hmm = build_source("hmm", data, 12)
    assert isinstance(hmm, HMMSource) and (hmm.vocab_size, hmm.length, hmm.n_states) == (10, 12, 5)
    cyclic = build_source("cyclic", data, 6)
    assert isinstance(cyclic, CyclicSource) and (cyclic.k, cyclic.length) == (4, 6)
    topics = build_source("topics", DataConfig(topics=3, topics_switch=0.1, topics_smoothing=0.01, topics_seed=2), 9)
    assert isinstance(topics, TopicSource) and (topics.topics, topics.length, topics.n_states) == (3, 9, 21)
    assert (topics.switch, topics.smoothing, topics.seed) == (0.1, 0.01, 2)
    with pytest.raises(ConfigError, match="data.source='text'"):
        build_source("text", data, 12)
    with pytest.raises(ConfigError, match="data.cyclic_k"):
        build_source("cyclic", DataConfig(cyclic_k=30), 6)
