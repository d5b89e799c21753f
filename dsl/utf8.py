"""Reading the user's text files as UTF-8, with one clear line where a byte is not.

Every corpus, sample, reference and held-out file is read through these two functions, so a file with
invalid bytes fails the same way wherever it is read (a driver, a Ray worker, a search trial): the
message names the file, the line and the offending byte, and says how to fix it. Nothing is silently
replaced: a replaced byte would change token counts, features and likelihoods without a trace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from dsl.errors import UserError

HOW_TO_FIX = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)"


def _error(path: str | os.PathLike, line: int, raw: bytes, exc: UnicodeDecodeError) -> UserError:
    return UserError(f"{os.fspath(path)}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                     f"{exc.start + 1}); {HOW_TO_FIX}")


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, line with its newline)`` of a UTF-8 text file, streamed."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _error(path, number, raw, exc) from None


def read_utf8(path: str | os.PathLike) -> str:
    """The whole UTF-8 text file (a BOM is dropped)."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        shifted = UnicodeDecodeError(exc.encoding, exc.object, exc.start - start, exc.end - start, exc.reason)
        raise _error(path, line, data[start:], shifted) from None


__all__ = ["utf8_lines", "read_utf8"]
