"""Tokenizers with one interface: ``encode, decode, vocab_size (incl. mask), mask_id, bos_id, eos_id,
save(dir), load(dir)``; :func:`load_tokenizer` reopens any of them from the directory it saved.

- :class:`CharTokenizer`: MDLM's text8 tokenizer (kuleshov-group/mdlm ``dataloader.py``
  ``Text8Tokenizer``): 35 ids, [MASK]=4, [PAD]=5, a–z, space.
- :class:`GPT2Tokenizer`: GPT-2 BPE as MDLM uses it (``dataloader.py`` ``get_tokenizer``): V=50258, mask 50257, BOS=EOS=50256,
  and [PAD] = 50257 too (MDLM adds ``[PAD]`` after the 50257 GPT-2 ids, where the mask also sits).
- :class:`BPETokenizer`: a byte-level BPE trained with ``tokenizers`` on the corpus, saved with the run;
  like GPT-2 it pads with the mask id.

``special_ids`` are the ids that are not text (BOS, EOS, mask, pad, ...): bits per character count the
characters of every other id.
- :class:`SourceTokenizer`: the word vocabulary of a synthetic source (``hmm``/``cyclic``/``topics``).

``encode`` never adds BOS/EOS: wrapping (:mod:`dsl.data.wrapping`) places them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dsl.errors import UserError

META_FILE = "dsl_tokenizer.json"


def _write_meta(directory: str | os.PathLike, kind: str, **fields: Any) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / META_FILE).write_text(json.dumps({"kind": kind, **fields}, indent=2, sort_keys=True))


def _read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise UserError(f"{path}: no tokenizer saved here (expected {META_FILE} written by a dsl tokenizer)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _hub_offline() -> bool:
    """True when the environment says not to contact the Hugging Face hub (a failed lookup costs ~50 s)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DSL_OFFLINE"))


class CharTokenizer:
    """text8 characters (MDLM ``Text8Tokenizer``): specials 0–7, a–z = 8..33, space = 34; lowercases."""

    SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
    kind = "char"

    def __init__(self) -> None:
        self.bos_id, self.eos_id, self.mask_id, self.pad_id, self.unk_id = 2, 3, 4, 5, 7
        self.special_ids = frozenset(range(len(self.SPECIALS)))  # [UNK] too: it stands for no known character
        chars = "abcdefghijklmnopqrstuvwxyz "
        self._to_id = {c: 8 + i for i, c in enumerate(chars)}
        self._to_text = list(self.SPECIALS) + list(chars)
        self.vocab_size = len(self._to_text)  # 35

    def encode(self, text: str) -> list[int]:
        return [self._to_id.get(c, self.unk_id) for c in text.lower()]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._to_text[int(i)] for i in ids)

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        return cls()


class _HFBacked:
    """Shared code of the two ``tokenizers``-library BPEs: the fast tokenizer lives in ``self._tok``."""

    _tok: Any
    kind = ""

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class BPETokenizer(_HFBacked):
    """Byte-level BPE trained on the corpus; ``<|endoftext|>`` is BOS=EOS (id 0) and ``[MASK]`` is last."""

    kind = "bpe"
    EOT, MASK = "<|endoftext|>", "[MASK]"

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.bos_id = self.eos_id = tok.token_to_id(self.EOT)
        self.mask_id = tok.token_to_id(self.MASK)
        self.pad_id = self.mask_id  # as MDLM's GPT-2: the pad id is the mask id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset({self.bos_id, self.mask_id})
        if self.bos_id is None or self.mask_id != self.vocab_size - 1:
            raise UserError(f"BPE tokenizer lacks {self.EOT!r} or its {self.MASK!r} is not the last id "
                            "(expected a tokenizer trained by dsl.data.BPETokenizer.train)")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts``; ``vocab_size`` counts the mask (MDLM: the mask is the last id)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[cls.EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        tok.add_special_tokens([cls.MASK])
        return cls(tok)

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind)
        self._tok.save(str(Path(directory) / "tokenizer.json"))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing (a saved BPE tokenizer needs tokenizer.json)")
        return cls(Tokenizer.from_file(str(path)))


