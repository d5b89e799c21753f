"""Text corpora as lazily iterated documents, split deterministically into train and valid.

A corpus is named by ``data.source``:

- a local file or folder: ``.txt`` (documents separated by ``<|endoftext|>`` when the file has it,
  otherwise by blank lines — ``data.txt_split`` picks another reading), ``.jsonl`` (one JSON object per
  line, text in ``data.text_field``), ``.parquet`` (column ``data.text_field``); a folder means all such
  files below it in sorted path order. Document i goes to valid when a stable hash of i falls below
  ``data.valid_fraction`` — independent of the corpus size, so a streamed and a loaded corpus agree.
- ``hf:<name>[:<config>]``: the Hugging Face dataset with MDLM's splits (kuleshov-group/mdlm ``dataloader.py``
  ``get_dataset``):
  openwebtext (train = ``train[:-100000]``, valid = ``train[-100000:]``), wikitext-103
  (``wikitext-103-raw-v1``, train/validation), lm1b (train/test), text8 (characters [0, 90M) train,
  [95M, end) valid = MDLM's test range; MDLM cuts the string into L-character documents before wrapping).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsl.errors import UserError
from dsl.seeding import derive_seed
from dsl.utf8 import read_utf8, utf8_lines

SUFFIXES = (".txt", ".jsonl", ".parquet")
EOT = "<|endoftext|>"
HF_NAMES = ("openwebtext", "text8", "wikitext-103", "lm1b")
OWT_HELDOUT_DOCS = 100_000  # kuleshov-group/mdlm dataloader.py: openwebtext-split validates on train[-100000:]


def heldout_split(name: str, heldout_docs: int = OWT_HELDOUT_DOCS) -> str:
    """MDLM's held-out split of a Hugging Face dataset ``name``: the last ``heldout_docs`` documents of
    the train split for OpenWebText, which has no other split, and for a local dataset path (a copy in
    that layout); lm1b's test split; every other dataset's validation split."""
    import os

    if name == "openwebtext" or os.path.exists(name):
        return f"train[-{int(heldout_docs)}:]"
    return "test" if name == "lm1b" else "validation"


def is_valid_doc(index: int, valid_fraction: float) -> bool:
    """Deterministic split by document index (a stable hash, so it needs no corpus size)."""
    return derive_seed(0, "valid-split", index) / float(1 << 63) < valid_fraction


def _split_txt(text: str, how: str) -> list[str]:
    if how == "auto":
        how = "eot" if EOT in text else "paragraph"
    if how == "eot":
        parts = text.split(EOT)
    elif how == "paragraph":  # blank lines may hold spaces (WikiText's are " \n")
        parts = re.split(r"\n[ \t\r]*\n", text)
    elif how == "line":
        parts = text.split("\n")
    else:  # "file"
        parts = [text]
    return [p.strip() for p in parts if p.strip()]


def _file_documents(path: Path, data_cfg: Any) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from _split_txt(read_utf8(path), data_cfg.txt_split)
    elif path.suffix == ".jsonl":
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row[data_cfg.text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string field "
                                f"{data_cfg.text_field!r} (data.text_field)") from None
            if isinstance(text, str) and text.strip():
                yield text
    else:
        from datasets import load_dataset

        rows = load_dataset("parquet", data_files=str(path), split="train", streaming=True)
        for row in rows:
            if data_cfg.text_field not in row:
                raise UserError(f"{path}: no column {data_cfg.text_field!r} (data.text_field); "
                                f"columns: {', '.join(row)}")
            text = row[data_cfg.text_field]
            if isinstance(text, str) and text.strip():
                yield text


class LocalCorpus:
    """Documents of local files; ``documents(split, start)`` yields the split's documents from ``start``."""

    def __init__(self, spec: str, data_cfg: Any) -> None:
        self.spec, self.cfg = spec, data_cfg
        root = Path(spec).expanduser()
        if not root.exists():
            raise UserError(f"data.source={spec}: no such file or directory (expected a .txt/.jsonl/.parquet "
                            "file or a folder of them, hmm, cyclic, topics or hf:<dataset>)")
        if root.is_dir():
            self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not self.files:
                raise UserError(f"data.source={spec}: folder holds no {'/'.join(SUFFIXES)} files")
        elif root.suffix in SUFFIXES:
            self.files = [root]
        else:
            raise UserError(f"data.source={spec}: unsupported file type {root.suffix!r} "
                            f"(accepted: {', '.join(SUFFIXES)})")

    def identity(self) -> str:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        return json.dumps({"local": stats, "txt_split": self.cfg.txt_split, "field": self.cfg.text_field,
                           "valid": self.cfg.valid_fraction})

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        j = 0
        first = 0
        for part in self.parts():
            n = 0
            for doc_split, text in self.part_documents(part, first):
                n += 1
                if doc_split == split:
                    if j >= start:
                        yield text
                    j += 1
            first += n

    # -- parts: pieces that separate processes read independently, in corpus order ---------------
    needs_offsets = True  # the train/valid split depends on global document indices

    def parts(self) -> list[dict]:
        """One part per file; :meth:`part_documents` needs the number of documents before it."""
        return [{"file": str(p)} for p in self.files]

    def count_documents(self, part: dict) -> int:
        return sum(1 for _ in _file_documents(Path(part["file"]), self.cfg))

    def part_documents(self, part: dict, first_doc: int) -> Iterator[tuple[str, str]]:
        """``(split, text)`` for every document of ``part``, whose first document has index ``first_doc``."""
        for j, text in enumerate(_file_documents(Path(part["file"]), self.cfg)):
            yield ("valid" if is_valid_doc(first_doc + j, self.cfg.valid_fraction) else "train"), text


