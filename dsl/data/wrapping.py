"""MDLM's sequence layouts (kuleshov-group/mdlm ``dataloader.py``: wrapped and padded).

Wrapped: every document's tokens get one EOS appended, the stream is cut into chunks of L−2 tokens and
each chunk becomes ``[BOS] chunk [EOS]`` — L tokens, all attended, so position 0 and L−1 are always
BOS/EOS and documents inside a block are separated by EOS.

One deliberate difference from MDLM: MDLM drops the remainder of every ``datasets.map`` batch of 1000
documents; we carry the remainder over to the next document and drop only the tail of the whole pass.
That keeps a streamed corpus and an in-memory one block-for-block identical, whatever the batching.

Not wrapped: one document per row, ``[BOS] doc[:L−2] [EOS]`` padded with the tokenizer's ``[PAD]`` id,
mask 0 on the padding (MDLM's lm1b layout, which truncates long documents). MDLM pads with
``tokenizer.pad_token_id`` (kuleshov-group/mdlm, dataloader.py ``get_tokenizer``/``padding='max_length'``):
text8's ``[PAD]`` = 5, and for GPT-2 the added ``[PAD]`` gets id 50257, the id MDLM also uses as mask.
Its DiT attends to padding (no attention mask), so the id changes what the model sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class WrapState:
    """Where a wrapped stream stands: the next document to read and the tokens carried over."""

    doc: int = 0
    carry: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"doc": self.doc, "carry": list(self.carry)}

    @classmethod
    def from_json(cls, d: dict) -> WrapState:
        return cls(int(d["doc"]), [int(t) for t in d["carry"]])


def wrap_documents(token_docs: Iterable[list[int]], length: int, bos_id: int, eos_id: int,
                   state: WrapState | None = None) -> Iterator[tuple[list[int], WrapState]]:
    """Yield ``(block, state_after_block)`` for each L-token block; ``state`` resumes a stream.

    ``token_docs`` must start at document ``state.doc``. The yielded state is what a reader needs to
    continue right after that block (the carried tokens are < L−2, so it is small enough for JSON).
    """
    if length < 3:
        raise ValueError(f"wrapped blocks need length >= 3 (BOS, a token, EOS); got {length}")
    body = length - 2
    state = WrapState() if state is None else WrapState(state.doc, list(state.carry))
    buf = list(state.carry)
    doc = state.doc
    for tokens in token_docs:
        buf.extend(tokens)
        buf.append(eos_id)
        doc += 1
        start = 0
        while len(buf) - start >= body:
            chunk = buf[start:start + body]
            start += body
            yield [bos_id, *chunk, eos_id], WrapState(doc, buf[start:])
        buf = buf[start:]


def pad_document(tokens: list[int], length: int, bos_id: int, eos_id: int,
                 pad_id: int) -> tuple[list[int], list[int]]:
    """``([BOS] tokens[:L−2] [EOS] [PAD]…, mask)`` with mask 1 on BOS, tokens and EOS."""
    body = tokens[:length - 2]
    ids = [bos_id, *body, eos_id]
    mask = [1] * len(ids)
    pad = length - len(ids)
    return ids + [pad_id] * pad, mask + [0] * pad


__all__ = ["WrapState", "wrap_documents", "pad_document"]
