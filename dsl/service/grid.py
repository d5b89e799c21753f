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

* rows and columns: a :class:`GridSpec` (named, ``dsl/config/presets/grid/<name>.toml``, or a TOML file):
  each row is a model (a role filled by ``table.models``, a model spec such as ``oracle:topics``, or
  ``data`` = exact samples of the judge's source) and a sampler (``mdlm``, ``remdm-official``,
  ``dsl-budget`` with an optional per-row ``eta_cap_table``); columns are ``steps`` or
  ``steps_per_length`` (T = f·L);
* sampling: each cell's ``sampling.num_samples`` are split by index into ``table.workers`` contiguous
  shards drawn by Ray tasks (one GPU each when the cluster has GPUs); sample i is seeded
  ``sample_seed(seed, i)`` (:func:`dsl.sampling.generate`), so a cell's texts do not depend on the number
  of workers; the next cell's shards are queued while a cell is scored;
* scoring (:mod:`dsl.eval.cells`, the one cell computation): MAUVE against reference features computed
  once per grid (text featurizers through :func:`dsl.service.mauve_pool.open_featurizer`, a MauvePool when
  ``eval.workers`` > 0; ``source-stats`` on ids), GenPPL under ``eval.judge`` (exact NLL ± SE and the
  impossible share under an ``oracle:*`` judge), sentence entropy, NFE, rewrites per token, and the
  Table 6 sharpness curves;
* record (names of :mod:`dsl.service.lineage`): one parent run per grid, found again by ``dsl.grid.name``;
  one child run per (row, T) with metrics at step 0, the sharpness curves as histories with step = the
  sampler step k, ``samples.jsonl``, ``diagnostics.jsonl`` and ``fig2.png``;
* resume: the same command again skips cells complete in MLflow; a child left partial (a killed driver)
  is tagged ``dsl.superseded_by`` = its replacement and ended KILLED; a killed driver loses at most the
  cells in flight.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dsl.config import ConfigError, DataConfig, JobConfig, SamplingConfig, from_dict, to_dict
from dsl.errors import UserError
from dsl.service import lineage as L

DATA_ROW = "data"             # a row of exact samples of the judge's source (Table 1's ceiling)
_SPEC_KEYS = ("description", "steps", "steps_per_length", "settings", "rows")
_ROW_KEYS = ("label", "model", "sampler", "eta_cap_table", "steps")


# ----------------------------------------------------------------------------------------------
# The spec: rows and columns.


@dataclass(frozen=True)
class GridRow:
    """A Table 1 row: ``model`` (a role of ``table.models``, a model spec, or ``data``) decoded with
    ``sampler``; ``eta_cap_table`` replaces ``sampling.eta_cap_table`` for this row; ``steps`` replaces
    the grid's budgets (a data row has one cell, at T = L)."""

    label: str
    model: str
    sampler: str = ""
    eta_cap_table: str = ""
    steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class GridSpec:
    """Rows, columns (``steps``, or ``steps_per_length``: T = max(1, round(f·L))) and the ``settings``
    (``key=value`` words of the config tree) a named layout implies."""

    name: str
    rows: tuple[GridRow, ...]
    steps: tuple[int, ...] = ()
    steps_per_length: tuple[float, ...] = ()
    settings: tuple[str, ...] = ()
    description: str = ""

    def budgets(self, length: int, override: Sequence[int] = ()) -> list[int]:
        if override:
            return list(override)
        if self.steps:
            return list(self.steps)
        if self.steps_per_length:
            return sorted({max(1, round(f * length)) for f in self.steps_per_length})
        raise ConfigError(f"grid spec {self.name}: no step budgets; give table.steps=T,T,...")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": [asdict(r) for r in self.rows], "steps": list(self.steps),
                "steps_per_length": list(self.steps_per_length), "settings": list(self.settings)}


def named_specs() -> dict[str, str]:
    """``{name: description}`` of the grid specs in ``dsl/config/presets/grid/``."""
    from dsl.config.presets import _files, _read

    return {name: str(_read(p).get("description", "")) for name, p in sorted(_files("grid").items())}


