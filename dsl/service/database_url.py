"""SQLAlchemy URLs as the user writes them, with the PostgreSQL driver this machine has.

SQLAlchemy 2.1 reads a bare ``postgresql://`` as ``postgresql+psycopg://`` (psycopg 3); where only
psycopg2 is installed that fails with "No module named 'psycopg'". MLflow's tracking store and
Optuna's study storage both open their URL through :func:`with_installed_driver`, so a bare URL works
with whichever driver is present, and an explicit ``postgresql+<driver>://`` is left as written.
"""

from __future__ import annotations

import importlib.util

from dsl.errors import UserError

_BARE = ("postgresql://", "postgres://")
# SQLAlchemy's PostgreSQL dialects in its order of preference, with the module each needs
_DRIVERS = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"), ("pg8000", "pg8000"), ("asyncpg", "asyncpg"))


def with_installed_driver(url: str, key: str = "URL") -> str:
    """``url`` with a bare PostgreSQL scheme pinned to an installed driver; other URLs unchanged."""
    for bare in _BARE:
        if url.startswith(bare):
            for driver, module in _DRIVERS[:3]:  # asyncpg needs an async engine: not for these stores
                if importlib.util.find_spec(module) is not None:
                    return f"postgresql+{driver}://" + url[len(bare):]
            raise UserError(f"{key}: no PostgreSQL driver is installed; pip install psycopg2-binary (or "
                            f"psycopg[binary]) and retry")
    return url


__all__ = ["with_installed_driver"]
