"""Files written whole or not at all: a temporary name in the same directory, then ``os.replace``.

A reader never sees half a file, a crash or an error leaves the previous file (if any) intact, and the
temporary file is removed on failure. ``os.replace`` is atomic only within one file system, hence the
temporary name sits beside the final one.

    write_json_atomic(out / "summary.json", summary)
    with atomic_paths(png, js) as (tmp_png, tmp_js):   # several files: all of them, or none
        fig.savefig(tmp_png, format="png"); tmp_js.write_text(...)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_beside(path: Path) -> Path:
    # hidden and unique (listings skip it, concurrent writers of one file do not collide), with the final
    # suffix kept for writers that choose a format by it (matplotlib's savefig)
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths`` (parents created) for the caller to write; when
    the block ends normally each is renamed onto its final path, in the order given; when it raises,
    every temporary is removed and no final path is touched."""
    finals = [Path(p) for p in paths]
    temps = []
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
        temps.append(_temp_beside(final))
    try:
        yield temps
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_paths` for one file (or one directory that does not exist yet)."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """``data`` into ``path``; ``fsync`` also forces it to disk before the rename (a checkpoint's files
    must survive a power loss once they are listed as written)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys and a final newline."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


__all__ = ["atomic_path", "atomic_paths", "write_bytes_atomic", "write_text_atomic", "write_json_atomic"]
