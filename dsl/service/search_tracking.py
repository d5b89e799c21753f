"""The search in MLflow: one parent run per search (found again by its tag on resume), one child run
per finished trial, the chosen η_cap per T, the rule's R² and the output files as artefacts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsl.config import JobConfig
from dsl.service import lineage
from dsl.service.search_trial import SEARCHABLE


class SearchTracking:
    """Does nothing when MLflow is off for the job (``service.mlflow``)."""

    def __init__(self, cfg: JobConfig, storage_label: str, params: dict[str, Any]):
        from dsl.service.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.service, default_on=True)
        self.enabled = uri is not None
        self.parent_id: str | None = None
        if not self.enabled:
            return
        import mlflow

        from dsl.service.tracking import experiment_id

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.exp_id = experiment_id(self.client, cfg.experiment)
        self.search_key = f"{storage_label}|{cfg.search.study}"
        found = self.client.search_runs([self.exp_id], filter_string=f"tags.`dsl.search` = '{self.search_key}'",
                                        max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.logged = {r.data.tags.get("dsl.trial") for r in self.client.search_runs(
                [self.exp_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000)}
        else:
            run = self.client.create_run(self.exp_id, run_name=cfg.name or f"search:{cfg.search.study}",
                                         tags={"dsl.search": self.search_key, lineage.KIND: lineage.KIND_SEARCH})
            self.parent_id = run.info.run_id
            self.logged = set()
            from dsl.service.tracking import flat_params

            for k, v in flat_params(params).items():    # scrubbed: no password of a storage URL
                self.client.log_param(self.parent_id, k, v)
        self.client.set_terminated(self.parent_id, "RUNNING")

    def log_trial(self, study: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tag = f"{study}#{record['number']}"
        if tag in self.logged:
            return
        run = self.client.create_run(self.exp_id, run_name=f"T={record['steps']} #{record['number']}",
                                     tags={"mlflow.parentRunId": self.parent_id, "dsl.trial": tag,
                                           "dsl.state": record["state"]})
        for key in ("eta_cap", *[k for k in SEARCHABLE if k != "eta_cap"], "steps"):
            if key in record:
                self.client.log_param(run.info.run_id, key, record[key])
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in SEARCHABLE \
                    and key not in ("number", "steps") and math.isfinite(float(value)):
                self.client.log_metric(run.info.run_id, key, float(value))
        self.client.log_metric(run.info.run_id, "full_fidelity", float(bool(record.get("full_fidelity"))))
        self.client.set_terminated(run.info.run_id)
        self.logged.add(tag)

    def finish(self, summary: dict[str, Any], files: list[Path], status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        for steps, row in summary.get("chosen", {}).items():
            self.client.log_metric(self.parent_id, f"eta_cap_T{steps}", row["eta_cap"])
            self.client.log_metric(self.parent_id, f"mauve_T{steps}", row["mauve"])
        if "rule_fit" in summary:
            self.client.log_metric(self.parent_id, "rule_r2", summary["rule_fit"]["r2"])
        for f in files:
            if Path(f).exists():
                self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, status)


__all__ = ["SearchTracking"]