class GPT2Tokenizer(_HFBacked):
    """GPT-2 BPE with MDLM's conventions: mask = 50257 appended after the 50257 GPT-2 ids (V = 50258)."""

    kind = "gpt2"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        self._tok = hf_tokenizer.backend_tokenizer
        self.bos_id = self.eos_id = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
        # kuleshov-group/mdlm diffusion.py: mask_index = tokenizer.vocab_size (no mask token in GPT-2's
        # vocabulary); dataloader.py adds pad_token='[PAD]', which lands on that same id
        self.mask_id = hf_tokenizer.vocab_size
        self.pad_id = self.mask_id
        self.vocab_size = self.mask_id + 1
        self.special_ids = frozenset({self.bos_id, self.mask_id, *hf_tokenizer.all_special_ids})

    @classmethod
    def from_pretrained(cls, name_or_dir: str = "gpt2") -> GPT2Tokenizer:
        """Local directory first; the hub only when ``name_or_dir`` is not a directory and we are online."""
        from transformers import AutoTokenizer

        local = Path(name_or_dir).is_dir()
        try:
            hf = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local or _hub_offline())
        except (OSError, ValueError) as exc:
            where = f"directory {name_or_dir}" if local else f"hub id {name_or_dir!r} (offline or unreachable)"
            raise UserError(f"data.tokenizer=gpt2: cannot load GPT-2 tokenizer files from {where}: "
                            f"{type(exc).__name__}; use data.tokenizer=bpe or a saved tokenizer directory") \
                from None
        return cls(hf)

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind)
        self._hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GPT2Tokenizer:
        return cls.from_pretrained(str(directory))


class SourceTokenizer:
    """Words of a synthetic source: ids are the source's own, text is the source's ``decode``."""

    kind = "source"

    def __init__(self, source: Any, name: str, params: dict[str, Any]) -> None:
        self.source, self.name, self.params = source, name, dict(params)
        self.vocab_size = int(source.vocab_size)
        self.mask_id = int(source.mask_id)
        # synthetic sequences are whole samples of the source: nothing to wrap or pad, no BOS/EOS
        self.bos_id = self.eos_id = self.pad_id = None
        self.special_ids = frozenset({self.mask_id})
        self._words: dict[str, int] | None = None

    @classmethod
    def for_source(cls, name: str, data_cfg: Any, length: int) -> SourceTokenizer:
        from dsl.sources import build_source

        params = {"hmm_states": data_cfg.hmm_states, "hmm_words": data_cfg.hmm_words,
                  "hmm_seed": data_cfg.hmm_seed, "cyclic_k": data_cfg.cyclic_k, "length": int(length)}
        if name == "topics":  # only its own keys: tokenizers saved before the topics source load unchanged
            params.update(topics=data_cfg.topics, topics_switch=data_cfg.topics_switch,
                          topics_smoothing=data_cfg.topics_smoothing, topics_seed=data_cfg.topics_seed)
        return cls(build_source(name, data_cfg, length), name, params)

    def decode(self, ids: Iterable[int]) -> str:
        import torch

        return self.source.decode(torch.as_tensor([int(i) for i in ids], dtype=torch.long))

    def encode(self, text: str) -> list[int]:
        """Inverse of ``decode`` up to case: words by spaces, "." apart, letter runs (cyclic) by letter."""
        if self._words is None:
            self._words = {self.decode([i]).strip().lower(): i
                           for i in range(self.vocab_size) if i != self.mask_id}
        out: list[int] = []
        for word in text.replace(".", " . ").lower().split():
            if word in self._words:
                out.append(self._words[word])
            elif all(c in self._words for c in word):
                out.extend(self._words[c] for c in word)
            else:
                raise UserError(f"word {word!r} is not in the {self.name} source's vocabulary")
        return out

    def save(self, directory: str | os.PathLike) -> None:
        _write_meta(directory, self.kind, source=self.name, params=self.params)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SourceTokenizer:
        from dsl.config import DataConfig

        meta = _read_meta(directory)
        params = dict(meta["params"])
        length = params.pop("length")
        data_cfg = DataConfig()
        for k, v in params.items():
            setattr(data_cfg, k, v)
        return cls.for_source(meta["source"], data_cfg, length)


_KINDS: dict[str, Any] = {c.kind: c for c in (CharTokenizer, BPETokenizer, GPT2Tokenizer, SourceTokenizer)}


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what the ids mean: kind, special ids and the id -> token table (not how text is split).

    Two tokenizers with the same fingerprint turn the same ids into the same tokens, so blocks made by one
    can train a model that the other decodes.
    """
    import hashlib

    inner = getattr(tok, "_tok", None)
    if inner is not None:  # tokenizers-library BPEs: the vocabulary with added tokens
        vocab = inner.get_vocab(with_added_tokens=True)
        table: Any = sorted((i, t) for t, i in vocab.items())
    elif isinstance(tok, SourceTokenizer):
        table = {"source": tok.name, "params": tok.params}
    else:
        table = [tok.decode([i]) for i in range(tok.vocab_size)]
    desc = {"kind": tok.kind, "vocab_size": int(tok.vocab_size), "mask_id": tok.mask_id, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "table": table}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """Reopen a tokenizer from the directory its ``save`` wrote."""
    meta = _read_meta(directory)
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise UserError(f"{Path(directory) / META_FILE}: unknown tokenizer kind {kind!r} "
                        f"(known: {', '.join(sorted(_KINDS))})")
    return _KINDS[kind].load(directory)


__all__ = ["CharTokenizer", "BPETokenizer", "GPT2Tokenizer", "SourceTokenizer", "load_tokenizer",
           "tokenizer_fingerprint"]
