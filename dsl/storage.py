"""Where bytes live: a flat key/value store behind one protocol, :class:`Storage`.

Keys are ``/``-separated paths relative to the storage's root. :class:`LocalStorage` is a directory;
``s3://`` is registered by ``dsl.service.storage_s3`` (the boto3 adapter, imported lazily by
:func:`open_storage`, so ``dsl`` never imports boto3). Callers use the protocol only: writing a set of
files that must appear together (:meth:`Storage.put_files`) and deleting one
(:meth:`Storage.delete_prefix`) are methods, so no caller asks which storage it has.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from dsl.atomic import write_bytes_atomic
from dsl.errors import UserError


@runtime_checkable
class Storage(Protocol):
    """Flat key/value store of bytes; keys are ``/``-separated paths relative to the storage root."""

    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, key: str) -> None:
        """Delete ``key`` and, like a directory, everything under ``key/``."""

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{key: bytes}`` of every object under ``prefix``."""

    def put_files(self, prefix: str, files: dict[str, bytes]) -> None:
        """Write ``files`` (names relative to ``prefix``) so that a reader never trusts a partial set: a
        local directory appears at once (and the call fails if ``prefix`` exists); an object store
        writes them in the dict's order, so the last one (a manifest) is written last."""

    def delete_prefix(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        """Delete everything under ``prefix``; the names in ``first`` (relative to ``prefix``) go before
        the rest, so a set whose manifest is gone first is never trusted half-deleted."""

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` when the storage is a local directory (to memory-map it), else None."""


class LocalStorage:
    """A directory; every ``put_bytes`` is a write to a temporary name and an atomic rename."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p == ".." for p in parts):
            raise UserError(f"storage key {key!r} leaves {self.root}")
        return self.root.joinpath(*parts)

    def put_bytes(self, key: str, data: bytes) -> None:
        write_bytes_atomic(self._path(key), data, fsync=True)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        return sorted(str(p.relative_to(self.root)).replace(os.sep, "/") for p in base.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def sizes(self, prefix: str = "") -> dict[str, int]:
        return {key: self._path(key).stat().st_size for key in self.list(prefix)}

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete_prefix(self, prefix: str, first: tuple[str, ...] = ()) -> None:
        for name in first:
            self.delete(f"{prefix.strip('/')}/{name}")
        self.delete(prefix)

    def put_files(self, prefix: str, files: dict[str, bytes]) -> None:
        """One directory rename (fails if ``prefix`` exists)."""
        final = self._path(prefix)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            for name, data in files.items():
                path = tmp.joinpath(*name.split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            os.rename(tmp, final)  # atomic; raises if a non-empty ``final`` appeared meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


_FACTORIES: dict[str, Callable[[str], Storage]] = {}
_LAZY_MODULES = {"s3": "dsl.service.storage_s3"}


def register_storage(scheme: str, factory: Callable[[str], Storage]) -> None:
    """Make ``open_storage("<scheme>://...")`` call ``factory(uri)``."""
    _FACTORIES[scheme] = factory


def open_storage(uri: str | os.PathLike | Storage) -> Storage:
    """The storage rooted at ``uri``: a local path (or ``file://``), or a registered scheme such as s3."""
    if isinstance(uri, Storage):
        return uri
    uri = str(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return LocalStorage(uri)
    if scheme == "file":
        return LocalStorage(rest)
    if scheme not in _FACTORIES and scheme in _LAZY_MODULES:
        import importlib

        importlib.import_module(_LAZY_MODULES[scheme])  # registers itself
    if scheme not in _FACTORIES:
        raise UserError(f"{uri}: unsupported storage scheme {scheme!r} (accepted: a local path, file://, "
                        f"{', '.join(s + '://' for s in sorted(set(_FACTORIES) | set(_LAZY_MODULES)))})")
    return _FACTORIES[scheme](uri)


def join_uri(root: str, key: str) -> str:
    return root.rstrip("/") + "/" + key.strip("/") if root else key


__all__ = ["Storage", "LocalStorage", "register_storage", "open_storage", "join_uri"]
