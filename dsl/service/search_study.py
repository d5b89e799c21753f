"""Where a search's trials are kept: one Optuna study per step budget T, named ``<study>:T=<T>``, in an
RDB (a SQLite file beside the outputs by default, PostgreSQL on a cluster) or in memory.

Re-running the same command continues the study: finished trials count, and trials left RUNNING by a
killed driver are marked FAIL with the user attr ``interrupted``. Only Optuna's public storage and
study API is used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsl.config import JobConfig
from dsl.errors import UserError, one_line
from dsl.redact import scrub
from dsl.seeding import derive_seed


def storage_url(cfg: JobConfig) -> str | None:
    """The RDB URL of the study, or None for an in-memory (storage-free) search."""
    db = cfg.search.study_db
    if db.strip().lower() in ("none", "memory"):
        return None
    if db:
        return db
    return f"sqlite:///{Path(cfg.out).resolve() / 'study.db'}"


def storage_label(url: str | None) -> str:
    """How the storage is named in messages, summaries and MLflow: its URL without credentials."""
    return "none" if url is None else scrub(url)


def open_storage(url: str | None):
    """An Optuna storage object for ``url`` (one engine shared by every study of the search)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    from dsl.service.database_url import with_installed_driver

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(with_installed_driver(url, "search.study_db"), engine_kwargs=kwargs)
        except (IntegrityError, OperationalError) as exc:
            # a fresh database that another process (a second driver, a dashboard, a poller) initialises at
            # the same moment: its CREATE TABLE or schema-version row wins ("already exists", UNIQUE failed),
            # and the next open finds the schema in place. A URL that cannot work fails the same way 3 times.
            failure = exc
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - every failure to open the URL is the user's to fix
            failure = exc
            break
    raise UserError(f"search.study_db={storage_label(url)} cannot be opened ({type(failure).__name__}: "
                    f"{one_line(failure)[:200]}); expected sqlite:///<path> or "
                    f"postgresql://user@host:port/db, or search.study_db=none") from None


def study_name(cfg: JobConfig, steps: int) -> str:
    return f"{cfg.search.study}:T={steps}"


def tpe_seed(seed: int, steps: int, stored: int) -> int:
    """The TPE sampler's seed for budget T=``steps`` of a study already holding ``stored`` trials.

    The protocol (Sec 5.2) searches each T on its own; the seed moves with the study size so a resumed
    search does not re-draw the start-up configurations it already evaluated (optuna/optuna#3255)."""
    return derive_seed(seed, "tpe", steps, stored) % (2**32)


def prepare_study(storage: Any, name: str) -> tuple[int, int]:
    """Load or create the study; fail trials a killed driver left RUNNING. Returns (done, stored)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                load_if_exists=True)
    study_id = storage.get_study_id_from_name(name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        # One driver owns a study (all Optuna calls run in the Tune driver), so a RUNNING trial seen
        # at start-up belongs to a driver that died; its partial results are not trusted.
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return done, len(trials)


def study_records(storage: Any, name: str, steps: int) -> list[dict[str, Any]]:
    """One flat dict per finished trial (params + reported metrics as user attrs)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(storage=storage, study_name=name)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if "mauve" not in t.user_attrs:
            continue
        out.append({**t.user_attrs, **t.params, "number": t.number, "steps": steps, "state": t.state.name})
    return out


__all__ = ["storage_url", "storage_label", "open_storage", "study_name", "tpe_seed", "prepare_study",
           "study_records"]
