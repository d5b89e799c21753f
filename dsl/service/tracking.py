"""MLflow tracking: which store runs go to (:func:`resolve_tracking_uri`), experiments, one run per
training run name (found again by tag, never duplicated), flat scrubbed params, checkpoint URIs as tags,
and :class:`RunLogger`, which logs to one run. One run per job invocation: :mod:`dsl.service.job_runs`.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else a local SQLite database through SQLAlchemy
(``sqlite:///<abs path>/mlflow.db``; MLflow 3 refuses a bare file store). Credentials never reach
MLflow: every param and tag value passes :func:`scrub`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsl.redact import REDACTED, scrub
from dsl.service import lineage
from dsl.service.code_version import code_tags
from dsl.service.database_url import with_installed_driver

DEFAULT_EXPERIMENT = "dsl"
TAG_RUN_NAME = "dsl.run_name"          # the stable training-run name (resume key)
TAG_KIND = lineage.KIND                # finetune | sample | evaluate | ...
TAG_CHECKPOINT = lineage.CHECKPOINT    # latest checkpoint URI of a training run / input of a job
TAG_TRAINING_RUN = lineage.TRAINING_RUN
PARAM_MAX = 6000                       # MLflow's limit on a param value
ARTIFACT_MAX_BYTES = 64 << 20          # a samples file larger than this stays where the job wrote it


def flat_params(params: Mapping[str, Any] | Any) -> dict[str, str]:
    """Flatten a config (dataclass) or nested mapping to ``{"a.b": "value"}``, scrubbed and truncated."""
    from dataclasses import is_dataclass

    from dsl.config import flatten

    if is_dataclass(params):
        flat = flatten(params)
    else:
        flat = {}

        def walk(d: Mapping[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, Mapping):
                    walk(v, f"{prefix}{k}.")
                else:
                    flat[f"{prefix}{k}"] = v

        walk(params, "")
    return {k: scrub(v, k)[:PARAM_MAX] for k, v in flat.items()}


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return with_installed_driver(uri, "MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def ui_command(tracking_uri: str, experiment: str | None = None) -> str:
    """How to open the MLflow UI on ``tracking_uri`` (loopback only), at ``experiment``'s runs table
    when its name is given and it exists; never with credentials: a URI that holds some is named by the
    variable that holds it, or shown redacted."""
    exp_id = None
    if experiment:
        with contextlib.suppress(Exception):  # a hint only: an unreachable store just gives the plain command
            exp = mlflow_client(tracking_uri).get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else None
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {scrub(experiment_url(tracking_uri, exp_id) if exp_id else tracking_uri)} in a browser"
    shown = scrub(tracking_uri)
    if shown != tracking_uri:
        env = os.environ.get("MLFLOW_TRACKING_URI", "")
        if env and with_installed_driver(env) == tracking_uri:
            shown = '"$MLFLOW_TRACKING_URI"'
        else:
            shown = f"'{shown}' (fill in the credentials)"
    command = f"mlflow ui --backend-store-uri {shown} --host 127.0.0.1 --port 5000"
    return command + (f", then open {experiment_url('http://127.0.0.1:5000', exp_id)}" if exp_id else "")


def mlflow_client(tracking_uri: str | None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment if it does not exist.

    MLflow 3 shows an experiment either as a GenAI app (traces overview) or as model training (the runs
    table); the experiment tag ``mlflow.experimentKind=custom_model_development`` says the latter. An
    existing experiment without a kind gets the tag; one whose kind someone chose is left alone.
    """
    from mlflow.exceptions import MlflowException

    from dsl.service.lineage import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently by another job
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def experiment_url(base_url: str, exp_id: str) -> str:
    """The UI page of an experiment's runs table. MLflow >= 3.10 chooses between its GenAI overview and
    the model-training runs view per browser (a remembered toggle) unless the URL says which."""
    from dsl.service.lineage import UI_WORKFLOW_QUERY

    return f"{base_url.rstrip('/')}/#/experiments/{exp_id}?{UI_WORKFLOW_QUERY}"