def load_spec(ref: str) -> GridSpec:
    """The :class:`GridSpec` ``ref`` names: a named spec or a TOML file (one line naming what is wrong)."""
    from dsl.config.presets import _files, _overrides, _read

    named = _files("grid")
    if ref in named:
        data, where = _read(named[ref]), f"table.spec={ref}"
    elif ref.endswith(".toml") or os.path.sep in ref:
        if not os.path.isfile(ref):
            raise UserError(f"table.spec={ref}: no such file; give a named spec ({', '.join(named)}) or a TOML file")
        from dsl.config.presets import tomllib

        try:
            with open(ref, "rb") as fh:
                data = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"table.spec={ref}: {' '.join(str(exc).split())}") from None
        where = f"table.spec={ref}"
    else:
        raise ConfigError(f"table.spec={ref!r}: not a named spec ({', '.join(named)}) nor a .toml file")
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(_SPEC_KEYS)}")
    rows = []
    for i, raw in enumerate(data.get("rows") or []):
        bad = sorted(set(raw) - set(_ROW_KEYS))
        if bad or not raw.get("label") or not raw.get("model"):
            raise ConfigError(f"{where}: row {i + 1} needs label and model (and a sampler unless model = "
                              f"{DATA_ROW}); keys of a row: {', '.join(_ROW_KEYS)}"
                              + (f"; unknown: {', '.join(bad)}" if bad else ""))
        if raw["model"] != DATA_ROW and not raw.get("sampler"):
            raise ConfigError(f"{where}: row {raw['label']!r} names no sampler")
        rows.append(GridRow(label=str(raw["label"]), model=str(raw["model"]), sampler=str(raw.get("sampler", "")),
                            eta_cap_table=str(raw.get("eta_cap_table", "")),
                            steps=tuple(int(t) for t in raw.get("steps", ()))))
    if not rows:
        raise ConfigError(f"{where}: no [[rows]]")
    if len({r.label for r in rows}) != len(rows):
        raise ConfigError(f"{where}: two rows share a label")
    name = ref if ref in named else os.path.splitext(os.path.basename(ref))[0]
    return GridSpec(name=name, rows=tuple(rows), steps=tuple(int(t) for t in data.get("steps", ())),
                    steps_per_length=tuple(float(f) for f in data.get("steps_per_length", ())),
                    settings=tuple(_overrides(data.get("settings") or {})), description=str(data.get("description", "")))


def parse_models(text: str) -> dict[str, str]:
    """``table.models`` → ``{role: model spec}``."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        role, sep, uri = part.partition("=")
        if not sep or not role or not uri:
            raise ConfigError(f"table.models={text}: expected role=<checkpoint>,... (e.g. mdlm=runs/mdlm-ft,"
                              f"dsl=runs/dsl-ft), got {part!r}")
        out[role.strip()] = uri.strip()
    return out


def row_checkpoint(row: GridRow, models: dict[str, str]) -> str:
    """The model spec a row samples from (``data`` for a data row)."""
    if row.model == DATA_ROW:
        return DATA_ROW
    if row.model in models:
        return models[row.model]
    if ":" in row.model or os.path.sep in row.model:
        return row.model
    raise ConfigError(f"row {row.label!r} samples from model {row.model!r}: give table.models={row.model}=<checkpoint>"
                      + (f" (given: {', '.join(models)})" if models else ""))


def settle_grid(cfg: JobConfig, named: frozenset[str]) -> None:
    """A named layout's settings go in where the command line is silent (one line on a conflict with a
    fixed setting of ``eval.protocol=paper-table1``)."""
    from dsl.config.parse import set_key, split_override

    spec = load_spec(cfg.table.spec)
    for word in spec.settings:
        key, raw = split_override(word)
        if key not in named:
            set_key(cfg, key, raw)
    if cfg.eval.protocol != "none":
        from dsl.eval.paper_protocol import PaperTable1

        PaperTable1().apply(cfg.eval, {k.removeprefix("eval.") for k in named if k.startswith("eval.")})
    import typing

    samplers = typing.get_args(typing.get_type_hints(SamplingConfig)["sampler"])
    for row in spec.rows:
        if row.sampler and row.sampler not in samplers:
            raise ConfigError(f"table.spec={cfg.table.spec}: row {row.label!r} has sampler {row.sampler!r}; "
                              f"samplers: {', '.join(samplers)}")


def check_grid(cfg: JobConfig) -> None:
    """Before anything is loaded or recorded: every row's model is named, MLflow is on."""
    models = parse_models(cfg.table.models)
    for row in load_spec(cfg.table.spec).rows:
        row_checkpoint(row, models)
    if cfg.service.mlflow == "off":
        raise ConfigError("service.mlflow=off: a grid records its cells in MLflow (that is how it resumes); "
                          "use service.mlflow=on or auto")


