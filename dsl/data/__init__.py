"""Data: tokenizers, corpora and MDLM wrapping behind one call, :func:`build_data`.

A batch is a deterministic function of (seed, split, step, global row index): row ``r`` of step ``s``
is sequence ``g = s·B + r`` of the split's stream (B = the global batch). Rank ``k`` of ``W`` workers
takes rows ``a·W·b + k·b … + b−1`` of accumulation slice ``a`` (b = its micro-batch), so the union over
ranks and slices is exactly the single-process batch, and a resumed run sees the same sequences.

Where the sequences come from and in which order (synthetic streams, loaded or streamed text corpora):
:mod:`dsl.data.blocks`; prepared token stores: :mod:`dsl.data.prepared`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsl.atomic import atomic_path
from dsl.config import ConfigError, RunConfig
from dsl.data.blocks import MemoryBlocks, StreamBlocks, SyntheticBlocks, TextStream
from dsl.data.corpora import HFCorpus, LocalCorpus, open_corpus
from dsl.data.prepared.layout import PREFIX as PREPARED  # data.source=prepared:<dir or s3://...>
from dsl.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    SourceTokenizer,
    load_tokenizer,
)
from dsl.data.wrapping import WrapState, pad_document, wrap_documents
from dsl.errors import UserError
from dsl.sources import SOURCE_NAMES

SYNTHETIC = SOURCE_NAMES
TOKENIZERS = "auto, char, gpt2, bpe or a saved tokenizer directory"
BPE_TRAIN_CHARS = 50_000_000  # a BPE is trained on at most this much training text (a prefix)


def global_rows(batch_size: int, rank: int, world: int, micro: int, accum: int) -> torch.Tensor:
    """Rows (within the step's global batch) that rank ``rank`` computes in accumulation slice ``accum``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must lie in [0, world={world})")
    start = accum * world * micro + rank * micro
    if micro < 1 or start + micro > batch_size:
        raise ValueError(f"micro={micro}, accum={accum}, rank={rank}/{world} reach past the global batch "
                         f"train.batch_size={batch_size}")
    return torch.arange(start, start + micro)


class Data:
    """Tokenizer plus the deterministic batch function of a run."""

    def __init__(self, tokenizer: Any, store: Any, length: int, batch_size: int, source: str) -> None:
        self.tokenizer, self.store, self.length, self.batch_size, self.source = (
            tokenizer, store, length, batch_size, source)
        self.vocab_size = int(tokenizer.vocab_size)
        self.mask_id = int(tokenizer.mask_id)

    def batch(self, split: str, step: int, rank: int = 0, world: int = 1, micro: int | None = None,
              accum: int = 0) -> dict[str, torch.Tensor]:
        """``{"ids": (b, L) long, "mask": (b, L) long, "rows": (b,) rows within the global batch}``."""
        if split not in ("train", "valid"):
            raise ValueError(f"split={split!r}: expected train or valid")
        micro = self.batch_size // world if micro is None else micro
        rows = global_rows(self.batch_size, rank, world, micro, accum)
        pairs = [self.store.get(split, step * self.batch_size + int(r)) for r in rows]
        return {"ids": torch.stack([p[0] for p in pairs]), "mask": torch.stack([p[1] for p in pairs]),
                "rows": rows}

    def state_dict(self) -> dict:
        """Where a streamed corpus stands (empty for stores that seek for free)."""
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state or {})


def _cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_tokenizer(name: str, corpus: Any, data_cfg: Any) -> Any:
    if name == "char":
        return CharTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.from_pretrained("gpt2")
    if name == "auto":
        if isinstance(corpus, HFCorpus) and corpus.name == "text8":
            return CharTokenizer()
        try:
            return GPT2Tokenizer.from_pretrained("gpt2")
        except UserError:
            pass  # offline: a BPE trained on the corpus is the documented fallback
        name = "bpe"
    if name == "bpe":
        cache = None
        if data_cfg.cache_dir:
            cache = Path(data_cfg.cache_dir) / f"tokenizer-bpe-{_cache_key(corpus.identity(), data_cfg.bpe_vocab)}"
            if (cache / "tokenizer.json").is_file():
                return BPETokenizer.load(cache)

        def texts() -> Iterator[str]:
            total = 0
            for text in corpus.documents("train"):
                yield text
                total += len(text)
                if total >= BPE_TRAIN_CHARS:
                    return

        tok = BPETokenizer.train(texts(), data_cfg.bpe_vocab)
        if cache is not None:
            with atomic_path(cache) as tmp:
                tok.save(tmp)
        return tok
    if Path(name).is_dir():
        return load_tokenizer(name)
    raise ConfigError(f"data.tokenizer={name!r} is not one of: {TOKENIZERS} (no such directory)")


def check_source(run_cfg: RunConfig) -> None:
    """Cheap checks of ``data.source`` before anything is started: a local file or folder exists and has
    a readable type, an ``hf:`` name is known. Nothing is read or tokenized (a prepared store is checked
    by :func:`dsl.service.prepare_ray.check_prepared_data`)."""
    length = run_cfg.data.length or run_cfg.model.length
    if length > run_cfg.model.length:
        raise ConfigError(f"data.length={length} is longer than the model (model.length="
                          f"{run_cfg.model.length}); use data.length <= model.length")
    if run_cfg.data.source not in SYNTHETIC and not run_cfg.data.source.startswith(PREPARED):
        open_corpus(run_cfg.data.source, run_cfg.data, length)


