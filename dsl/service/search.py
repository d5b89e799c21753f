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

Output (``out_dir``): ``eta_cap_table.json`` ({"table": {...}}) and ``eta_cap_rule.json`` ({"rule":
{...}}; its R² is in the summary), both readable by ``jobs/sample.py eta_cap_table=<file>``;
``mauve_vs_rewrites.png``; ``search_summary.json``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsl import config as C
from dsl.config import ConfigError, SamplingConfig, num, section, text
from dsl.errors import UserError
from dsl.seeding import derive_seed
from dsl.service.search_results import (
    best_per_steps,
    eta_cap_artifacts,
    plot_mauve_vs_rewrites,
    write_json_atomic,
)
from dsl.service.search_trial import SEARCHABLE, TrialSetup, run_trial, rungs_for

METRIC = "score"
MAUVE_SEED0 = 25   # dsl.eval.mauve.DEFAULT_SEEDS = 25, 26, 27 (mauve-text's default seed is 25)
MAX_STEPS = 1 << 20


@dataclass
class SearchConfig:
    """``python tune/eta_cap_search.py key=value ...``; the defaults are the offline embedded search."""

    checkpoint: str = text("oracle:hmm", "oracle:hmm | oracle:cyclic | checkpoint dir | s3://... URI")
    steps: tuple[int, ...] = field(default=(16, 32), metadata={
        "help": "step budgets T, comma-separated (paper: 128,256,512,1024 at L=1024)"})
    length: int = num(32, 1, help="sequence length L of the samples")
    trials: int = num(6, 1, help="finished trials per T (a resumed search counts the stored ones)")
    samples: int = num(32, 2, help="samples per trial at full fidelity")
    min_samples: int = num(8, 2, help="samples at ASHA's first rung (= samples: no early stopping)")
    asha_reduction: int = num(2, 2, help="ASHA reduction factor (rungs min_samples·r^k)")
    asha: bool = field(default=True, metadata={"help": "stop weak trials early with ASHA over samples"})
    eta: tuple[float, ...] = field(default=(1e-3, 0.5), metadata={
        "help": "η_cap range lo,hi searched log-uniformly (both > 0)"})
    t_on: tuple[float, ...] = field(default=(), metadata={"help": "optional t_on range lo,hi in (0,1]"})
    t_off: tuple[float, ...] = field(default=(), metadata={"help": "optional t_off range lo,hi in [0,1)"})
    alpha_on: tuple[float, ...] = field(default=(), metadata={"help": "optional α_on range lo,hi in (0,1)"})
    top_p: tuple[float, ...] = field(default=(), metadata={"help": "optional top-p range lo,hi in (0,1]"})
    rewrite_target: tuple[float, ...] = field(default=(1.0, 2.0), metadata={
        "help": "band lo,hi for the mean rewrite count E[R_i] (Sec 5.2: 1,2)"})
    penalty: float = num(1.0, 0.0, help="score = MAUVE − penalty·distance of E[R_i] outside the band")
    storage: str = text("", "Optuna RDB URL: '' = sqlite:///<out_dir>/study.db | postgresql://... | "
                            "none (in memory, nothing kept)")
    study: str = text("eta-cap", "study name; one Optuna study per T named <study>:T=<T>")
    seed: int = num(0, 0)
    startup_trials: int = num(4, 1, help="random start-up trials of TPE before it models")
    mauve_workers: int = num(1, 1, help="MAUVE featurizer/scorer actors shared by all trials")
    mauve_seeds: int = num(3, 1, help="k-means seeds MAUVE is averaged over")
    featurizer: str = text("minilm", "MAUVE featurizer: minilm (offline) | gpt2-large | local HF dir")
    max_length: int = num(128, 1, help="featurizer truncation in tokens")
    reference: str = text("source", "reference texts: 'source' (sampled from the oracle's source) or a "
                                    ".txt (one text per line) / .jsonl file")
    references: int = num(64, 2, help="reference texts used for MAUVE")
    judge: str = text("", "GenPPL judge: '' = the exact source likelihood (oracle checkpoints; NaN otherwise) "
                          "| a local/hub causal LM (e.g. gpt2-large)")
    max_concurrent: int = num(0, 0, help="concurrent trials; 0 = derived from the cluster's resources")
    trial_cpus: float = num(1.0, 0.0, lo_open=True, help="CPUs per trial (GPU clusters: 1 GPU per trial)")
    ray_address: str = text("", "Ray cluster address; '' = start a private local cluster for this run")
    ray_cpus: int = num(0, 0, help="logical CPUs of the private local cluster; 0 = os.cpu_count()")
    out_dir: str = text("runs/eta_cap_search", "where the study DB, JSON, plot and Tune files go")
    mlflow_experiment: str = text("eta-cap-search")
    tracking_uri: str = text("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db "
                                 "(as every job); none = off")
    progress: bool = field(default=True, metadata={"help": "tqdm bar over finished trials"})
    sampling: SamplingConfig = section(SamplingConfig)

    def validate(self) -> None:
        if not self.steps:
            raise ConfigError("steps= is empty: give step budgets T > 0, e.g. steps=128,256")
        bad = [t for t in self.steps if t <= 0 or t > MAX_STEPS]
        if bad:
            raise ConfigError(f"steps={','.join(map(str, self.steps))}: every T must be in [1, {MAX_STEPS}]")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"steps={','.join(map(str, self.steps))} repeats a budget")
        _check_range("eta", self.eta, lo=0.0, hi=None, lo_open=True, required=True)
        _check_range("t_on", self.t_on, lo=0.0, hi=1.0, lo_open=True)
        _check_range("t_off", self.t_off, lo=0.0, hi=1.0, hi_open=True)
        _check_range("alpha_on", self.alpha_on, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        _check_range("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        if len(self.rewrite_target) != 2:
            raise ConfigError(f"rewrite_target={_fmt(self.rewrite_target)}: expected two numbers lo,hi "
                              f"(e.g. rewrite_target=1,2)")
        lo, hi = self.rewrite_target
        if lo < 0 or lo > hi:
            raise ConfigError(f"rewrite_target={_fmt(self.rewrite_target)}: need 0 <= lo <= hi (e.g. 1,2)")
        t_on = self.t_on or (self.sampling.t_on,) * 2
        t_off = self.t_off or (self.sampling.t_off,) * 2
        if max(t_off) >= min(t_on):
            raise ConfigError(f"t_off={_fmt(t_off[:len(self.t_off) or 1])} overlaps t_on="
                              f"{_fmt(t_on[:len(self.t_on) or 1])}: every t_off must be < every t_on")
        if self.sampling.sampler not in ("dsl-budget", "remdm-loop"):
            raise ConfigError(f"sampling.sampler={self.sampling.sampler}: the search always samples with "
                              f"remdm-loop (η = the trial's η_cap); leave sampling.sampler unset")
        if not self.study.strip():
            raise ConfigError("study= is empty: name the study (re-using a name continues that search)")
        if self.min_samples > self.samples:
            raise ConfigError(f"min_samples={self.min_samples} > samples={self.samples}")
        if self.references < self.samples:
            raise ConfigError(f"references={self.references} < samples={self.samples}: MAUVE needs at least as "
                              f"many reference texts as samples")


def _fmt(values: tuple) -> str:
    return ",".join(f"{v:g}" for v in values) or "''"


def _check_range(key: str, rng: tuple[float, ...], *, lo: float, hi: float | None, lo_open: bool = False,
                 hi_open: bool = False, required: bool = False) -> None:
    if not rng and not required:
        return
    if len(rng) != 2:
        raise ConfigError(f"{key}={_fmt(rng)}: expected a range lo,hi (two numbers, lo < hi)")
    a, b = rng
    if not a < b:
        raise ConfigError(f"{key}={_fmt(rng)}: empty or inverted range; expected lo < hi")
    below = a < lo or (lo_open and a == lo)
    above = hi is not None and (b > hi or (hi_open and b == hi))
    if below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{key}={_fmt(rng)}: both ends must lie in {left}{lo:g}, "
                          f"{'inf' if hi is None else f'{hi:g}'}{right}")


def load_search_config(argv: list[str]) -> SearchConfig:
    """Parse ``key=value`` arguments (``sampling.<field>=...`` sets the fixed ReMDM-loop settings)."""
    return C.load(SearchConfig, argv, presets={})


def search_space(cfg: SearchConfig) -> dict[str, Any]:
    """Optuna distributions: η_cap log-uniform (it spans decades), the optional windows uniform."""
    import optuna

    space: dict[str, Any] = {"eta_cap": optuna.distributions.FloatDistribution(*cfg.eta, log=True)}
    for name in ("t_on", "t_off", "alpha_on", "top_p"):
        rng = getattr(cfg, name)
        if rng:
            space[name] = optuna.distributions.FloatDistribution(*rng)
    assert set(space) <= set(SEARCHABLE)
    return space


# ----------------------------------------------------------------------------------------------
# Study storage


def storage_url(cfg: SearchConfig) -> str | None:
    """The RDB URL of the study, or None for an in-memory (storage-free) search."""
    if cfg.storage.strip().lower() in ("none", "memory"):
        return None
    if cfg.storage:
        return cfg.storage
    return f"sqlite:///{Path(cfg.out_dir).resolve() / 'study.db'}"


def open_storage(url: str | None):
    """An ``optuna.storages.RDBStorage`` object (OptunaSearch asserts an object, not a URL string)."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(_with_installed_driver(url), engine_kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure to open the URL is the user's to fix
        raise UserError(f"storage={_redact(url)} cannot be opened ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); expected sqlite:///<path> or "
                        f"postgresql://user@host:port/db, or storage=none") from None


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; use psycopg2 when only it is installed."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                return "postgresql+psycopg2://" + url[len(bare):]
    return url


def _redact(url: str) -> str:
    """Hide the credentials of a DB URL before it reaches a message, a log or an MLflow param."""
    from dsl.service.tracking import scrub

    return scrub(url)


def study_name(cfg: SearchConfig, steps: int) -> str:
    return f"{cfg.study}:T={steps}"


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


def trial_resources(cluster: dict[str, float], pool_cpus: float, cfg: SearchConfig) -> tuple[dict, int]:
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
            raise UserError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs and mauve_workers="
                            f"{cfg.mauve_workers} hold {pool_cpus:g}: no CPU is left for trials; lower "
                            f"mauve_workers or add CPUs")
        per = min(float(cfg.trial_cpus), free_cpus)
        res, slots = {"cpu": per}, max(1, int(math.floor(free_cpus / per + 1e-9)))
    if cfg.max_concurrent:
        slots = min(slots, cfg.max_concurrent)
    return res, slots


# ----------------------------------------------------------------------------------------------
# MLflow


class _Tracking:
    """A parent run per search (found again by tag on resume) and a child run per finished trial."""

    def __init__(self, cfg: SearchConfig, storage_label: str):
        self.enabled = cfg.tracking_uri.strip().lower() != "none"
        self.parent_id: str | None = None
        if not self.enabled:
            return
        import mlflow

        from dsl.service.tracking import default_tracking_uri, experiment_id

        self.client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri or default_tracking_uri())
        self.exp_id = experiment_id(self.client, cfg.mlflow_experiment)
        self.search_key = f"{storage_label}|{cfg.study}"
        found = self.client.search_runs([self.exp_id], filter_string=f"tags.`dsl.search` = '{self.search_key}'",
                                        max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            self.logged = {r.data.tags.get("dsl.trial") for r in self.client.search_runs(
                [self.exp_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000)}
        else:
            run = self.client.create_run(self.exp_id, run_name=f"search:{cfg.study}",
                                         tags={"dsl.search": self.search_key})
            self.parent_id = run.info.run_id
            self.logged = set()
            from dsl.service.tracking import flat_params

            for k, v in flat_params(cfg).items():    # scrubbed: no password of a storage URL
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


def _load_reference_texts(cfg: SearchConfig, denoiser: Any) -> list[str]:
    import json

    if cfg.reference == "source":
        source = getattr(denoiser, "source", None)
        if source is None or not hasattr(source, "sample"):
            raise UserError(f"reference=source needs an oracle checkpoint (oracle:hmm), not "
                            f"checkpoint={cfg.checkpoint!r}; give reference=<file.txt|file.jsonl>")
        from dsl.seeding import sample_generator

        # a seed stream disjoint from the trials' sampling seeds
        ids = source.sample(cfg.references, sample_generator(cfg.seed, "search-references"))
        return [source.decode(row) for row in ids]
    path = Path(cfg.reference)
    if not path.is_file():
        raise UserError(f"reference={cfg.reference!r} is not a file; expected 'source', a .txt file (one "
                        f"text per line) or a .jsonl file with a 'text' field")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    texts = [json.loads(ln).get("text", "") for ln in lines] if path.suffix == ".jsonl" else lines
    texts = [t for t in texts if t.strip()][: cfg.references]
    if len(texts) < 2:
        raise UserError(f"reference={cfg.reference!r} holds {len(texts)} non-empty texts; need at least 2")
    return texts


def prepare(cfg: SearchConfig) -> Prepared:
    """Open the checkpoint, the references and the study storage; raise one line on bad input."""
    from dsl.sampling import load_denoiser

    try:
        denoiser = load_denoiser(cfg.checkpoint, cfg.sampling, length=cfg.length)
    except (UserError, ConfigError):
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is bad input
        raise UserError(f"checkpoint={cfg.checkpoint!r} cannot be loaded ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}); expected oracle:hmm, oracle:cyclic, a "
                        f"checkpoint directory or an s3:// URI") from None
    references = _load_reference_texts(cfg, denoiser)
    url = storage_url(cfg)
    storage = open_storage(url)
    for steps in cfg.steps:
        prepare_study(storage, study_name(cfg, steps))
    return Prepared(denoiser, references, storage, "none" if url is None else _redact(url))


# ----------------------------------------------------------------------------------------------
# Ray


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


class _RayContext:
    """Connect to ``ray_address``, or start a private single-node Ray on loopback for this run only.

    The private one is ``ray.init`` with an explicit temp dir and 127.0.0.1 (it picks a free GCS
    port, never 6379); ``ray.shutdown`` stops exactly the processes it started.
    """

    def __init__(self, cfg: SearchConfig):
        self.cfg = cfg
        self.temp: str | None = None

    def __enter__(self):
        import ray

        address = self.cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
        try:
            if address:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            else:
                # single-machine Ray otherwise advertises the host's network address, not loopback
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                self._start_private()
        except Exception as exc:  # noqa: BLE001 - an unreachable cluster is bad input
            self.__exit__(None, None, None)
            raise UserError(f"ray_address={address or '(local)'}: cannot start or connect to Ray "
                            f"({' '.join(str(exc).split())[:200]})") from None
        return self

    def _start_private(self, attempts: int = 2) -> None:
        import ray

        for attempt in range(attempts):
            self.temp = tempfile.mkdtemp(prefix="ray-search-")
            try:
                ray.init(num_cpus=self.cfg.ray_cpus or os.cpu_count() or 1, include_dashboard=False,
                         _node_ip_address="127.0.0.1", _temp_dir=self.temp, logging_level="WARNING",
                         log_to_driver=False)
                return
            except Exception:  # noqa: BLE001 - GCS start-up can time out on a loaded machine: retry once
                self.__exit__(None, None, None)
                if attempt == attempts - 1:
                    raise

    def __exit__(self, *exc: Any) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None


# ----------------------------------------------------------------------------------------------
# The search


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Run (or continue) the search for every T; write the JSON artefacts and the plot; return a summary."""
    from dsl.service.mauve_pool import MauvePool

    out = Path(cfg.out_dir)
    prepared = prepare(cfg)     # every bad input fails here, before Ray or any trial starts
    tracking = _Tracking(cfg, prepared.storage_label)
    rungs = rungs_for(cfg.samples, cfg.min_samples, cfg.asha_reduction) if cfg.asha else (cfg.samples,)
    status = "FAILED"
    try:
        with _RayContext(cfg):
            import ray

            pool = MauvePool(cfg.featurizer, cfg.mauve_workers, cfg.max_length)
            reference = pool.featurize(prepared.reference_texts)   # reference features: computed once
            resources, slots = trial_resources(ray.cluster_resources(), _pool_cpus(pool, cfg), cfg)
            started = time.perf_counter()
            ran = sum(_search_one_budget(cfg, steps, rungs, prepared, pool, reference, resources, slots, tracking)
                      for steps in cfg.steps)
            trial_seconds = time.perf_counter() - started
            _shutdown_pool(pool)
        summary = _write_outputs(cfg, prepared, out, rungs)
        summary.update(trials_run=ran, trial_seconds=round(trial_seconds, 3), concurrent_trials=slots,
                       trial_resources=resources)
        status = "FINISHED"
        tracking.finish(summary, [out / "eta_cap_table.json", out / "eta_cap_rule.json",
                                  out / "mauve_vs_rewrites.png", out / "search_summary.json"], status)
        return summary
    finally:
        if status != "FINISHED":
            tracking.finish({}, [], "KILLED")


def _pool_cpus(pool: Any, cfg: SearchConfig) -> float:
    per = getattr(pool, "cpus_per_worker", None)
    return float(per if per is not None else 1.0) * cfg.mauve_workers


def _shutdown_pool(pool: Any) -> None:
    for name in ("shutdown", "close"):
        if hasattr(pool, name):
            getattr(pool, name)()
            return


def _search_one_budget(cfg: SearchConfig, steps: int, rungs: tuple[int, ...], prepared: Prepared, pool: Any,
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
    remaining = cfg.trials - done
    if remaining <= 0:
        return 0
    # eq. (Sec 5.2) protocol is per T; the TPE seed moves with the study size so a resumed search
    # does not re-draw the start-up configurations it already evaluated (optuna#3255).
    sampler_seed = derive_seed(cfg.seed, "tpe", steps, stored) % (2**32)
    bar = tqdm(total=cfg.trials, initial=done, desc=f"T={steps}", disable=not cfg.progress, leave=True)

    def on_record(record: dict[str, Any]) -> None:
        tracking.log_trial(name, record)
        bar.update(1)

    searcher = _make_searcher(search_space(cfg), prepared.storage, name, sampler_seed,
                              min(cfg.startup_trials, cfg.trials), rungs[-1], steps, on_record)
    scheduler = (ASHAScheduler(time_attr="samples", max_t=rungs[-1], grace_period=rungs[0],
                               reduction_factor=cfg.asha_reduction)
                 if len(rungs) > 1 else FIFOScheduler())
    setup = TrialSetup(checkpoint=cfg.checkpoint, steps=steps, length=cfg.length, rungs=rungs, seed=cfg.seed,
                       mauve_seeds=tuple(MAUVE_SEED0 + i for i in range(cfg.mauve_seeds)), band=tuple(cfg.rewrite_target),
                       penalty=cfg.penalty, judge=cfg.judge, sampling=C.to_dict(cfg.sampling))
    trainable = tune.with_resources(tune.with_parameters(_trainable, setup=setup, pool=pool,
                                                         reference=reference), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=remaining, max_concurrent_trials=slots,
                                    # one trial process loads torch, the denoiser and the tokenizer once
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"{cfg.study}-T{steps}-from{stored}",
                                  storage_path=str((Path(cfg.out_dir) / "tune").resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        tuner.fit()
    finally:
        bar.close()
    return remaining


def _write_outputs(cfg: SearchConfig, prepared: Prepared, out: Path, rungs: tuple[int, ...]) -> dict[str, Any]:
    band = tuple(cfg.rewrite_target)
    records = []
    for steps in cfg.steps:
        records.extend(study_records(prepared.storage, study_name(cfg, steps), steps))
    chosen = best_per_steps(records, band)
    summary: dict[str, Any] = {"study": cfg.study, "checkpoint": cfg.checkpoint, "band": list(band),
                               "rungs": list(rungs), "storage": prepared.storage_label,
                               "trials": {str(t): sum(r["steps"] == t for r in records) for t in cfg.steps},
                               "chosen": {str(t): _public(r) for t, r in chosen.items()}}
    missing = [t for t in cfg.steps if t not in chosen]
    if missing:
        summary["missing"] = missing
    if chosen:
        table_doc, rule_doc, fit = eta_cap_artifacts(chosen)
        write_json_atomic(out / "eta_cap_table.json", table_doc)
        write_json_atomic(out / "eta_cap_rule.json", rule_doc)
        summary.update(table=table_doc["table"], rule=rule_doc["rule"], rule_fit=fit)
        plot_mauve_vs_rewrites(records, chosen, band, out / "mauve_vs_rewrites.png")
    write_json_atomic(out / "search_summary.json", dict(summary, records=[_public(r) for r in records]))
    summary["out_dir"] = str(out)
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


__all__ = ["SearchConfig", "load_search_config", "run_search", "prepare", "search_space", "trial_resources",
           "storage_url", "open_storage", "study_name", "prepare_study", "study_records"]
