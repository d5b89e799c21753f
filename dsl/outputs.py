"""Where jobs write: where the user pointed them, or one documented root.

- Outputs (a local run's checkpoints, a search's table and study, calibration plots) go to ``out=``
  when it is given, else under :data:`RUNS_ROOT` (``./runs``, relative to the working directory) — the
  one root the README documents. A job never writes beside it: Ray's own run state lives in a
  temporary directory that is removed when the job ends.
- Caches that any job may reuse (reference MAUVE features) live under :func:`cache_root`:
  ``$DSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsl``, else ``~/.cache/dsl``.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsl.errors import UserError

RUNS_ROOT = "runs"


def cache_root() -> Path:
    """The directory of this package's caches (see the module docstring)."""
    if os.environ.get("DSL_CACHE_DIR"):
        return Path(os.environ["DSL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "dsl"


def output_dir(path: str, key: str = "out") -> Path:
    """``path`` as a directory a job may create or write into; one line when it is an existing file
    (or lies under one). Nothing is created here: a job that later refuses its input writes nothing."""
    p = Path(path).expanduser()
    for part in (p, *p.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == p else f"lies under the file {part}"
                raise UserError(f"{key}={path} {what}; give a directory (it is created if missing)")
            break
    return p


__all__ = ["RUNS_ROOT", "cache_root", "output_dir"]