def build_data(run_cfg: RunConfig, tokenizer: Any = None) -> Data:
    """The run's :class:`Data`; ``tokenizer`` (e.g. the one saved in a checkpoint) skips building one."""
    data_cfg = run_cfg.data
    length = data_cfg.length or run_cfg.model.length
    if length > run_cfg.model.length:
        raise ConfigError(f"data.length={length} is longer than the model (model.length="
                          f"{run_cfg.model.length}); use data.length <= model.length")
    batch_size = run_cfg.train.batch_size
    source = data_cfg.source
    if source in SYNTHETIC:
        if data_cfg.tokenizer not in ("auto", "source") and tokenizer is None:
            raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r}: synthetic source {source} has its own "
                              "word tokenizer; use data.tokenizer=auto")
        tok = tokenizer or SourceTokenizer.for_source(source, data_cfg, length)
        store = SyntheticBlocks(tok.source, run_cfg.seed, length)
        seq_len = store.get("train", 0)[0].shape[0]
        if seq_len > run_cfg.model.length:
            raise UserError(f"data.source={source}: sequences of {seq_len} tokens are longer than the model "
                            f"(model.length={run_cfg.model.length})")
        return Data(tok, store, seq_len, batch_size, source)

    if source.startswith(PREPARED):
        from dsl.data.prepared.reader import PreparedBlocks, open_for_run

        store, tok, length = open_for_run(run_cfg, tokenizer)
        return Data(tok, PreparedBlocks(store, run_cfg.seed, data_cfg.shuffle_window), length, batch_size, source)
    corpus = open_corpus(source, data_cfg, length)
    tok = tokenizer or text_tokenizer(data_cfg.tokenizer, corpus, data_cfg)
    if tok.bos_id is None or tok.eos_id is None:
        raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} has no BOS/EOS ids; text corpora need "
                          "char, gpt2, bpe or a saved text tokenizer")
    if not data_cfg.wrap and length < 3:
        raise ConfigError(f"model.length={length} is too short for [BOS] text [EOS] rows")
    streams = {split: TextStream(corpus, tok, split, length, data_cfg.wrap) for split in ("train", "valid")}
    if data_cfg.streaming:
        store: Any = StreamBlocks(streams, run_cfg.seed, data_cfg.shuffle_window, source)
    else:
        cache = None
        if data_cfg.cache_dir:
            tok_id = _cache_key(tok.kind, tok.vocab_size, tok.decode(range(min(tok.vocab_size, 512))))
            layout = "wrap" if data_cfg.wrap else f"pad-{tok.pad_id}"
            cache = Path(data_cfg.cache_dir) / f"blocks-{_cache_key(corpus.identity(), tok_id, length, layout)}"
        store = MemoryBlocks(streams, run_cfg.seed, data_cfg.shuffle_window, cache, source)
    return Data(tok, store, length, batch_size, source)


def heldout_blocks(run_cfg: RunConfig, tokenizer: Any, path: str = "", limit: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (N, L) of every held-out block, laid out exactly as the run's training blocks (MDLM
    wrapping, or one padded document per row), in corpus order: the run's own validation split, or the
    documents of the file ``path`` read the way the run's corpus is read (text8 runs cut it into
    L-character documents first, as MDLM does). ``limit`` > 0 keeps the first ``limit`` blocks; synthetic
    sources have no end, so they need it."""
    data_cfg = run_cfg.data
    length = data_cfg.length or run_cfg.model.length
    if data_cfg.source.startswith(PREPARED) and not path:  # the store's validation blocks, already laid out
        from dsl.data.prepared.reader import PreparedStore, read_blocks

        return read_blocks(PreparedStore(data_cfg.source[len(PREPARED):]), "valid", limit)
    if data_cfg.source in SYNTHETIC and not path:
        if limit < 1:
            raise ConfigError(f"data.source={data_cfg.source} is an endless synthetic stream: give how many "
                              "held-out sequences to score")
        tokenizer = tokenizer or SourceTokenizer.for_source(data_cfg.source, data_cfg, length)
        store = SyntheticBlocks(tokenizer.source, run_cfg.seed, length)
        pairs = [store.get("valid", g) for g in range(limit)]
    else:
        from dsl.data.corpora import FileCorpus

        if tokenizer.bos_id is None:
            raise UserError(f"heldout={path}: the run's tokenizer ({tokenizer.kind}) has no BOS/EOS to lay out text")
        corpus = FileCorpus(path, data_cfg, length) if path else open_corpus(data_cfg.source, data_cfg, length)
        stream = TextStream(corpus, tokenizer, "valid", length, data_cfg.wrap)
        pairs = []
        for ids, mask, _ in stream.blocks(WrapState()):
            pairs.append((torch.tensor(ids), torch.tensor(mask)))
            if len(pairs) == limit:
                break
        if not pairs:
            raise UserError(f"{f'heldout={path}' if path else f'data.source={data_cfg.source}'}: no held-out "
                            f"block of {length} tokens (too little text)")
    return torch.stack([p[0] for p in pairs]).long(), torch.stack([p[1] for p in pairs]).long()


__all__ = ["Data", "build_data", "check_source", "heldout_blocks", "text_tokenizer", "global_rows", "load_tokenizer", "CharTokenizer", "BPETokenizer",
           "GPT2Tokenizer", "SourceTokenizer", "LocalCorpus", "HFCorpus", "WrapState", "wrap_documents",
           "pad_document"]
