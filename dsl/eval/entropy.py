"""Sentence entropy (Sec 6.1 "Metrics", App C.2): lexical diversity within each generated sequence.

For each sequence, the empirical distribution p of its token ids (the generator's own ids, before any
decoding; BOS/EOS ids included, as ReMDM's main.py) gives H = -Σ_v p_v ln p_v in nats; the score is
the mean over sequences. A sequence of one repeated token scores 0; L distinct tokens score ln L.

Samples stored as text only (a ``.txt`` file, JSON lines without ``ids``) are tokenized first, by
:func:`text_token_ids`: with the run's own tokenizer when the caller has it (``checkpoint=`` of
``jobs/evaluate.py``), else GPT-2's BPE when its files load offline (the paper's and ReMDM's samples are
GPT-2 tokens), else as whitespace-separated words. The score depends on that choice, so it is recorded
beside the score.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from dsl.errors import UserError


def sequence_entropy(ids: Sequence[int]) -> float:
    """Shannon entropy (nats) of the token-id histogram of one sequence."""
    n = len(ids)
    if n == 0:
        raise UserError("sentence entropy: a sample has no token ids")
    return -sum((c / n) * math.log(c / n) for c in Counter(int(t) for t in ids).values())


def sentence_entropy(ids_list: Sequence[Sequence[int]]) -> float:
    """Mean over sequences of :func:`sequence_entropy`."""
    if len(ids_list) == 0:
        raise UserError("sentence entropy: no samples (empty sample set)")
    return sum(sequence_entropy(ids) for ids in ids_list) / len(ids_list)


def text_token_ids(texts: Sequence[str], tokenizer: object | None = None,
                   tokenizer_name: str = "run") -> tuple[list[list[int]], str]:
    """``(token ids of each text, the tokenizer used)`` for sentence entropy of text-only samples."""
    if tokenizer is None:
        from dsl.data.tokenizers import GPT2Tokenizer

        try:
            tokenizer, tokenizer_name = GPT2Tokenizer.from_pretrained("gpt2"), "gpt2"
        except UserError:
            tokenizer = None
    if tokenizer is not None:
        return [list(tokenizer.encode(t)) for t in texts], tokenizer_name
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts], "words"


__all__ = ["sentence_entropy", "sequence_entropy", "text_token_ids"]
