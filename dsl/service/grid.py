"""The Table 1 grid (Sec 6.2) as one resumable distributed job: rows × step budgets T, one MLflow run each.

Library entry point (``jobs/grid.py`` is its command line; a pipeline calls it directly)::

    from dsl.cli import load_job, parse
    from dsl.service.grid import run_grid
    _, job = parse(load_job("jobs/grid.py"), ["table.spec=table1", "table.models=mdlm=runs/mdlm-ft,dsl=runs/dsl-ft",
                                              "sampling.num_samples=256", "experiment=mini"])
    summary = run_grid(job)                   # or run_grid(job, spec=GridSpec(...)) for rows built in code

``run_grid(job, spec=None, *, log=print) -> dict``: ``job`` is a :class:`dsl.config.JobConfig` as jobs/grid.py
parses it (the spec's ``[settings]`` already filled in where the command line was silent: use
:func:`dsl.cli.parse`); ``spec`` replaces ``table.spec`` (its settings are then the caller's business). It
returns ``{grid_name, grid_run_id, experiment, tracking_uri, length, steps, cells: {total, skipped,
computed, superseded}, table: [one record per cell], wall_s}``.

What a grid does:

* rows and columns (:mod:`dsl.service.grid_spec`): a :class:`GridSpec` (named,
  ``dsl/config/presets/grid/<name>.toml``, or a TOML file): each row is a model (a role filled by
  ``table.models``, a model spec such as ``oracle:topics``, or ``data`` = exact samples of the judge's
  source) and a sampler (``mdlm``, ``remdm-official``, ``dsl-budget`` with an optional per-row
  ``eta_cap_table``); columns are ``steps`` or ``steps_per_length`` (T = f·L);
* sampling (:mod:`dsl.service.grid_shards`): each cell's ``sampling.num_samples`` are split by index into
  ``table.workers`` contiguous shards drawn by Ray tasks (one GPU each when the cluster has GPUs); sample i
  is seeded ``sample_seed(seed, i)`` (:func:`dsl.sampling.generate`), so a cell's texts do not depend on
  the number of workers; the next cell's shards are queued while a cell is scored;
* scoring (:mod:`dsl.service.grid_scoring` over :mod:`dsl.eval.cells`, the one cell computation): MAUVE
  against reference features computed once per grid (text featurizers through
  :func:`dsl.service.mauve_pool.open_featurizer`, a MauvePool when ``eval.workers`` > 0; ``source-stats``
  on ids), GenPPL under ``eval.judge`` (exact NLL ± SE and the impossible share under an ``oracle:*``
  judge), sentence entropy, NFE, rewrites per token, and the Table 6 sharpness curves;
* record (:mod:`dsl.service.grid_runs`, names of :mod:`dsl.service.lineage`): one parent run per grid,
  found again by ``dsl.grid.name``; one child run per (row, T) with metrics at step 0, the sharpness
  curves as histories with step = the sampler step k, ``samples.jsonl``, ``diagnostics.jsonl`` and
  ``fig2.png``;
* resume: the same command again skips cells complete in MLflow; a child left partial (a killed driver)
  is tagged ``dsl.superseded_by`` = its replacement and ended KILLED; a killed driver loses at most the
  cells in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from dsl.config import ConfigError, JobConfig, to_dict
from dsl.errors import UserError
from dsl.service import lineage as L
from dsl.service.grid_runs import GridRecord, cell_tags, same_cell
from dsl.service.grid_scoring import GridScorer, cell_result, data_draw
from dsl.service.grid_shards import draw_shard, merge_shards, shard_ranges
from dsl.service.grid_spec import (
    DATA_ROW,
    Cell,
    GridSpec,
    load_spec,
    parse_models,
    plan_cells,
    row_checkpoint,
)


def grid_length(job: JobConfig, cells_models: Sequence[str]) -> int:
    """L: ``sampling.length``, else the first model's own length (an oracle's default)."""
    if job.sampling.length:
        return job.sampling.length
    from dsl.sampling import load_denoiser

    for ckpt in cells_models:
        if ckpt == DATA_ROW:
            continue
        if not ckpt.startswith("oracle:"):   # a checkpoint's L from its manifest, no weights loaded here
            from dsl.checkpoint import MANIFEST, latest_complete, open_storage, read_manifest

            storage = open_storage(ckpt)
            if not storage.exists(MANIFEST):
                latest = latest_complete(storage)
                if latest is None:
                    raise UserError(f"table.models: {ckpt} holds no complete checkpoint")
                storage = open_storage(latest)
            length = ((read_manifest(storage, "").get("config") or {}).get("model") or {}).get("length")
            if length:
                return int(length)
            continue
        den = load_denoiser(ckpt, job.sampling, data_cfg=job.data)
        if den.max_length:
            return int(den.max_length)
    raise ConfigError("sampling.length=0 and no row's model has a length of its own: give sampling.length=<L>")


def default_grid_name(spec: GridSpec, job: JobConfig, models: dict[str, str], length: int) -> str:
    """``<spec>-<hash>``: the same command names the same grid (its resume key)."""
    ev = job.eval
    key = {"spec": spec.to_json(), "models": models, "steps": list(job.table.steps), "length": length,
           "sampling": to_dict(job.sampling), "seed": job.seed,
           "eval": {k: getattr(ev, k) for k in ("protocol", "judge", "featurizer", "reference", "references",
                                                 "mauve_seeds", "num_buckets", "max_length", "match_length")},
           "data": to_dict(job.data)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{spec.name}-{digest}"


def _connect_ray(job: JobConfig) -> Any:
    """The Ray connection of the grid: the caller's if it has one, else ``service.ray_address`` /
    ``RAY_ADDRESS``, else a private loopback Ray of ``service.ray_cpus`` (the one start/stop policy)."""
    from dsl.service.ray_session import ray_session

    return ray_session(job.service.ray_address, cpus=job.service.ray_cpus or None, temp_prefix="ray-grid-")


def run_grid(job: JobConfig, spec: GridSpec | None = None, *, log: Callable[[str], None] | None = None
             ) -> dict[str, Any]:
    """Run (or resume) the grid; see the module docstring for what it records and returns."""
    from dsl.service.tracking import end_status, resolve_tracking_uri, scrub

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    spec_ref = job.table.spec if spec is None else spec.name
    spec = spec or load_spec(job.table.spec)
    models = parse_models(job.table.models)
    for row in spec.rows:
        row_checkpoint(row, models)
    tracking_uri = resolve_tracking_uri(job.service, default_on=True)
    if tracking_uri is None:
        raise ConfigError("service.mlflow=off: a grid records its cells in MLflow (that is how it resumes); "
                          "use service.mlflow=on or auto")
    length = grid_length(job, [row_checkpoint(r, models) for r in spec.rows])
    cells = plan_cells(spec, job, models, length)
    protocol = job.eval.protocol if job.eval.protocol != "none" else "offline"
    grid_name = job.table.name or default_grid_name(spec, job, models, length)
    n = job.sampling.num_samples
    spec_json = {**spec.to_json(), "models": models, "steps": sorted({c.steps for c in cells}), "length": length,
                 "num_samples": n, "protocol": protocol, "seed": job.seed,
                 "rows": [{"label": r.label, "model": r.model, "checkpoint": row_checkpoint(r, models),
                           "sampler": r.sampler, "eta_cap_table": r.eta_cap_table or job.sampling.eta_cap_table}
                          for r in spec.rows]}
    params = {"table": {**asdict(job.table), "spec_name": spec.name}, "sampling": to_dict(job.sampling),
              "eval": to_dict(job.eval), "seed": job.seed}
    record = GridRecord(tracking_uri, job.experiment, grid_name)

    def open_record() -> None:   # once the grid's inputs have loaded: a refused grid records nothing
        record.open({L.KIND: L.KIND_GRID, L.GRID_NAME: grid_name, L.GRID_SPEC: spec_ref, L.PROTOCOL: protocol},
                    params, spec_json)
        log(f"grid {grid_name}: {len(cells)} cells ({len(spec.rows)} rows; L={length}, n={n}); MLflow run "
            f"{record.run_id} ({scrub(tracking_uri)}, experiment {job.experiment})"
            + (f"; resumed: {len(cells) - len(pending)} cells complete" if record.resumed else ""))
    done: dict[tuple[str, int], Any] = {}
    partial: dict[tuple[str, int], list[str]] = {}
    for run in record.cells():
        tags = run.data.tags
        if L.SUPERSEDED_BY in tags or L.ROW not in tags:
            continue
        key = (tags[L.ROW], int(tags.get(L.STEPS, "0")))
        if tags.get(L.CELL_STATUS) == L.CELL_COMPLETE and key not in done:
            done[key] = run
        else:
            partial.setdefault(key, []).append(run.info.run_id)
    pending = []
    for cell in cells:
        key = (cell.row.label, cell.steps)
        if key in done and same_cell(done[key], cell):
            cell.run_id = done[key].info.run_id
        else:   # never run, partial, or complete with another model or sampler under this name: (re)run
            cell.old_partial = partial.get(key, []) + ([done[key].info.run_id] if key in done else [])
            pending.append(cell)
    superseded = sum(len(c.old_partial) for c in pending)
    table: list[dict[str, Any]] = []
    status = "FINISHED"
    try:
        if pending:
            _run_cells(job, pending, record, open_record, protocol, length, grid_name, table, log)
        else:
            open_record()
    except BaseException as exc:
        status = end_status(exc)
        if record.run_id is not None:
            record.close(status)
        raise
    record.close(status)
    return {"grid_name": grid_name, "grid_run_id": record.run_id, "experiment": job.experiment,
            "tracking_uri": scrub(tracking_uri), "spec": spec.name, "length": length,
            "steps": sorted({c.steps for c in cells}), "num_samples": n, "protocol": protocol,
            "cells": {"total": len(cells), "skipped": len(cells) - len(pending), "computed": len(pending),
                      "superseded": superseded},
            "cell_runs": {f"{c.row.label} T={c.steps}": c.run_id for c in cells},
            "table": table, "wall_s": round(time.perf_counter() - t0, 3)}


def _run_cells(job: JobConfig, pending: list[Cell], record: GridRecord, open_record: Callable[[], None],
               protocol: str, length: int, grid_name: str, table: list[dict[str, Any]],
               log: Callable[[str], None]) -> None:
    """Sample (on Ray) and score the cells not complete yet, in order; the cell being worked on is ended
    KILLED/FAILED (and stays partial) when the driver is stopped or fails."""
    from dsl.service.tracking import end_status

    n = job.sampling.num_samples
    current: Cell | None = None
    try:
        with _connect_ray(job):
            import ray

            gpus = job.table.gpus_per_worker
            if gpus < 0:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            width = job.table.workers or max(1, int(ray.cluster_resources().get("GPU" if gpus > 0 else "CPU", 1)
                                                   // max(gpus, 1.0)))
            task = ray.remote(draw_shard).options(num_cpus=1, num_gpus=gpus)
            device = "cuda" if gpus > 0 else "cpu"
            data = to_dict(job.data)

            def submit(cell: Cell) -> list[Any]:
                if cell.checkpoint == DATA_ROW:
                    return []
                return [task.remote(cell.checkpoint, to_dict(cell.sampling), data, first, count, length, job.seed,
                                    device) for first, count in shard_ranges(n, width)]

            scorer = GridScorer(job, length, progress=job.progress)
            try:
                open_record()
                queued = {0: submit(pending[0])} if pending else {}
                bar = None
                if job.progress and pending:
                    from tqdm import tqdm

                    bar = tqdm(total=len(pending), desc=f"grid {grid_name}", unit="cell")
                for i, cell in enumerate(pending):
                    if i + 1 < len(pending):   # the next cell samples while this one is scored
                        queued[i + 1] = submit(pending[i + 1])
                    current = cell
                    record.start_cell(cell, cell_tags(cell, record.run_id, protocol, n),
                                      {"sampling": to_dict(cell.sampling), "checkpoint": cell.checkpoint,
                                       "seed": job.seed, "eval.judge": job.eval.judge,
                                       "eval.featurizer": job.eval.featurizer, "eval.reference": job.eval.reference})
                    start = time.perf_counter()
                    refs = queued.pop(i)
                    draw = merge_shards(ray.get(refs)) if refs else data_draw(scorer, n)
                    if draw.get("eta_cap_extrapolation"):
                        log(f"warning: {cell.row.label} T={cell.steps}: {draw['eta_cap_extrapolation']}")
                    record.client.set_tag(cell.run_id, L.ETA_CAP_SOURCE, draw["eta_cap_source"])
                    result = cell_result(draw, scorer)
                    result["wall_s"] = time.perf_counter() - start
                    record.finish_cell(cell, result, draw)
                    current = None
                    table.append(_table_record(cell, result))
                    impossible = (f" ({result['impossible']} of {n} samples impossible under {job.eval.judge})"
                                  if result.get("impossible") else "")
                    log(f"{cell.row.label:34s} T={cell.steps:5d}  MAUVE {result['mauve']:.3f} ± {result['mauve_std']:.3f}"
                        f"  GenPPL {result.get('genppl', float('nan')):.3g}{impossible}"
                        f"  entropy {result['sentence_entropy']:.2f}  NFE {result['nfe']:.0f}  ({result['wall_s']:.1f} s)")
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.close()
            finally:
                scorer.close()
    except BaseException as exc:
        if current is not None:
            record.end_cell(current, end_status(exc))
        raise


def _table_record(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    keep = ("n_samples", "mauve", "mauve_mean", "mauve_std", "mauve_std_resamples", "genppl", "nll_per_token",
            "nll_se", "impossible", "impossible_share", "sentence_entropy", "nfe", "rewrites_per_token", "eta_cap",
            "eta_cap_source", "wall_s")
    def plain(v: Any) -> Any:   # NaN/inf are not JSON: None
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {"row": cell.row.label, "steps": cell.steps, "run_id": cell.run_id,
            **{k: plain(result.get(k)) for k in keep if k in result}}


__all__ = ["run_grid", "grid_length", "default_grid_name"]