# ----------------------------------------------------------------------------------------------
# Sampling shards (Ray tasks).


_DENOISERS: dict[tuple[str, int, str, str], Any] = {}


def _denoiser(checkpoint: str, sampling: SamplingConfig, length: int, data: DataConfig, device: str) -> Any:
    """Loaded once per worker process and kept (a worker draws shards of many cells)."""
    from dsl.sampling import load_denoiser

    key = (checkpoint, length, json.dumps(to_dict(data), sort_keys=True), f"{device}:{sampling.gamma_vis}")
    if key not in _DENOISERS:
        _DENOISERS[key] = load_denoiser(checkpoint, sampling, length=length, data_cfg=data, device=device)
    return _DENOISERS[key]


def draw_shard(checkpoint: str, sampling: dict, data: dict, first: int, n: int, length: int, seed: int,
               device: str) -> dict[str, Any]:
    """Samples ``first .. first+n-1`` of a cell (the body of one Ray task): ids, texts, NFE, rewrites and
    the per-step sums behind the diagnostics (merged exactly across shards)."""
    from dsl.sampling import generate

    cfg = from_dict(SamplingConfig, sampling)
    den = _denoiser(checkpoint, cfg, length, from_dict(DataConfig, data), device)
    batch = generate(den, cfg, n, length, seed, first_index=first)
    return {"first": first, "ids": batch.ids.cpu().numpy(), "texts": [den.decode(r) for r in batch.ids],
            "seeds": batch.seeds.numpy(), "nfe": batch.nfe.cpu().numpy(), "mean_rewrites": batch.mean_rewrites.numpy(),
            "recorder": batch.recorder, "settings": batch.settings, "eta_cap": batch.eta_cap,
            "eta_cap_source": batch.eta_cap_source, "eta_cap_extrapolation": batch.eta_cap_extrapolation}


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``[(first, count)]``: ``n`` samples in ``shards`` contiguous index ranges (sizes differ by at most 1)."""
    shards = max(1, min(shards, n))
    base, extra = divmod(n, shards)
    out, first = [], 0
    for k in range(shards):
        count = base + (1 if k < extra else 0)
        out.append((first, count))
        first += count
    return out


def merge_shards(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's draw from its shards, in sample-index order."""
    from dsl.sampling.diagnostics import StepRecorder

    parts = sorted(parts, key=lambda p: p["first"])
    recorder = StepRecorder.merged([p["recorder"] for p in parts])
    head = parts[0]
    return {"ids": torch.from_numpy(np.concatenate([p["ids"] for p in parts])),
            "texts": [t for p in parts for t in p["texts"]], "seeds": np.concatenate([p["seeds"] for p in parts]),
            "nfe": torch.from_numpy(np.concatenate([p["nfe"] for p in parts])),
            "mean_rewrites": torch.from_numpy(np.concatenate([p["mean_rewrites"] for p in parts])),
            "diagnostics": recorder.finalize(), "settings": {**head["settings"], "first_index": 0},
            "eta_cap": head["eta_cap"], "eta_cap_source": head["eta_cap_source"],
            "eta_cap_extrapolation": head["eta_cap_extrapolation"]}


# ----------------------------------------------------------------------------------------------
# Scoring: the grid's judge and references, computed once.


