"""A sticky-topic language with full support: the benchmark language of the small-scale Table 1.

Why this language. The paper's claim (Sec 1, 6.2) is about *parallel* decoding: a masked sampler with
T < L steps reveals about L/T tokens per step, each drawn from its own marginal given the current draft,
so tokens revealed together are independent even where the language couples them. That hurts in
proportion to how strongly tokens far apart depend on each other. Here every sequence has a topic that
all its content words must share, so the first steps of a small-T decode, which reveal several content
words at once from the topic-mixture marginal, usually mix topics; the rest of the decode (and any
remasking) must then repair or live with that. A sequential decode (T = L) almost never does.

Definition (all parameters fixed by ``seed`` and the four numbers below):

* hidden state = (topic k, grammatical class c), K topics × 7 classes;
* classes form one sentence grammar shared by all topics (probabilities in ``_GRAMMAR``):
  ``[DET [ADJ]] NOUN VERB [DET NOUN] .`` (3 to 7 tokens, mean about 5);
* the topic is sticky: it can change only at a sentence start, with probability ``switch``;
* emissions are sharply state dependent: "." ends a sentence; determiners are shared function words;
  adjectives, nouns and verbs are topic-specific words (``class_words`` per topic) with Zipf-like
  weights 1/rank;
* full support: every transition row and the initial distribution are mixed with the uniform
  distribution over states, and every emission row with the uniform distribution over words, with
  weight ``smoothing`` = ε. Every sequence therefore has finite probability (GenPPL under the true
  source is always defined), yet an off-grammar or off-topic token costs about ln(W/ε) nats.

Likelihoods, samples and the exact oracles (``masked_posterior``, ``dsl_posterior``) are the HMM
machinery of :mod:`dsl.sources.hmm` on these tables. Text reads as sentences of made-up words, one
vocabulary per topic ("Ta brou sheli pume. Ta ..."), so a text featurizer sees the words.
"""

from __future__ import annotations

import random

import torch

from dsl.seeding import derive_seed
from dsl.sources.hmm import HMMSource, pseudo_words

# classes: index → name; END emits "." and starts the next sentence
_CLASSES = ("END", "DET", "ADJ", "NOUN", "VERB", "ODET", "ONOUN")
_END, _DET, _ADJ, _NOUN, _VERB, _ODET, _ONOUN = range(len(_CLASSES))
# the sentence grammar: class → {next class: probability} (before smoothing, within one topic)
_GRAMMAR = {
    _END: {_DET: 0.7, _NOUN: 0.3},
    _DET: {_ADJ: 0.35, _NOUN: 0.65},
    _ADJ: {_NOUN: 1.0},
    _NOUN: {_VERB: 1.0},
    _VERB: {_ODET: 0.6, _END: 0.4},
    _ODET: {_ONOUN: 1.0},
    _ONOUN: {_END: 1.0},
}
_DETERMINERS = 3  # shared function words
CLASS_WORDS = (4, 6, 5)  # topic-specific adjectives, nouns, verbs (object nouns share the nouns)


