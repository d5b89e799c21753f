"""Sentence entropy (Sec 6.1 "Metrics", App C.2): lexical diversity within each generated sequence.

For each sequence, the empirical distribution p of its token ids (the generator's own ids, before any
decoding; BOS/EOS ids included, as ReMDM's main.py) gives H = -Σ_v p_v ln p_v in nats; the score is
the mean over sequences. A sequence of one repeated token scores 0; L distinct tokens score ln L.
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


__all__ = ["sentence_entropy", "sequence_entropy"]