class HFCorpus:
    """A Hugging Face dataset by name with MDLM's splits; streamed when ``data.streaming`` is set."""

    def __init__(self, spec: str, data_cfg: Any, length: int) -> None:
        body = spec[3:]
        self.name, _, self.config = body.partition(":")
        if self.name not in HF_NAMES:
            raise UserError(f"data.source={spec}: unknown Hugging Face corpus (known: "
                            f"{', '.join('hf:' + n for n in HF_NAMES)}; or give a local file/folder)")
        self.spec, self.cfg, self.length = spec, data_cfg, length
        self._parts_data: dict[str, Any] = {}  # split -> its rows (or text8 string), loaded once

    def identity(self) -> str:
        return json.dumps({"hf": self.spec, "length": self.length if self.name == "text8" else None})

    def _load(self, path: str, config: str | None, split: str, streaming: bool | None = None) -> Any:
        from datasets import load_dataset

        try:
            return load_dataset(path, config, split=split,
                                streaming=self.cfg.streaming if streaming is None else streaming,
                                cache_dir=self.cfg.cache_dir or None)
        except Exception as exc:  # datasets raises many types for "offline" / "not found"
            raise UserError(f"data.source={self.spec}: cannot load Hugging Face dataset {path!r} split "
                            f"{split!r} ({type(exc).__name__}; offline? use a local file or folder)") from None

    def _rows(self, valid: bool, streaming: bool | None = None) -> Any:
        if self.name == "openwebtext":  # MDLM's openwebtext-split: the last 100k documents are validation
            return self._load("openwebtext", None, heldout_split("openwebtext") if valid
                              else f"train[:-{OWT_HELDOUT_DOCS}]", streaming)
        if self.name == "wikitext-103":
            return self._load("wikitext", self.config or "wikitext-103-raw-v1", "validation" if valid else "train",
                              streaming)
        # lm1b validates on its test split, as in MDLM's dataloader.py
        return self._load("lm1b", None, "test" if valid else "train", streaming)

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        valid = split != "train"
        if self.name == "text8":
            yield from text8_documents(self._text8(valid), self.length, start)
            return
        rows = self._rows(valid)
        if start:
            rows = rows.skip(start)
        for row in rows:
            text = row[self.cfg.text_field]
            if text and text.strip():
                yield text

    def _text8(self, valid: bool) -> str:
        # MDLM's dataloader.py (the D3PM convention): train chars [0, 90M); MDLM validates text8 on its *test* range
        # [95M, end). Documents are L-character chunks (the last partial one dropped) that then go
        # through the ordinary wrapping, as in MDLM (so a block holds 254 characters and a spurious EOS).
        # [unverified] the hub copy afmck/text8 is read as one "train" split holding the whole string.
        rows = self._load("afmck/text8", self.config or None, "train")
        text = "".join(r[self.cfg.text_field] for r in rows)
        lo, hi = (95_000_000, len(text)) if valid else (0, 90_000_000)
        return text[lo:hi]

    # -- parts: row ranges of the (memory-mapped, non-streamed) dataset, read independently -------
    needs_offsets = False  # the splits are the dataset's own
    ROWS_PER_PART = 100_000

    def parts(self) -> list[dict]:
        out = []
        for split in ("train", "valid"):
            n = len(self._split_rows(split))
            if self.name == "text8":
                n //= self.length  # documents are L-character pieces of one string
            out.extend({"split": split, "lo": lo, "hi": min(n, lo + self.ROWS_PER_PART)}
                       for lo in range(0, n, self.ROWS_PER_PART))
        return out

    def _split_rows(self, split: str) -> Any:
        if split not in self._parts_data:
            self._parts_data[split] = self._text8(split != "train") if self.name == "text8" else \
                self._rows(split != "train", streaming=False)
        return self._parts_data[split]

    def part_documents(self, part: dict, first_doc: int = 0) -> Iterator[tuple[str, str]]:
        split, lo, hi = part["split"], int(part["lo"]), int(part["hi"])
        rows = self._split_rows(split)
        if self.name == "text8":
            for text in text8_documents(rows[lo * self.length:hi * self.length], self.length):
                yield split, text
            return
        for text in rows[lo:hi][self.cfg.text_field]:
            if text and text.strip():
                yield split, text


def text8_documents(text: str, length: int, start: int = 0) -> Iterator[str]:
    """MDLM's text8 documents: consecutive ``length``-character chunks, the last partial one dropped."""
    for k in range(start, len(text) // length):
        yield text[k * length:(k + 1) * length]


class FileCorpus:
    """One held-out file read as the run's corpus reads its documents (text8 runs: L-character chunks);
    every split is the whole file."""

    def __init__(self, path: str, data_cfg: Any, length: int) -> None:
        self.path, self.cfg, self.length = Path(path), data_cfg, length
        if not self.path.is_file() or self.path.suffix not in SUFFIXES:
            raise UserError(f"heldout={path}: no such {'/'.join(SUFFIXES)} file")
        self.text8 = data_cfg.source.startswith("hf:text8")

    def documents(self, split: str, start: int = 0) -> Iterator[str]:
        if self.text8:
            yield from text8_documents(read_utf8(self.path).strip(), self.length, start)
            return
        for i, text in enumerate(_file_documents(self.path, self.cfg)):
            if i >= start:
                yield text


def open_corpus(spec: str, data_cfg: Any, length: int) -> LocalCorpus | HFCorpus:
    if spec.startswith("hf:"):
        return HFCorpus(spec, data_cfg, length)
    return LocalCorpus(spec, data_cfg)


__all__ = ["FileCorpus", "LocalCorpus", "HFCorpus", "open_corpus", "is_valid_doc", "heldout_split", "text8_documents",
           "HF_NAMES", "OWT_HELDOUT_DOCS"]