class TopicSource(HMMSource):
    """``topics`` topics; word 0 is ".", then the shared determiners, then each topic's words."""

    def __init__(self, topics: int, seed: int, length: int, switch: float = 0.02, smoothing: float = 0.002,
                 class_words: tuple[int, int, int] = CLASS_WORDS):
        if topics < 1:
            raise ValueError(f"topics={topics} must be >= 1")
        if not 0.0 <= switch <= 1.0:
            raise ValueError(f"topic switch probability {switch} must lie in [0, 1]")
        if not 0.0 < smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing} must lie in (0, 1): full support needs ε > 0")
        if length < 1:
            raise ValueError(f"topics length={length} must be >= 1")
        if len(class_words) != 3 or min(class_words) < 1:
            raise ValueError(f"class_words={class_words} must be three counts >= 1 (adjectives, nouns, verbs)")
        self.seed = seed
        self.topics = topics
        self.class_words = {_ADJ: class_words[0], _NOUN: class_words[1], _VERB: class_words[2]}
        self.switch = float(switch)
        self.smoothing = float(smoothing)
        per_topic = sum(self.class_words.values())
        n_words = 1 + _DETERMINERS + topics * per_topic
        pool = pseudo_words(n_words - 1, random.Random(derive_seed(seed, "topic-words")))
        determiners = sorted(pool, key=len)[:_DETERMINERS]  # the shortest spellings, as function words
        spellings = determiners + [w for w in pool if w not in determiners]
        gen = torch.Generator().manual_seed(derive_seed(seed, "topic-tables"))
        init, trans, emit = self.structured_tables(gen)
        eps = self.smoothing
        states = trans.shape[0]
        init = (1 - eps) * init + eps / states
        trans = (1 - eps) * trans + eps / states
        emit = (1 - eps) * emit + eps / n_words
        self._install(init, trans, emit, ["."] + spellings, length)

    # -- the structure ------------------------------------------------------------------------
    def state(self, topic: int, cls: int) -> int:
        return topic * len(_CLASSES) + cls

    def topic_words(self, topic: int, cls: int) -> list[int]:
        """Word ids of ``topic``'s class ``cls`` (DET/ODET: the shared determiners; END: ".")."""
        if cls == _END:
            return [0]
        if cls in (_DET, _ODET):
            return list(range(1, 1 + _DETERMINERS))
        base = 1 + _DETERMINERS + topic * sum(self.class_words.values())
        offsets = {_ADJ: 0, _NOUN: self.class_words[_ADJ], _VERB: self.class_words[_ADJ] + self.class_words[_NOUN]}
        key = _NOUN if cls == _ONOUN else cls
        start = base + offsets[key]
        return list(range(start, start + self.class_words[key]))

    def structured_tables(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tables before smoothing: init (S,), trans (S, S) [from, to], emit (S, W), float64."""
        k, c = self.topics, len(_CLASSES)
        n_words = 1 + _DETERMINERS + k * sum(self.class_words.values())
        trans = torch.zeros(k * c, k * c, dtype=torch.float64)
        emit = torch.zeros(k * c, n_words, dtype=torch.float64)
        init = torch.zeros(k * c, dtype=torch.float64)
        for topic in range(k):
            for cls, nxt in _GRAMMAR.items():
                for to, p in nxt.items():
                    if cls == _END and k > 1:  # a sentence start: the topic may switch
                        trans[self.state(topic, cls), self.state(topic, to)] += p * (1 - self.switch)
                        for other in range(k):
                            if other != topic:
                                trans[self.state(topic, cls), self.state(other, to)] += p * self.switch / (k - 1)
                    else:
                        trans[self.state(topic, cls), self.state(topic, to)] += p
            for to, p in _GRAMMAR[_END].items():  # sequences start at a sentence start, topic uniform
                init[self.state(topic, to)] = p / k
            for cls in range(c):
                words = self.topic_words(topic, cls)
                # Zipf-like weights 1/rank in a seeded order; the shared determiners rank alike in every topic
                order = torch.randperm(len(words), generator=gen) if cls not in (_DET, _ODET, _END) \
                    else torch.arange(len(words))
                weights = 1.0 / (1.0 + torch.arange(len(words), dtype=torch.float64))
                emit[self.state(topic, cls), torch.tensor(words)[order]] = weights / weights.sum()
        return init, trans, emit

    def topic_posterior(self, ids: torch.Tensor) -> torch.Tensor:
        """p(topic of position i | x) (B, L, K): the exact topic of each token given the whole sequence."""
        post = self.state_posterior(ids)  # (B, L, S), states ordered topic-major
        return post.reshape(*post.shape[:2], self.topics, len(_CLASSES)).sum(-1)


__all__ = ["TopicSource"]
