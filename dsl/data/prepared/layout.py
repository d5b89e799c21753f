"""A prepared store's layout: its file names, manifest, token dtype and tokenizer files, shared by the
preparation that writes a store and the reader that opens it (the layout is described in
:mod:`dsl.data.prepared`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dsl.data.tokenizers import load_tokenizer
from dsl.errors import UserError
from dsl.storage import Storage, join_uri

FORMAT = "dsl-prepared/1"
PREFIX = "prepared:"
MANIFEST = "manifest.json"
WORK = "_work"
SPLITS = ("train", "valid")
CHUNK_DOCS = 1024             # documents per tokenization chunk (the unit of work and of resume)
CHUNK_CHARS = 1 << 21         # ... or this many characters, whichever comes first
SHARD_BYTES = 64 << 20        # default shard size: blocks_per_shard = SHARD_BYTES // (L * itemsize)
LENGTH_DTYPE = np.dtype("<u4")
WRAP_RULE = ("mdlm-wrap: each document's tokens + EOS, concatenated in corpus order and cut into L-2 token "
             "chunks, each block [BOS] chunk [EOS]; the remainder carries over to the next document, the "
             "split's tail shorter than L-2 is dropped")
PAD_RULE = "one document per block: [BOS] doc[:L-2] [EOS] padded with [PAD]; attended length stored per block"
# _work/<split>/<part>-<sub>.d<documents>.u<units>.t<tokens>.<sha256[:16]>.tok: a chunk's token stream
CHUNK_FILE = re.compile(r"^(\d+)-(\d+)\.d(\d+)\.u(\d+)\.t(\d+)\.([0-9a-f]{16})\.tok$")
# <split>/shard-<index>-<sha256[:16]>.bin
SHARD_FILE = re.compile(r"^shard-(\d+)-([0-9a-f]{16})\.bin$")


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(progress: Callable[[str, int | None], Any] | None, desc: str, total: int | None) -> Iterator[Any]:
    """A progress bar from ``progress`` (e.g. tqdm), closed before an error propagates."""
    bar = progress(desc, total) if progress else _NoBar()
    try:
        yield bar
    finally:
        if progress:
            bar.close()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def uri_of(storage: Storage, key: str) -> str:
    return join_uri(storage.uri, key)


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = Path(tmp).joinpath(*name.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return load_tokenizer(tmp)


def tokenizer_files(tok: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        return {str(p.relative_to(tmp)).replace(os.sep, "/"): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


def read_manifest(storage: Storage) -> dict:
    where = uri_of(storage, MANIFEST)
    if not storage.exists(MANIFEST):
        raise UserError(f"{where}: missing (not a prepared store, or its preparation has not finished; "
                        "run jobs/prepare_data.py)")
    try:
        manifest = json.loads(storage.get_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{where}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{where}: format {got!r} is not {FORMAT!r}")
    return manifest


def prepared_uri(source: str) -> str | None:
    """The store URI of ``data.source=prepared:<uri>`` (None for any other source)."""
    if not source.startswith(PREFIX):
        return None
    uri = source[len(PREFIX):]
    if not uri:
        raise UserError(f"data.source={source}: expected prepared:<directory or s3://bucket/prefix>")
    return uri

