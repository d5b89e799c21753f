"""The η_cap(T) search service: Ray Tune + Optuna (TPE) per step budget, resumable, logged to MLflow.

Sec 5.2 picks one scalar per step budget, η_cap(T), so that the mean rewrite count E[R_i] (eq. 25)
stays in a target band ([1, 2]) while MAUVE is as high as possible; the paper sets it by hand and
prints two tables (Sec 6.1 / eq. 24 vs Table 4). This module measures it instead:

- per T, a Ray Tune ``Tuner`` with an ``OptunaSearch`` (seeded TPE) proposes η_cap (log-uniform) and
  optionally t_on, t_off, α_on, top-p; each trial samples with ReMDM-loop (``dsl.sampling.generate``) and
  is scored by ONE shared ``MauvePool`` whose reference features are computed once;
- ASHA over the sample count stops weak settings early (single objective: Optuna multi-objective
  studies get no intermediate values and cannot be combined with ASHA, so the band enters as a penalty). ASHA-stopped trials would enter Optuna as
  COMPLETE with a low-fidelity value (ecosystem.md §2); here they are told as PRUNED (their MAUVE
  stays an intermediate value) with ``samples``/``full_fidelity`` user attrs, and only full-fidelity
  trials can be chosen;
- the study lives in an RDB under ``<study>:T=<T>`` (SQLite file by default, PostgreSQL on a cluster);
  re-running the same command continues it: finished trials count toward ``trials``, trials left
  RUNNING by a killed driver are marked FAIL (``interrupted``), and the TPE seed is derived from the
  number of trials already stored so a resumed search does not replay its start-up configurations;
- MLflow: one parent run per search (found again by tag on resume), one child run per finished trial,
  the table/rule JSON and the plot as artefacts.

Output (``out``): ``eta_cap_table.json`` ({"table": {...}}) and ``eta_cap_rule.json`` ({"rule":
{...}}; its R² is in the summary), both readable by ``jobs/sample.py eta_cap_table=<file>``;
``mauve_vs_rewrites.png``; ``search_summary.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsl import config as C
from dsl.atomic import write_json_atomic
from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError, one_line
from dsl.seeding import derive_seed
from dsl.service import lineage
from dsl.service.ray_session import ray_session
from dsl.service.search_results import (
    best_per_steps,
    eta_cap_artifacts,
    plot_mauve_vs_rewrites,
)
from dsl.service.search_trial import SEARCHABLE, TrialSetup, run_trial, rungs_for
from dsl.service.tracking import end_status

METRIC = "score"


# GenPPL judges a trial can use: the exact source of checkpoint=oracle:*, none, or a causal LM
SEARCH_JUDGE_KINDS = ("source", "none", "hf_dir", "hub")


def check_search(cfg: JobConfig, mode: str = "search") -> None:
    """The checks across sections a search needs (each section validates itself)."""
    sr, sp = cfg.search, cfg.sampling
    t_on = sr.t_on_range or (sp.t_on,) * 2
    t_off = sr.t_off_range or (sp.t_off,) * 2
    if max(t_off) >= min(t_on):
        off_key = "search.t_off_range" if sr.t_off_range else "sampling.t_off"
        on_key = "search.t_on_range" if sr.t_on_range else "sampling.t_on"
        raise ConfigError(f"{off_key}={_fmt(t_off[:len(sr.t_off_range) or 1])} overlaps {on_key}="
                          f"{_fmt(t_on[:len(sr.t_on_range) or 1])}: every t_off must be < every t_on")
    if sp.sampler not in ("dsl-budget", "remdm-loop"):
        raise ConfigError(f"sampling.sampler={sp.sampler}: the search always samples with "
                          f"remdm-loop (η = the trial's η_cap); leave sampling.sampler unset")
    if sr.min_samples > sp.num_samples:
        raise ConfigError(f"search.min_samples={sr.min_samples} > sampling.num_samples={sp.num_samples}")
    if cfg.eval.references < sp.num_samples:
        raise ConfigError(f"eval.references={cfg.eval.references} < sampling.num_samples={sp.num_samples}: MAUVE "
                          f"needs at least as many reference texts as samples")
    if cfg.eval.workers < 1:
        raise ConfigError("eval.workers=0: the search scores every trial on a pool of MAUVE actors; give "
                          "eval.workers >= 1")
    from dsl.model_spec import parse_model_spec

    parse_model_spec(cfg.eval.judge, "eval.judge", SEARCH_JUDGE_KINDS)


def _fmt(values: tuple) -> str:
    return ",".join(f"{v:g}" for v in values) or "''"


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """Optuna distributions: η_cap log-uniform (it spans decades), the optional windows uniform."""
    import optuna

    space: dict[str, Any] = {"eta_cap": optuna.distributions.FloatDistribution(*cfg.search.eta_cap_range, log=True)}
    for name in ("t_on", "t_off", "alpha_on", "top_p"):
        rng = getattr(cfg.search, f"{name}_range")
        if rng:
            space[name] = optuna.distributions.FloatDistribution(*rng)
    assert set(space) <= set(SEARCHABLE)
    return space


# ----------------------------------------------------------------------------------------------
# Study storage


def storage_url(cfg: JobConfig) -> str | None:
    """The RDB URL of the study, or None for an in-memory (storage-free) search."""
    db = cfg.search.study_db
    if db.strip().lower() in ("none", "memory"):
        return None
    if db:
        return db
    return f"sqlite:///{Path(cfg.out).resolve() / 'study.db'}"


def open_storage(url: str | None):
    """An ``optuna.storages.RDBStorage`` object (OptunaSearch asserts an object, not a URL string)."""
    import optuna

    from dsl.service.database_url import with_installed_driver

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(with_installed_driver(url, "search.study_db"), engine_kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure to open the URL is the user's to fix
        raise UserError(f"search.study_db={_redact(url)} cannot be opened ({type(exc).__name__}: "
                        f"{one_line(exc)[:200]}); expected sqlite:///<path> or "
                        f"postgresql://user@host:port/db, or search.study_db=none") from None


def _redact(url: str) -> str:
    """Hide the credentials of a DB URL before it reaches a message, a log or an MLflow param."""
    from dsl.redact import scrub

    return scrub(url)


def study_name(cfg: JobConfig, steps: int) -> str:
    return f"{cfg.search.study}:T={steps}"


def prepare_study(storage: Any, name: str) -> tuple[int, int]:
    """Load or create the study; fail trials a killed driver left RUNNING. Returns (done, stored)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        # One driver owns a study (all Optuna calls run in the Tune driver), so a RUNNING trial seen
        # at start-up belongs to a driver that died; its partial results are not trusted.
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
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


