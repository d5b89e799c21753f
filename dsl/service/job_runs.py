"""One MLflow run per invocation of a job (sample, evaluate, prepare, ...): tagged with its lineage (the
checkpoint it loaded and the training run that wrote it), ended FINISHED, FAILED or KILLED, and never the
reason a job fails (:func:`tracked_job`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

from dsl.errors import one_line
from dsl.redact import scrub
from dsl.service import lineage
from dsl.service.code_version import code_tags
from dsl.service.tracking import (
    DEFAULT_EXPERIMENT,
    TAG_CHECKPOINT,
    TAG_KIND,
    TAG_RUN_NAME,
    TAG_TRAINING_RUN,
    RunLogger,
    default_tracking_uri,
    end_status,
    experiment_id,
    filter_quote,
    flat_params,
    log_params,
    mlflow_client,
    ui_command,
)


def training_run_of(checkpoint_uri: str, *, tracking_uri: str | None = None) -> tuple[str | None, str | None]:
    """``(training run name, its MLflow run id)`` for a checkpoint URI, when both can be found: the name
    from the checkpoint's manifest, the run by that name in any experiment of the store (a job may log to
    another experiment than the fine-tune did)."""
    from dsl.checkpoint import MANIFEST, latest_complete, read_manifest
    from dsl.errors import UserError
    from dsl.storage import open_storage

    if checkpoint_uri.startswith(("oracle:", "hf:")):
        return None, None
    try:
        storage = open_storage(checkpoint_uri)
        if not storage.exists(MANIFEST):
            latest = latest_complete(storage)
            if latest is None:
                return None, None
            storage = open_storage(latest)
        manifest = read_manifest(storage, "")
    except (UserError, OSError, ValueError):
        return None, None
    name = (manifest.get("config") or {}).get("name") or None
    if not name:
        return None, None
    client = mlflow_client(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.`{TAG_RUN_NAME}` = '{filter_quote(name)}' and tags.`{TAG_KIND}` = '{lineage.KIND_FINETUNE}'"
    runs = client.search_runs(ids, filter_string=flt, max_results=1, order_by=["attributes.start_time ASC"]) \
        if ids else []
    return name, (runs[0].info.run_id if runs else None)


_CURRENT: contextvars.ContextVar[RunLogger | None] = contextvars.ContextVar("dsl_current_run", default=None)


def current_run() -> RunLogger | None:
    """The run the current job logs to (inside :func:`job_run`), or None when tracking is off: a job's
    body adds tags and artifacts it only knows once it has run, and writes the run id into its outputs."""
    return _CURRENT.get()


def lineage_tags(kind: str, checkpoint_uri: str | None, *, tracking_uri: str | None) -> dict[str, str]:
    """What a job run says about itself and its parents: its kind, the code, the checkpoint it loaded and
    the training run that wrote that checkpoint."""
    tags = {TAG_KIND: kind, **code_tags()}
    if checkpoint_uri:
        tags[TAG_CHECKPOINT] = scrub(checkpoint_uri)
        name, train_id = training_run_of(checkpoint_uri, tracking_uri=tracking_uri)
        if name:
            tags[lineage.TRAINING_RUN_NAME] = name
        if train_id:
            tags[TAG_TRAINING_RUN] = train_id
    return tags


@contextlib.contextmanager
def job_run(kind: str, params: Mapping[str, Any] | Any, checkpoint_uri: str | None = None, *,
            tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
            system_metrics: bool = False, run_name: str | None = None,
            tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """One MLflow run for one invocation of a job (``kind`` = sample/evaluate/...), tagged with its
    lineage (:func:`lineage_tags`; ``tags`` may name other parents, e.g. the sample run an evaluation
    scored). Parents are tags, not UI nesting: a sample run is not part of its fine-tune, and every run
    stays a visible row of the runs table. It ends FINISHED, FAILED if the body raises, KILLED if the job
    was stopped (Ctrl-C, SIGTERM)."""
    client = mlflow_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    all_tags = lineage_tags(kind, checkpoint_uri, tracking_uri=tracking_uri)
    all_tags.update({k: scrub(v) for k, v in (tags or {}).items() if v is not None and v != ""})
    run_id = client.create_run(exp_id, tags=all_tags, run_name=run_name or kind).info.run_id
    logger = None
    try:
        log_params(client, run_id, flat_params(params))
        logger = RunLogger(run_id, tracking_uri or default_tracking_uri(), system_metrics=system_metrics)
        logger.experiment, logger.run_name, logger.tags = experiment, run_name or kind, all_tags
        token = _CURRENT.set(logger)
        try:
            yield logger
        finally:
            _CURRENT.reset(token)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the job's own error is what the user must see
            if logger is not None:
                logger.close(end_status(exc))
            else:
                client.set_terminated(run_id, end_status(exc))
        raise
    logger.close("FINISHED")


def tracked_job(kind: str, params: Any, checkpoint_uri: str | None, body: Any, *,
                tags: Mapping[str, str] | None = None, tracking_uri: str | None = None,
                experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
                after: Any = None) -> Any:
    """Run ``body()`` inside :func:`job_run` when ``tracking_uri`` is given (see
    :func:`resolve_tracking_uri`) and log the numbers of its summary; ``after(logger, summary)`` then
    adds what else the run records (artifacts).

    Tracking trouble (a locked SQLite file, an unreachable server) never fails the job: it is reported
    as one warning line on stderr and the job's own result stands.
    """
    import sys

    if tracking_uri is None:
        return body()
    try:
        ctx = job_run(kind, params, checkpoint_uri, tracking_uri=tracking_uri, experiment=experiment,
                      run_name=run_name, tags=tags)
        logger = ctx.__enter__()
    except Exception as exc:  # noqa: BLE001 - see docstring
        print(f"warning: MLflow tracking off for this {kind} job ({type(exc).__name__}: "
              f"{scrub(one_line(exc))[:200]})", file=sys.stderr)
        return body()
    try:
        summary = body()
    except BaseException:
        with contextlib.suppress(Exception):
            ctx.__exit__(*sys.exc_info())
        raise
    try:
        if isinstance(summary, Mapping):
            logger.log_metrics({k: float(v) for k, v in flat_params(summary).items() if _is_number(v)}, step=0)
        if after is not None:
            after(logger, summary)
        ctx.__exit__(None, None, None)
        print(f"mlflow run: {logger.run_id} ({scrub(logger.tracking_uri)}); "
              f"{ui_command(logger.tracking_uri, experiment)}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: MLflow logging of this {kind} job failed ({type(exc).__name__})", file=sys.stderr)
    return summary


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.lower() not in ("true", "false", "nan", "inf", "-inf")
