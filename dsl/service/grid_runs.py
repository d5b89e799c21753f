"""The MLflow record of a grid (names of :mod:`dsl.service.lineage`): one parent run per grid, found
again by ``dsl.grid.name``; one child run per cell (row × T) with its metrics, samples, diagnostics and
Fig 2; the tags that say whether a complete cell run can be kept on resume."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from dsl.service import lineage as L
from dsl.service.grid_spec import DATA_ROW, Cell


def same_cell(run: Any, cell: Cell) -> bool:
    """Whether a complete cell run drew what ``cell`` would (same model and sampler)."""
    from dsl.redact import scrub

    tags = run.data.tags
    return tags.get(L.CHECKPOINT) == scrub(cell.checkpoint) and tags.get(L.SAMPLER) == (cell.row.sampler or DATA_ROW)


def cell_tags(cell: Cell, grid_run: str, protocol: str, n: int) -> dict[str, str]:
    return {L.PARENT_RUN: grid_run, L.KIND: L.KIND_CELL, L.ROW: cell.row.label, L.CHECKPOINT: cell.checkpoint,
            L.SAMPLER: cell.row.sampler or DATA_ROW, L.STEPS: str(cell.steps), L.PROTOCOL: protocol,
            L.NUM_SAMPLES: str(n), L.CELL_STATUS: L.CELL_PARTIAL}


class GridRecord:
    """The parent run of a grid (found again by ``dsl.grid.name``) and its cell runs. Finding writes
    nothing; :meth:`open` creates the parent (and the experiment) the first time, once the grid's inputs
    have loaded."""

    def __init__(self, tracking_uri: str, experiment: str, grid_name: str):
        import mlflow

        self.uri, self.experiment, self.name = tracking_uri, experiment, grid_name
        self.client = mlflow.MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.exp_id = exp.experiment_id if exp is not None else None
        found = self.client.search_runs(
            [self.exp_id], filter_string=f"tags.`{L.KIND}` = '{L.KIND_GRID}' and tags.`{L.GRID_NAME}` = "
                                         f"'{grid_name.replace(chr(39), chr(92) + chr(39))}'",
            order_by=["attributes.start_time ASC"], max_results=1) if self.exp_id else []
        self.resumed = bool(found)
        self.run_id: str | None = found[0].info.run_id if found else None

    def open(self, tags: dict[str, str], params: dict[str, Any], spec_json: dict[str, Any]) -> str:
        from dsl.service.tracking import experiment_id, flat_params, log_params

        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return self.run_id
        from dsl.service.code_version import code_tags

        self.exp_id = experiment_id(self.client, self.experiment)
        self.run_id = self.client.create_run(self.exp_id, run_name=f"grid {self.name}",
                                             tags={**tags, **code_tags()}).info.run_id
        log_params(self.client, self.run_id, flat_params(params))
        self.client.log_dict(self.run_id, spec_json, L.GRID_SPEC_ARTIFACT)
        return self.run_id

    def cells(self) -> list[Any]:
        if self.run_id is None:
            return []
        out, token = [], None
        flt = f"tags.`{L.PARENT_RUN}` = '{self.run_id}' and tags.`{L.KIND}` = '{L.KIND_CELL}'"
        while True:
            page = self.client.search_runs([self.exp_id], filter_string=flt, max_results=1000, page_token=token,
                                           order_by=["attributes.start_time ASC"])
            out += list(page)
            token = page.token
            if not token:
                return out

    def start_cell(self, cell: Cell, tags: dict[str, str], params: dict[str, Any]) -> str:
        from dsl.redact import scrub
        from dsl.service.job_runs import lineage_tags
        from dsl.service.tracking import flat_params, log_params

        all_tags = {**lineage_tags(L.KIND_CELL, None if cell.checkpoint == DATA_ROW else cell.checkpoint,
                                   tracking_uri=self.uri), **{k: scrub(v) for k, v in tags.items()}}
        run_id = self.client.create_run(self.exp_id, run_name=f"{cell.row.label} T={cell.steps}",
                                        tags=all_tags).info.run_id
        log_params(self.client, run_id, flat_params(params))
        for old in cell.old_partial:   # what this run replaces: kept, marked, closed
            self.client.set_tag(old, L.SUPERSEDED_BY, run_id)
            self.client.set_terminated(old, "KILLED")
        cell.run_id = run_id
        return run_id

    def finish_cell(self, cell: Cell, result: dict[str, Any], draw: dict[str, Any]) -> None:
        from dsl.service.tracking import RunLogger

        metrics = {L.MAUVE: result["mauve"], L.MAUVE_MEAN: result["mauve_mean"], L.MAUVE_STD: result["mauve_std"],
                   L.SENTENCE_ENTROPY: result["sentence_entropy"], L.NFE: result["nfe"],
                   L.REWRITES_PER_TOKEN: result["rewrites_per_token"], L.NUM_SAMPLES_METRIC: result["n_samples"]}
        if result.get("genppl") is not None:
            metrics[L.GENPPL] = result["genppl"]
        if result.get("impossible_share") is not None:
            metrics[L.GENPPL_IMPOSSIBLE_SHARE] = result["impossible_share"]
        if result.get("eta_cap") is not None:
            metrics[L.ETA_CAP] = result["eta_cap"]
        for extra in ("nll_per_token", "nll_se", "impossible", "mauve_std_resamples", "wall_s"):
            if result.get(extra) is not None:
                metrics[extra] = result[extra]
        logger = RunLogger(cell.run_id, self.uri, system_metrics=False)
        logger.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory(prefix="dsl-grid-") as tmp:
            samples = os.path.join(tmp, L.SAMPLES_ARTIFACT)
            settings = {**draw["settings"], "checkpoint": cell.checkpoint, L.RECORD_RUN_ID: cell.run_id,
                        L.RECORD_RUN_NAME: f"{cell.row.label} T={cell.steps}"}
            with open(samples, "w", encoding="utf-8") as fh:
                for i, (row, text) in enumerate(zip(draw["ids"].tolist(), draw["texts"])):
                    fh.write(json.dumps({"index": i, "ids": row, "text": text, "settings": settings}) + "\n")
            if draw["diagnostics"] is not None:
                from dsl.sampling.diagnostics import diagnostics_to_records

                diag = os.path.join(tmp, L.DIAGNOSTICS_ARTIFACT)
                with open(diag, "w", encoding="utf-8") as fh:
                    for rec in diagnostics_to_records(draw["diagnostics"]):
                        fh.write(json.dumps(rec) + "\n")
                logger.log_sampling(draw["diagnostics"], samples=samples, diagnostics_file=diag,
                                    title=f"{cell.row.label} T={cell.steps}")
            else:
                logger.log_artifact(samples)
        logger.log_json({k: v for k, v in result.items()}, "cell.json")
        logger.set_tags({L.CELL_STATUS: L.CELL_COMPLETE})
        logger.close("FINISHED")

    def end_cell(self, cell: Cell, status: str) -> None:
        if cell.run_id:
            self.client.set_terminated(cell.run_id, status)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


__all__ = ["GridRecord", "same_cell", "cell_tags"]