# ----------------------------------------------------------------------------------------------
# The searcher: OptunaSearch that records fidelity and tells ASHA-stopped trials as PRUNED


def _make_searcher(space: dict[str, Any], storage: Any, name: str, sampler_seed: int, startup: int,
                   full_samples: int, steps: int, on_record: Callable[[dict[str, Any]], None]):
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    class FidelityAwareOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return super().on_trial_complete(trial_id, result, error)
            ot_trial = self._ot_trials[trial_id]
            full = bool(result) and int(result.get("samples", 0)) >= full_samples
            if result and not error:
                for key, value in result.items():
                    if key in _RECORDED or key.startswith("diag_"):
                        ot_trial.set_user_attr(key, value)
                ot_trial.set_user_attr("full_fidelity", full)
            if result and not error and not full:
                # ASHA stopped it: PRUNED keeps its MAUVE as an intermediate value, not a final one.
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                state = "PRUNED"
            else:
                super().on_trial_complete(trial_id, result, error)
                state = "COMPLETE" if result and not error else "FAIL"
            if result and not error:
                rec = {k: v for k, v in result.items() if k in _RECORDED or k.startswith("diag_")}
                on_record({**rec, **ot_trial.params, "number": ot_trial.number, "steps": steps,
                           "full_fidelity": full, "state": state})

        def save(self, checkpoint_path: str) -> None:
            # The RDB study is the record a resumed search continues from; Tune's experiment
            # snapshot of the searcher (a pickle holding the driver's callbacks) is not used.
            return None

    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup)
    return FidelityAwareOptunaSearch(space=space, metric=METRIC, mode="max", sampler=sampler,
                                     study_name=name, storage=storage)


