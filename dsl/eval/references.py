"""Where MAUVE's reference texts come from, and the one text rule applied to references and samples alike.

MDLM/ReMDM score samples against their OpenWebText validation set (kuleshov-group/remdm ``main.py``,
``dataloader.py``): the **last 100,000 documents of the train split** (OpenWebText has no other split),
**wrapped** exactly as training data — documents joined by EOS (``<|endoftext|>`` for GPT-2), cut into
``[BOS] 1022 tokens [EOS]`` blocks of L = 1024 — and decoded with special tokens kept, so both the
reference blocks and the samples carry literal ``<|endoftext|>`` strings.

- :func:`load_documents` reads the held-out documents of an ``hf:`` dataset: a hub name
  (``hf:openwebtext``) or a local dataset directory/file in the same layout, through the same
  ``datasets.load_dataset`` call and the same split (:func:`dsl.data.corpora.heldout_split`).
- :func:`sample_blocks` wraps them (:func:`dsl.data.wrapping.wrap_documents`) and keeps ``n`` blocks
  drawn uniformly without replacement by a seeded reservoir, in one pass and O(n) memory.
- :func:`apply_eot_rule`: ``keep`` leaves ``<|endoftext|>`` in the text (ReMDM's ``batch_decode``),
  ``drop`` deletes it (``skip_special_tokens=True``); MAUVE applies the same rule to both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from dsl.data.corpora import EOT, heldout_split
from dsl.data.wrapping import wrap_documents
from dsl.errors import UserError, one_line

EOT_RULES = ("keep", "drop")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def apply_eot_rule(texts: Sequence[str], rule: str) -> list[str]:
    """``texts`` with the literal ``<|endoftext|>`` kept (``keep``) or deleted (``drop``)."""
    if rule not in EOT_RULES:
        raise UserError(f"eval.eot={rule!r}: expected one of {', '.join(EOT_RULES)}")
    return list(texts) if rule == "keep" else [t.replace(EOT, "") for t in texts]


def eot_share(texts: Sequence[str]) -> float:
    """The share of ``texts`` holding a literal ``<|endoftext|>`` (recorded beside a score)."""
    return sum(EOT in t for t in texts) / max(1, len(texts))


def load_documents(spec: str, split: str, text_field: str,
                   heldout_docs: int) -> tuple[Iterator[str], str]:
    """(documents, the split read) of ``hf:<name>[:<config>]``; ``<name>`` is a hub dataset or a local
    dataset directory or .jsonl/.json/.parquet/.csv file. ``split`` '' = :func:`heldout_split`."""
    name, _, config = spec[len("hf:"):].partition(":")
    split = split or heldout_split(name, heldout_docs)
    try:
        import datasets

        if os.path.isfile(name):
            builder = _FILE_BUILDERS.get(os.path.splitext(name)[1])
            if builder is None:
                raise UserError(f"eval.reference={spec}: a local dataset file must be "
                                f"{'/'.join(_FILE_BUILDERS)}")
            rows = datasets.load_dataset(builder, data_files=name, split=split)
        else:
            rows = datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for "offline" / "no such split"
        raise UserError(f"eval.reference={spec}: cannot load split {split!r} ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); offline, pass a local dataset directory as hf:<dir>") from None
    if text_field not in rows.column_names:
        raise UserError(f"eval.reference={spec}: no column {text_field!r} (data.text_field); columns: "
                        f"{', '.join(rows.column_names)}")
    return (t for t in rows[text_field] if isinstance(t, str) and t.strip()), split


def sample_blocks(documents: Iterable[str], tokenizer: Any, length: int, n: int, seed: int,
                  progress: bool = False) -> tuple[list[list[int]], int]:
    """(``n`` wrapped ``length``-token blocks drawn without replacement, how many blocks there were).

    Reservoir sampling (Algorithm R) with a generator seeded by ``seed``: block i replaces a kept one
    with probability n/(i+1), so every n-subset of the blocks is equally likely and one pass suffices."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError(f"eval.reference_tokenizer: a {tokenizer.kind} tokenizer has no BOS/EOS to wrap blocks")
    encode_batch = getattr(tokenizer, "encode_batch", None)

    def token_docs() -> Iterator[list[int]]:
        batch: list[str] = []
        for text in documents:
            batch.append(text)
            if len(batch) == 256:
                yield from (encode_batch(batch) if encode_batch else map(tokenizer.encode, batch))
                batch = []
        yield from (encode_batch(batch) if encode_batch else map(tokenizer.encode, batch))

    gen = torch.Generator().manual_seed(int(seed))
    kept: list[list[int]] = []
    seen = 0
    blocks = wrap_documents(token_docs(), length, tokenizer.bos_id, tokenizer.eos_id)
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc="reference blocks", unit="block")
    for block, _ in blocks:
        if seen < n:
            kept.append(block)
        else:
            j = int(torch.randint(seen + 1, (1,), generator=gen))
            if j < n:
                kept[j] = block
        seen += 1
    if seen < n:
        raise UserError(f"the held-out documents give {seen} blocks of {length} tokens, fewer than the {n} "
                        f"references needed; use more held-out documents (eval.heldout_docs) or fewer samples")
    return kept, seen


def load_reference_tokenizer(spec: str) -> Any:
    """The tokenizer that wraps reference blocks: ``gpt2`` (the paper's, MDLM's conventions), a directory
    a dsl tokenizer saved, or a directory of Hugging Face GPT-2-format tokenizer files."""
    from pathlib import Path

    from dsl.data.tokenizers import META_FILE, GPT2Tokenizer, load_tokenizer

    if spec != "gpt2" and not Path(spec).is_dir():
        raise UserError(f"eval.reference_tokenizer={spec!r}: expected gpt2 or a tokenizer directory")
    if (Path(spec) / META_FILE).is_file():
        return load_tokenizer(spec)
    try:
        return GPT2Tokenizer.from_pretrained(spec)
    except UserError as exc:
        raise UserError(f"eval.reference_tokenizer={spec}: {str(exc).split(': ', 1)[-1]}") from None


__all__ = ["EOT_RULES", "apply_eot_rule", "eot_share", "load_documents", "load_reference_tokenizer",
           "sample_blocks"]