def find_run(run_name: str, *, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
             kind: str | None = None) -> str | None:
    """The run id tagged with training-run name ``run_name`` (and ``kind``), or None."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    flt = f"tags.`{TAG_RUN_NAME}` = '{filter_quote(run_name)}'"
    if kind:
        flt += f" and tags.`{TAG_KIND}` = '{filter_quote(kind)}'"
    runs = client.search_runs([exp.experiment_id], filter_string=flt, max_results=2,
                              order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def filter_quote(s: str) -> str:
    """``s`` inside a single-quoted MLflow search filter value."""
    return s.replace("'", "\\'")


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in params.items() if k not in existing]  # params are write-once
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i:i + 100])


def ensure_training_run(run_name: str, *, params: Mapping[str, Any] | Any, tags: Mapping[str, str] | None = None,
                        tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                        kind: str = "finetune") -> tuple[str, bool]:
    """``(run_id, resumed)``: the MLflow run of training run ``run_name``, created the first time only."""
    client = mlflow_client(tracking_uri)
    run_id = find_run(run_name, tracking_uri=tracking_uri, experiment=experiment, kind=kind)
    resumed = run_id is not None
    if run_id is None:
        all_tags = {TAG_RUN_NAME: run_name, TAG_KIND: kind, "mlflow.runName": run_name, **code_tags()}
        all_tags.update({k: scrub(v) for k, v in (tags or {}).items()})
        run_id = client.create_run(experiment_id(client, experiment), tags=all_tags, run_name=run_name).info.run_id
    else:
        from mlflow.entities import RunStatus

        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, scrub(v))
    log_params(client, run_id, flat_params(params))
    return run_id, resumed


class RunLogger:
    """Logs to one existing run (rank 0 of a training job, or one sampling/evaluation job)."""

    def __init__(self, run_id: str, tracking_uri: str | None = None, *, system_metrics: bool = True,
                 node_id: str | None = None, sampling_interval_s: float = 10.0) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment: str | None = None
        self.run_name: str | None = None
        self.tags: dict[str, str] = {}
        self.client = mlflow_client(self.tracking_uri)
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s,
                                                     resume_logging=True, node_id=node_id,
                                                     tracking_uri=self.tracking_uri)
                self._monitor.start()
            except Exception:  # noqa: BLE001 - system metrics are a nicety (psutil/GPU libs may be absent)
                self._monitor = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, scrub(v))

    def log_checkpoint(self, uri: str, step: int) -> None:
        """Checkpoint URIs as tags (the weights stay in storage; MLflow only points at them)."""
        self.set_tags({TAG_CHECKPOINT: uri, f"{TAG_CHECKPOINT}.step-{int(step)}": uri})

    def log_artifact(self, path: str, artifact_path: str | None = None, *, name: str | None = None) -> None:
        """The file at ``path`` as an artifact, under ``name`` if given (e.g. the job's ``out`` file as
        ``samples.jsonl``, the name every reader looks for)."""
        if name is None or name == os.path.basename(path):
            self.client.log_artifact(self.run_id, path, artifact_path)
            return
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dsl-artifact-") as tmp:
            shutil.copyfile(path, os.path.join(tmp, name))
            self.client.log_artifact(self.run_id, os.path.join(tmp, name), artifact_path)

    def log_json(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_sampling(self, diagnostics: Mapping[str, Any], *, samples: str | None = None,
                     diagnostics_file: str | None = None, figure: str | None = None, title: str = "") -> None:
        """A sampling's small artifacts under the names readers look for (``samples.jsonl``,
        ``diagnostics.jsonl``, ``fig2.png``: drawn here when no figure file is given) and its Table 6
        sharpness curves as metric histories whose MLflow step is the sampler step k."""
        import math
        import tempfile
        import time

        from mlflow.entities import Metric

        if samples and os.path.getsize(samples) <= ARTIFACT_MAX_BYTES:
            self.log_artifact(samples, name=lineage.SAMPLES_ARTIFACT)
        elif samples:
            self.set_tags({"dsl.samples_artifact": f"not logged: over {ARTIFACT_MAX_BYTES >> 20} MiB ({samples})"})
        if diagnostics_file:
            self.log_artifact(diagnostics_file, name=lineage.DIAGNOSTICS_ARTIFACT)
        if figure:
            self.log_artifact(figure, name=lineage.FIG2_ARTIFACT)
        else:
            from dsl.sampling.figures import plot_diagnostics

            with tempfile.TemporaryDirectory(prefix="dsl-fig2-") as tmp:
                path = os.path.join(tmp, lineage.FIG2_ARTIFACT)
                plot_diagnostics(diagnostics, title, path)
                self.log_artifact(path)
        now = int(time.time() * 1000)
        points = [Metric(name, float(v), now, k) for key, name in lineage.DIAGNOSTIC_METRICS.items()
                  for k, v in enumerate(diagnostics[key]) if math.isfinite(float(v))]
        for i in range(0, len(points), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=points[i:i + 1000])

    def close(self, status: str | None = None) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
            self._monitor = None
        if status:
            self.client.set_terminated(self.run_id, status=status)


def end_status(exc: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED (stopped: Ctrl-C, SIGTERM, SIGHUP) or FAILED."""
    from dsl.errors import was_stopped

    if exc is None:
        return "FINISHED"
    return "KILLED" if was_stopped(exc) else "FAILED"


def resolve_tracking_uri(service: Any, *, default_on: bool) -> str | None:
    """The one MLflow switch: the tracking URI a job logs to, or None when it does not log.

    ``service.mlflow``: ``off`` never logs; ``on`` logs to ``service.tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (created); ``auto`` is ``on`` for jobs
    whose runs are their record (``default_on``: training, search) and, for the others (sampling,
    evaluation), ``on`` only when a store already exists: a URI is configured or ``./mlflow.db`` is there.
    """
    if service.mlflow == "off":
        return None
    configured = service.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if service.mlflow == "on" or default_on or configured or Path("mlflow.db").is_file():
        key = "service.tracking_uri" if service.tracking_uri else "MLFLOW_TRACKING_URI"
        return with_installed_driver(configured, key) if configured else default_tracking_uri()
    return None


__all__ = ["resolve_tracking_uri", "DEFAULT_EXPERIMENT", "TAG_RUN_NAME", "TAG_KIND", "TAG_CHECKPOINT",
           "TAG_TRAINING_RUN", "scrub", "REDACTED", "flat_params", "default_tracking_uri", "ui_command", "experiment_url",
           "find_run", "ensure_training_run", "RunLogger", "experiment_id", "end_status", "mlflow_client", "log_params",
           "filter_quote"]
