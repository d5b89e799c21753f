"""Which code a run ran: the git commit and a digest of the package's sources, as MLflow tags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The code's git commit: ``DSL_GIT_COMMIT`` (set it when submitting a job: Ray's working-dir copy
    has no repository), else ``git rev-parse HEAD`` beside the package, else in the working directory."""
    if os.environ.get("DSL_GIT_COMMIT"):
        return os.environ["DSL_GIT_COMMIT"]
    for where in ([path] if path else [Path(__file__).resolve().parent, Path.cwd()]):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def code_digest() -> str:
    """sha256 (16 hex) of the ``dsl`` package's Python sources: identifies the code even without git."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def code_tags() -> dict[str, str]:
    """The tags every run carries: the code digest and, when known, the git commit."""
    tags = {"dsl.code_digest": code_digest()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
