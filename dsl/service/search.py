"""The η_cap(T) search service: Ray Tune + Optuna (TPE) per step budget, resumable, logged to MLflow.

Sec 5.2 picks one scalar per step budget, η_cap(T), so that the mean rewrite count E[R_i] (eq. 25)
stays in a target band ([1, 2]) while MAUVE is as high as possible; the paper sets it by hand and
prints two tables (Sec 6.1 / eq. 24 vs Table 4). This module measures it instead:

- per T, a Ray Tune ``Tuner`` whose searcher (:mod:`dsl.service.search_optuna`) asks Optuna's seeded
  TPE for η_cap (log-uniform) and optionally t_on, t_off, α_on, top-p; each trial
  (:mod:`dsl.service.search_trial`) samples with ReMDM-loop and is scored by ONE shared ``MauvePool``
  whose reference features are computed once, from the references evaluation reads
  (:func:`dsl.eval.protocols.load_references`);
- ASHA over the sample count stops weak settings early (single objective: Optuna multi-objective
  studies get no intermediate values and cannot be combined with ASHA, so the band enters as a
  penalty); stopped trials are PRUNED, and only full-fidelity trials can be chosen;
- the studies live in an RDB (:mod:`dsl.service.search_study`); re-running the same command continues
  them, and the TPE seed is derived from the number of trials already stored so a resumed search does
  not replay its start-up configurations;
- MLflow (:mod:`dsl.service.search_tracking`): a parent run per search, a child run per trial.

The checks and the search space are in :mod:`dsl.service.search_config`, the table/rule/plot in
:mod:`dsl.service.search_results`.

Output (``out``): ``eta_cap_table.json`` ({"table": {...}}) and ``eta_cap_rule.json`` ({"rule":
{...}}; its R² is in the summary), both readable by ``jobs/sample.py eta_cap_table=<file>``;
``mauve_vs_rewrites.png``; ``search_summary.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsl import config as C
from dsl.atomic import write_json_atomic
from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError, one_line
from dsl.service.ray_session import ray_session
from dsl.service.search_config import search_space, trial_resources
from dsl.service.search_results import best_per_steps, eta_cap_artifacts, plot_mauve_vs_rewrites
from dsl.service.search_study import (
    open_storage,
    prepare_study,
    storage_label,
    storage_url,
    study_name,
    study_records,
    tpe_seed,
)
from dsl.service.search_tracking import SearchTracking
from dsl.service.search_trial import SEARCHABLE, TrialSetup, run_trial, rungs_for
from dsl.service.tracking import end_status

# ----------------------------------------------------------------------------------------------
# Preflight: every bad input is one line before any trial starts


@dataclass
class Prepared:
    denoiser: Any
    reference_texts: list[str]
    storage: Any
    storage_label: str


def _load_reference_texts(cfg: JobConfig, denoiser: Any) -> list[str]:
    """``eval.references`` texts: drawn from the oracle's exact source (``eval.reference=source``), else
    read as evaluation reads them (:func:`dsl.eval.protocols.load_references`)."""
    ev = cfg.eval
    if ev.reference == "source":
        source = getattr(denoiser, "source", None)
        if source is None or not hasattr(source, "sample"):
            raise UserError(f"eval.reference=source needs an oracle checkpoint (oracle:hmm), not "
                            f"checkpoint={cfg.checkpoint!r}; give eval.reference=<file.txt|file.jsonl|hf:dataset>")
        from dsl.seeding import sample_generator

        # a seed stream disjoint from the trials' sampling seeds
        ids = source.sample(ev.references, sample_generator(cfg.seed, "search-references"))
        return [source.decode(row) for row in ids]
    if not ev.reference.startswith("hf:") and not Path(ev.reference).is_file():
        raise UserError(f"eval.reference={ev.reference!r} is not a file; expected 'source', a .txt file (one "
                        f"text per line), a .jsonl file with a 'text' field or hf:<dataset>")
    from dsl.eval.protocols import load_references

    return list(load_references(cfg, ev.references).texts)


def prepare(cfg: JobConfig) -> Prepared:
    """Open the checkpoint, the references and the study storage; raise one line on bad input."""
    from dsl.eval.featurizers import resolve_spec
    from dsl.outputs import output_dir
    from dsl.sampling import check_sampling_memory, load_denoiser

    output_dir(cfg.out)
    resolve_spec(cfg.eval.featurizer)
    try:
        denoiser = load_denoiser(cfg.checkpoint, cfg.sampling, length=cfg.sampling.length)
    except (UserError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is bad input
        raise UserError(f"checkpoint={cfg.checkpoint!r} cannot be loaded ({type(exc).__name__}: "
                        f"{one_line(exc)[:200]}); expected oracle:hmm, oracle:cyclic, a "
                        f"checkpoint directory or an s3:// URI") from None
    length = cfg.sampling.length or denoiser.max_length
    check_sampling_memory(denoiser, cfg.sampling, cfg.sampling.num_samples, length)
    references = _load_reference_texts(cfg, denoiser)
    url = storage_url(cfg)
    storage = open_storage(url)
    for steps in cfg.search.budgets:
        prepare_study(storage, study_name(cfg, steps))
    return Prepared(denoiser, references, storage, storage_label(url))


# ----------------------------------------------------------------------------------------------
# The trial function Ray Tune runs


def _trainable(config: dict[str, Any], setup: TrialSetup = None, pool: Any = None, reference: Any = None):
    import ray.tune
    import torch

    torch.set_num_threads(1)
    denoiser = _cached_denoiser(setup.checkpoint, setup.sampling, setup.length)
    params = {k: v for k, v in config.items() if k in SEARCHABLE}
    run_trial(params, setup, denoiser, pool.mauve, reference, ray.tune.report)


_DENOISERS: dict[tuple[str, int], Any] = {}


def _cached_denoiser(spec: str, sampling: dict[str, Any], length: int) -> Any:
    """Load once per trial process (a Tune trial may reuse its actor)."""
    if (spec, length) not in _DENOISERS:
        from dsl.config import SamplingConfig, from_dict
        from dsl.sampling import load_denoiser

        _DENOISERS[spec, length] = load_denoiser(spec, from_dict(SamplingConfig, sampling), length=length)
    return _DENOISERS[spec, length]


# ----------------------------------------------------------------------------------------------
# The search


def run_search(cfg: JobConfig, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) the search for every T; write the JSON artefacts and the plot; return a summary."""
    from dsl.service.mauve_pool import MauvePool

    out = Path(cfg.out)
    prepared = prepare(cfg)     # every bad input fails here, before Ray or any trial starts
    tracking = SearchTracking(cfg, prepared.storage_label, params if params is not None else C.flatten(cfg))
    sr, n = cfg.search, cfg.sampling.num_samples
    rungs = rungs_for(n, sr.min_samples, sr.asha_reduction) if sr.asha else (n,)
    status = "FAILED"
    try:
        with ray_session(cfg.service.ray_address, cpus=cfg.service.ray_cpus or None, temp_prefix="ray-search-"):
            import ray

            pool = MauvePool(cfg.eval.featurizer, cfg.eval.workers, cfg.eval.max_length)
            reference = pool.featurize(prepared.reference_texts)   # reference features: computed once
            resources, slots = trial_resources(ray.cluster_resources(), _pool_cpus(pool, cfg), cfg)
            started = time.perf_counter()
            ran = sum(_search_one_budget(cfg, steps, rungs, prepared, pool, reference, resources, slots, tracking)
                      for steps in cfg.search.budgets)
            trial_seconds = time.perf_counter() - started
            _shutdown_pool(pool)
        summary = _write_outputs(cfg, prepared, out, rungs)
        summary.update(trials_run=ran, trial_seconds=round(trial_seconds, 3), concurrent_trials=slots,
                       trial_resources=resources)
        status = "FINISHED"
        tracking.finish(summary, [out / "eta_cap_table.json", out / "eta_cap_rule.json",
                                  out / "mauve_vs_rewrites.png", out / "search_summary.json"], status)
        return summary
    except BaseException as exc:
        status = end_status(exc)   # FAILED, or KILLED when stopped (Ctrl-C, SIGTERM)
        raise
    finally:
        if status != "FINISHED":
            tracking.finish({}, [], status)