class GridScorer:
    """The judge, the featurizer and the reference features of one grid (computed once, used by every
    cell): ``scorer.score(ids, texts)`` is :func:`dsl.eval.cells.score_cell` with them. ``source``: the
    exact source to judge and draw references from, when the caller already holds it (else the one
    ``eval.judge=oracle:*`` names, built from ``data.*``)."""

    def __init__(self, job: JobConfig, length: int, *, source: Any = None, progress: bool = False):
        from dsl.eval.cells import SOURCE_STATS, SourceStatsFeaturizer
        from dsl.eval.protocols import load_judge

        ev = job.eval
        self.job, self.length = job, length
        self.seeds = tuple(ev.mauve_seeds)
        self.source = source if source is not None else exact_source(job, length)
        if source is not None and ev.judge.startswith("oracle:"):
            from dsl.eval.genppl import ExactSourceOracle

            self.judge = ExactSourceOracle(source)   # the very source the caller holds (e.g. non-default data.*)
        else:
            self.judge, _ = load_judge(job, [[0] * length])
        self.n_ref = ev.references or job.sampling.num_samples
        self._close: Callable[[], None] = lambda: None
        if ev.featurizer == SOURCE_STATS:
            if self.source is None:
                raise ConfigError(f"eval.featurizer={SOURCE_STATS} reads an exact source: give eval.judge=oracle:"
                                  f"<hmm|topics>")
            self.featurizer = SourceStatsFeaturizer(self.source)
            self.ref_features = self.featurizer.features(self.reference_ids(self.n_ref))
            self.references = None
            return
        from dsl.eval.mauve import ReferenceSet
        from dsl.eval.protocols import feature_cache
        from dsl.service.mauve_pool import open_featurizer

        cache = feature_cache(ev.feature_cache)
        if ev.reference == "source":
            if self.source is None:
                raise ConfigError("eval.reference=source draws the exact source's samples: give eval.judge=oracle:*")
            texts = [self.source.decode(r) for r in self.reference_ids(self.n_ref)]
            refs = ReferenceSet(texts, origin=f"exact samples of {ev.judge}", cache=cache, eot=ev.eot)
        elif not ev.reference:
            raise ConfigError("eval.reference='' : give eval.reference=<file.jsonl|file.txt|hf:dataset> or "
                              "source (with eval.judge=oracle:*)")
        else:
            tokenizer = None
            if ev.reference_blocks > 0:
                from dsl.eval.references import load_reference_tokenizer

                tokenizer = load_reference_tokenizer(ev.reference_tokenizer)
            refs = ReferenceSet.from_spec(ev.reference, self.n_ref, ev.reference_seed, cache=cache,
                                          text_field=job.data.text_field, split=ev.reference_split,
                                          words_per_text=ev.words_per_reference, blocks=ev.reference_blocks,
                                          tokenizer=tokenizer, heldout_docs=ev.heldout_docs, eot=ev.eot,
                                          progress=progress)
        self.references = _OnceReferences(refs)
        self.featurizer, self._close = open_featurizer(ev.featurizer, ev.workers, ev.max_length,
                                                       gpus_per_worker=ev.gpus_per_worker,
                                                       batch_size=ev.featurize_batch, device=job.service.device,
                                                       ray_address=job.service.ray_address)

    def reference_ids(self, n: int, key: str = "mauve") -> torch.Tensor:
        """``n`` exact samples from a generator keyed apart from every sampling stream."""
        from dsl.seeding import sample_generator

        return self.source.sample(n, sample_generator(self.job.seed, "grid-reference", key))

    def mauve(self, ids: torch.Tensor, texts: Sequence[str]) -> dict[str, Any]:
        from dsl.eval.cells import mauve_with_errors
        from dsl.eval.mauve import evaluate_mauve
        from dsl.eval.protocols import _num_buckets

        ev = self.job.eval
        if self.references is None:
            return mauve_with_errors(self.ref_features, self.featurizer.features(ids), self.seeds,
                                     self.job.table.mauve_resamples, self.job.seed, _num_buckets(ev.num_buckets))
        res = evaluate_mauve(list(texts), self.references, self.featurizer, seeds=self.seeds,
                             num_buckets=_num_buckets(ev.num_buckets), match_length=ev.match_length,
                             n_tokens=ev.length_budget)
        return {"mauve": res["mauve"], "mauve_mean": res["mean"], "mauve_std": res["std"],
                "mauve_values": res["values"], "mauve_buckets": res["num_buckets"], "mauve_std_resamples": math.nan,
                "mauve_warnings": res.get("warnings", [])}

    def score(self, ids: torch.Tensor, texts: Sequence[str]) -> dict[str, Any]:
        from dsl.eval.cells import score_cell

        return score_cell(ids, mauve=self.mauve, judge=self.judge, texts=texts, genppl_batch=self.job.eval.genppl_batch)

    def close(self) -> None:
        self._close()


class _OnceReferences:
    """A reference set whose features are computed once per token budget for the whole grid."""

    def __init__(self, refs: Any):
        self._refs = refs
        self._memo: dict[Any, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._refs, name)

    def __len__(self) -> int:
        return len(self._refs)

    def features(self, featurizer: Any, n_tokens: int | None = None, progress: bool = False) -> np.ndarray:
        if n_tokens not in self._memo:
            self._memo[n_tokens] = self._refs.features(featurizer, n_tokens, progress)
        return self._memo[n_tokens]


def exact_source(job: JobConfig, length: int) -> Any:
    """The exact source of ``eval.judge=oracle:*`` at length L (None for another judge)."""
    if not job.eval.judge.startswith("oracle:"):
        return None
    from dsl.sources import build_source

    return build_source(job.eval.judge.split(":", 1)[1], job.data, length)