_RECORDED = {"score", "mauve", "mauve_std", "mean_rewrites", "band_distance", "genppl", "impossible", "entropy",
             "nfe", "samples"}


# ----------------------------------------------------------------------------------------------
# Resources


def trial_resources(cluster: dict[str, float], pool_cpus: float, cfg: JobConfig) -> tuple[dict, int]:
    """(resources per trial, max concurrent trials) from the cluster's totals.

    GPU clusters: one GPU per trial, as many trials as GPUs. CPU clusters: the CPUs the MAUVE actors do
    not hold, ``trial_cpus`` each; if fewer than ``trial_cpus`` are free a trial takes what is left,
    so a 2-CPU machine never waits for a CPU that no trial can ever get (no deadlock).
    """
    gpus = float(cluster.get("GPU", 0.0))
    free_cpus = float(cluster.get("CPU", 0.0)) - pool_cpus
    if gpus >= 1:
        res, slots = {"cpu": min(1.0, max(free_cpus / gpus, 0.01)), "gpu": 1}, int(gpus)
    else:
        if free_cpus <= 0.0:
            raise UserError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs and eval.workers="
                            f"{cfg.eval.workers} hold {pool_cpus:g}: no CPU is left for trials; lower "
                            f"eval.workers or add CPUs")
        per = min(float(cfg.search.trial_cpus), free_cpus)
        res, slots = {"cpu": per}, max(1, int(math.floor(free_cpus / per + 1e-9)))
    if cfg.search.max_concurrent:
        slots = min(slots, cfg.search.max_concurrent)
    return res, slots


# ----------------------------------------------------------------------------------------------
# MLflow


class _Tracking:
    """A parent run per search (found again by tag on resume) and a child run per finished trial."""

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


# ----------------------------------------------------------------------------------------------
# Preflight: every bad input is one line before any trial starts


@dataclass
class Prepared:
    denoiser: Any
    reference_texts: list[str]
    storage: Any
    storage_label: str


def _load_reference_texts(cfg: JobConfig, denoiser: Any) -> list[str]:
    ev = cfg.eval
    if ev.reference == "source":
        source = getattr(denoiser, "source", None)
        if source is None or not hasattr(source, "sample"):
            raise UserError(f"eval.reference=source needs an oracle checkpoint (oracle:hmm), not "
                            f"checkpoint={cfg.checkpoint!r}; give eval.reference=<file.txt|file.jsonl>")
        from dsl.seeding import sample_generator

        # a seed stream disjoint from the trials' sampling seeds
        ids = source.sample(ev.references, sample_generator(cfg.seed, "search-references"))
        return [source.decode(row) for row in ids]
    path = Path(ev.reference)
    if not path.is_file():
        raise UserError(f"eval.reference={ev.reference!r} is not a file; expected 'source', a .txt file (one "
                        f"text per line) or a .jsonl file with a 'text' field")
    from dsl.eval.mauve import read_records

    texts = [r["text"] for r in read_records(str(path)) if isinstance(r.get("text"), str) and r["text"].strip()]
    texts = texts[: ev.references]
    if len(texts) < 2:
        raise UserError(f"eval.reference={ev.reference!r} holds {len(texts)} non-empty texts; need at least 2")
    return texts


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
    return Prepared(denoiser, references, storage, "none" if url is None else _redact(url))


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
    tracking = _Tracking(cfg, prepared.storage_label, params if params is not None else C.flatten(cfg))
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
                       reference: Any, resources: dict, slots: int, tracking: _Tracking) -> int:
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
    # eq. (Sec 5.2) protocol is per T; the TPE seed moves with the study size so a resumed search
    # does not re-draw the start-up configurations it already evaluated (optuna#3255).
    sampler_seed = derive_seed(cfg.seed, "tpe", steps, stored) % (2**32)
    bar = tqdm(total=sr.trials, initial=done, desc=f"T={steps}", disable=not cfg.progress, leave=True)

    def on_record(record: dict[str, Any]) -> None:
        tracking.log_trial(name, record)
        bar.update(1)

    searcher = _make_searcher(search_space(cfg), prepared.storage, name, sampler_seed,
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


__all__ = ["check_search", "run_search", "prepare", "search_space", "trial_resources",
           "storage_url", "open_storage", "study_name", "prepare_study", "study_records"]