def _pool_cpus(pool: Any, cfg: JobConfig) -> float:
    per = getattr(pool, "cpus_per_worker", None)
    return float(per if per is not None else 1.0) * cfg.eval.workers


def _shutdown_pool(pool: Any) -> None:
    for name in ("shutdown", "close"):
        if hasattr(pool, name):
            getattr(pool, name)()
            return


def _search_one_budget(cfg: JobConfig, steps: int, rungs: tuple[int, ...], prepared: Prepared, pool: Any,
                       reference: Any, resources: dict, slots: int, tracking: SearchTracking) -> int:
    """Run the trials T still lacks; returns how many were started."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from tqdm import tqdm

    name = study_name(cfg, steps)
    done, stored = prepare_study(prepared.storage, name)
    for record in study_records(prepared.storage, name, steps):
        # a driver killed between Optuna's tell and MLflow's child run left a trial unlogged
        tracking.log_trial(name, record)
    sr = cfg.search
    remaining = sr.trials - done
    if remaining <= 0:
        return 0
    sampler_seed = tpe_seed(cfg.seed, steps, stored)
    bar = tqdm(total=sr.trials, initial=done, desc=f"T={steps}", disable=not cfg.progress, leave=True)

    def on_record(record: dict[str, Any]) -> None:
        tracking.log_trial(name, record)
        bar.update(1)

    from dsl.service.search_optuna import METRIC, StudySearcher

    searcher = StudySearcher(search_space(cfg), prepared.storage, name, sampler_seed,
                             min(sr.startup_trials, sr.trials), rungs[-1], steps, on_record)
    scheduler = (ASHAScheduler(time_attr="samples", max_t=rungs[-1], grace_period=rungs[0],
                               reduction_factor=sr.asha_reduction)
                 if len(rungs) > 1 else FIFOScheduler())
    judge = {"source": "", "none": "none"}.get(cfg.eval.judge, cfg.eval.judge)
    setup = TrialSetup(checkpoint=cfg.checkpoint, steps=steps, length=cfg.sampling.length, rungs=rungs, seed=cfg.seed,
                       mauve_seeds=tuple(cfg.eval.mauve_seeds), band=tuple(sr.rewrite_target),
                       penalty=sr.penalty, judge=judge, sampling=C.to_dict(cfg.sampling))
    trainable = tune.with_resources(tune.with_parameters(_trainable, setup=setup, pool=pool,
                                                         reference=reference), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=remaining, max_concurrent_trials=slots,
                                    # one trial process loads torch, the denoiser and the tokenizer once
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"{sr.study}-T{steps}-from{stored}",
                                  storage_path=str((Path(cfg.out) / "tune").resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        tuner.fit()
    finally:
        bar.close()
    return remaining


def _write_outputs(cfg: JobConfig, prepared: Prepared, out: Path, rungs: tuple[int, ...]) -> dict[str, Any]:
    band = tuple(cfg.search.rewrite_target)
    budgets = cfg.search.budgets
    records = []
    for steps in budgets:
        records.extend(study_records(prepared.storage, study_name(cfg, steps), steps))
    chosen = best_per_steps(records, band)
    summary: dict[str, Any] = {"study": cfg.search.study, "checkpoint": cfg.checkpoint, "band": list(band),
                               "rungs": list(rungs), "storage": prepared.storage_label,
                               "trials": {str(t): sum(r["steps"] == t for r in records) for t in budgets},
                               "chosen": {str(t): _public(r) for t, r in chosen.items()}}
    missing = [t for t in budgets if t not in chosen]
    if missing:
        summary["missing"] = missing
    if chosen:
        table_doc, rule_doc, fit = eta_cap_artifacts(chosen, cfg.sampling.length or prepared.denoiser.max_length)
        write_json_atomic(out / "eta_cap_table.json", table_doc)
        write_json_atomic(out / "eta_cap_rule.json", rule_doc)
        summary.update(table=table_doc["table"], rule=rule_doc["rule"], rule_fit=fit)
        plot_mauve_vs_rewrites(records, chosen, band, out / "mauve_vs_rewrites.png")
    write_json_atomic(out / "search_summary.json", dict(summary, records=[_public(r) for r in records]))
    summary["out"] = str(out)
    return summary


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe scalars; a non-finite metric (GenPPL of all-impossible samples) becomes null."""
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        elif isinstance(v, (int, float, str, bool)):
            out[k] = v
    return out


__all__ = ["run_search", "prepare"]