def cell_result(draw: dict[str, Any], scorer: GridScorer) -> dict[str, Any]:
    """The one cell computation: the draw's sampler numbers and its samples' scores."""
    from dsl.eval.cells import sampler_stats

    out = sampler_stats(draw["nfe"], draw["mean_rewrites"], draw["eta_cap"], draw["eta_cap_source"])
    out.update(scorer.score(draw["ids"], draw["texts"]))
    return out


def batch_draw(batch: Any, decode: Callable[[Any], str]) -> dict[str, Any]:
    """A draw (what :func:`cell_result` scores) from a :class:`dsl.sampling.SampleBatch` drawn in process."""
    return {"ids": batch.ids.cpu(), "texts": [decode(r) for r in batch.ids], "nfe": batch.nfe.cpu(),
            "mean_rewrites": batch.mean_rewrites, "diagnostics": batch.diagnostics, "settings": batch.settings,
            "eta_cap": batch.eta_cap, "eta_cap_source": batch.eta_cap_source,
            "eta_cap_extrapolation": batch.eta_cap_extrapolation}


def data_draw(scorer: GridScorer, n: int) -> dict[str, Any]:
    """A data row's "draw": ``n`` exact samples of the judge's source, keyed apart from the references."""
    if scorer.source is None:
        raise ConfigError(f"a {DATA_ROW} row draws exact samples of the judge's source: give eval.judge=oracle:*")
    ids = scorer.reference_ids(n, "data-row")
    return {"ids": ids, "texts": [scorer.source.decode(r) for r in ids], "nfe": torch.zeros(n),
            "mean_rewrites": torch.zeros(n), "diagnostics": None, "settings": {"length": int(ids.shape[1])},
            "eta_cap": None, "eta_cap_source": "none", "eta_cap_extrapolation": None}


# ----------------------------------------------------------------------------------------------
# The MLflow record of a grid.


@dataclass
class Cell:
    row: GridRow
    checkpoint: str
    steps: int
    sampling: SamplingConfig
    run_id: str = ""          # set when complete in MLflow (skipped) or once its child run exists
    old_partial: list[str] = field(default_factory=list)


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


# ----------------------------------------------------------------------------------------------
# The grid.


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


def plan_cells(spec: GridSpec, job: JobConfig, models: dict[str, str], length: int) -> list[Cell]:
    budgets = spec.budgets(length, job.table.steps)
    cells = []
    for row in spec.rows:
        ckpt = row_checkpoint(row, models)
        for steps in (row.steps or ([length] if row.model == DATA_ROW else budgets)):
            sampling = replace(job.sampling, steps=steps, length=length, num_samples=job.sampling.num_samples,
                               sampler=row.sampler or job.sampling.sampler,
                               eta_cap_table=row.eta_cap_table or job.sampling.eta_cap_table,
                               first_index=0, trajectory="", plot="")
            cells.append(Cell(row=row, checkpoint=ckpt, steps=steps, sampling=sampling))
    return cells


def _same_cell(run: Any, cell: Cell) -> bool:
    """Whether a complete cell run drew what ``cell`` would (same model and sampler)."""
    from dsl.redact import scrub

    tags = run.data.tags
    return tags.get(L.CHECKPOINT) == scrub(cell.checkpoint) and tags.get(L.SAMPLER) == (cell.row.sampler or DATA_ROW)


def _cell_tags(cell: Cell, grid_run: str, protocol: str, n: int) -> dict[str, str]:
    return {L.PARENT_RUN: grid_run, L.KIND: L.KIND_CELL, L.ROW: cell.row.label, L.CHECKPOINT: cell.checkpoint,
            L.SAMPLER: cell.row.sampler or DATA_ROW, L.STEPS: str(cell.steps), L.PROTOCOL: protocol,
            L.NUM_SAMPLES: str(n), L.CELL_STATUS: L.CELL_PARTIAL}


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
        if key in done and _same_cell(done[key], cell):
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
                    record.start_cell(cell, _cell_tags(cell, record.run_id, protocol, n),
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


__all__ = ["GridRow", "GridSpec", "GridScorer", "DATA_ROW", "named_specs", "load_spec", "parse_models",
           "row_checkpoint", "settle_grid", "check_grid", "draw_shard", "shard_ranges", "merge_shards", "exact_source",
           "cell_result", "batch_draw", "data_draw", "plan_cells", "default_grid_name", "run_grid"]
