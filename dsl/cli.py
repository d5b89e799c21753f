"""One command-line behaviour for every entry point: ``python <script> [MODE] [preset=NAME] key=value ...``.

An entry point declares a :class:`Job` and calls :func:`main`::

    JOB = Job(script="jobs/sample.py", doc=__doc__,
              modes={"sample": Mode(run_sampling, "draw samples", tracked=True)},
              uses=("name", "experiment", "seed", "checkpoint", "out", "sampling", "service.mlflow"))
    if __name__ == "__main__":
        sys.exit(main(JOB))

What every job then shares:
- ``-h``/``--help`` anywhere on the line prints the job's modes, the presets with their sizes, and every
  key the job reads with its type, range, default (the job's own) and aliases;
- an optional first word picks a sub-mode (the first declared mode is the default);
- keys are the dotted keys of :class:`dsl.config.JobConfig`; a key the job does not read is an error,
  not silently ignored; the short :data:`ALIASES` mean the same in every job;
- an old spelling in ``Job.renamed`` still works for one release and prints one ``warning:`` line
  naming the new key;
- bad input prints ``error: <one line>`` to stderr and exits 2 before anything is written; a run prints
  its JSON summary as the last stdout line (:func:`dsl.errors.run_cli`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from dsl.config import ConfigError, JobConfig, describe_presets, leaf_keys, run_presets
from dsl.config.parse import apply_overrides, describe, preset_overrides, resolve, set_key, split_override
from dsl.config.parse import unknown_key as _unknown_key
from dsl.errors import run_cli

# Short forms that cannot be misread: each names one key, the same in every job that reads it.
ALIASES: dict[str, str] = {
    "sampler": "sampling.sampler",
    "eta_cap_table": "sampling.eta_cap_table",
    "lr": "train.lr",
    "featurizer": "eval.featurizer",
    "reference": "eval.reference",
    "trials": "search.trials",
    "budgets": "search.budgets",
    "study": "search.study",
    "grid": "report.grid",
}

HELP_WORDS = ("-h", "--help")


@dataclass(frozen=True)
class Mode:
    """A sub-mode of a job: ``run(cfg) -> summary dict``."""

    run: Callable[[JobConfig], dict]
    help: str
    tracked: bool = False          # one MLflow run around it (when service.mlflow resolves to on)
    tags: Callable[[JobConfig], Mapping[str, str]] | None = None   # extra MLflow tags of that run
    after: Callable[[Any, dict], None] | None = None   # (run logger, summary): artifacts of a finished run
    check: Callable[[JobConfig], None] | None = None   # inputs the mode requires, checked before anything is written
    run_name: Callable[[JobConfig], str] | None = None   # the run's name when name= is not given
    defaults: tuple[str, ...] = ()   # the mode's own starting values, after the job's ("preset=..." allowed)


@dataclass(frozen=True)
class Renamed:
    """An old spelling kept for one release: ``key`` receives the value, or ``convert(raw)`` gives the
    new ``key=value`` words and/or the sub-mode the old word selected (``(words, mode or None)``)."""

    instead: str                                                    # shown in the warning
    key: str | None = None
    convert: Callable[[str], tuple[list[str], str | None]] | None = None

    def apply(self, raw: str) -> tuple[list[str], str | None]:
        if self.convert is not None:
            return self.convert(raw)
        return [f"{self.key}={raw}"], None


def renamed(key: str) -> Renamed:
    """The common case: the old spelling is a new key's old name, value unchanged."""
    return Renamed(instead=f"{key}=", key=key)


@dataclass(frozen=True)
class Job:
    """What an entry point is: its modes, the part of the config tree it reads, its own defaults."""

    script: str                                    # how users call it, e.g. "jobs/sample.py"
    doc: str                                       # usage examples (the module docstring)
    modes: dict[str, Mode]                         # the first one is the default
    uses: tuple[str, ...]                          # top-level keys, sections or dotted keys it reads
    ignores: tuple[str, ...] = ()                  # keys under ``uses`` it does not read
    defaults: tuple[str, ...] = ()                 # its own starting values, "key=value"
    renamed: Mapping[str, Renamed] = field(default_factory=dict)
    validate: Callable[[JobConfig, str], None] | None = None   # checks across keys, given the mode
    # fills values in knowing which dotted keys the command line named (a named protocol's settings go in
    # where the command line is silent, and a named key that contradicts them fails); runs before validate
    settle: Callable[[JobConfig, str, frozenset[str]], None] | None = None
    bare: str | None = None                        # the mode an empty command line runs
    tracks_by_default: bool = False                # service.mlflow=auto: on even without a store
    kind: str = ""                                 # its runs' dsl.kind (default: the script's name)
    presets: str = "run"                           # the folder of dsl/config/presets its preset= names

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.script))[0]

    def reads(self, key: str) -> bool:
        """Whether this job reads leaf ``key`` (a dotted key of JobConfig)."""
        def under(prefixes: tuple[str, ...]) -> bool:
            return any(key == p or key.startswith(p + ".") for p in prefixes)
        return under(self.uses) and not under(self.ignores)

    def keys(self) -> list[str]:
        return [k for k in leaf_keys(JobConfig()) if self.reads(k)]

    def default_config(self, mode: str | None = None) -> JobConfig:
        """The config before the command line: JobConfig's defaults, the job's, then the mode's."""
        cfg = JobConfig()
        for key, raw in (split_override(d) for d in self.defaults):
            set_key(cfg, key, raw)
        if mode is not None and self.modes[mode].defaults:
            apply_overrides(cfg, list(self.modes[mode].defaults), ALIASES, run_presets(self.presets),
                            keep=self.reads)
        return cfg


# ----------------------------------------------------------------------------------------------
# Parsing


def _warn(old: str, instead: str) -> None:
    print(f"warning: {old}= is deprecated and will be removed in the next release; use {instead}",
          file=sys.stderr, flush=True)


def _check_key(job: Job, key: str, own_keys: set[str]) -> None:
    """A key the job reads (or ``preset``/a section preset like ``model``), else one clear line."""
    if key == "preset" or key in own_keys:
        return
    try:
        owner, f = resolve(JobConfig(), key)
    except KeyError:
        raise _unknown_key(key, job.keys() + list(ALIASES) + list(job.renamed)) from None
    if is_dataclass(getattr(owner, f.name)) and any(k.startswith(key + ".") for k in job.keys()):
        return  # a section preset (model=small)
    raise ConfigError(f"{key} is not read by {job.script} (its keys: python {job.script} --help)")


def parse(job: Job, argv: list[str]) -> tuple[str, JobConfig]:
    """(mode, config) from a command line; every problem is one ConfigError line."""
    words = list(argv)
    mode: str | None = None
    if words and "=" not in words[0]:
        if words[0] not in job.modes:
            raise ConfigError(f"unknown mode {words[0]!r} of {job.script}: use one of "
                              f"{', '.join(job.modes)} as the first word, then key=value words")
        mode = words.pop(0)
    elif not words and job.bare:
        mode = job.bare
    overrides: list[str] = []
    own_keys = set(job.keys())
    for word in words:
        key, raw = split_override(word)
        if key in job.renamed and key not in own_keys:
            rule = job.renamed[key]
            _warn(key, rule.instead)
            new_words, new_mode = rule.apply(raw)
            if new_mode is not None:
                if mode is not None and mode != new_mode:
                    raise ConfigError(f"{key}={raw} selects mode {new_mode!r} but the command line names "
                                      f"mode {mode!r}")
                mode = new_mode
            overrides.extend(new_words)
        else:
            overrides.append(f"{key}={raw}")
    for word in overrides:
        key, raw = split_override(word)
        _check_key(job, ALIASES.get(key, key), own_keys)
        if key == "preset" and not any(job.reads(k) for k, _ in preset_overrides(raw, run_presets(job.presets))):
            raise ConfigError(f"preset={raw} sets nothing {job.script} reads (presets: "
                              f"{', '.join(run_presets(job.presets))}; python {job.script} --help)")
    mode = mode or next(iter(job.modes))
    cfg = job.default_config(mode)
    apply_overrides(cfg, overrides, ALIASES, run_presets(job.presets), keep=job.reads)
    if job.settle is not None:
        named = frozenset(ALIASES.get(k, k) for k, _ in map(split_override, overrides) if k != "preset")
        job.settle(cfg, mode, named)
    if job.validate is not None:
        job.validate(cfg, mode)
    return mode, cfg


def used_params(job: Job, cfg: JobConfig) -> dict[str, Any]:
    """``{"sampling.steps": 128, ...}``: the keys this job reads, as logged to MLflow."""
    out = {}
    for key in job.keys():
        owner, f = resolve(cfg, key)
        out[key] = getattr(owner, f.name)
    return out


def logged_params(job: Job, cfg: JobConfig) -> dict[str, Any]:
    """What a run logs as params: the keys this job reads, less those of a synthetic source it does not
    load (``data.hmm_seed`` of a job on a real checkpoint reads nothing) and the sampler settings the
    chosen sampler does not read (``sampling.eta`` of ``mdlm``)."""
    from dsl.sampling.rules import unread_sampling_fields
    from dsl.sources import unread_source_keys

    params = used_params(job, cfg)
    unread = unread_source_keys(params)
    if "sampling.sampler" in params:
        unread |= {f"sampling.{f}" for f in unread_sampling_fields(params["sampling.sampler"])}
    return {k: v for k, v in params.items() if k not in unread}


def changed_keys(job: Job, mode: str, cfg: JobConfig) -> set[str]:
    """The keys whose value differs from the job's and the mode's defaults (what the command line changed;
    a key set to its default value does not count)."""
    base = used_params(job, job.default_config(mode))
    return {k for k, v in used_params(job, cfg).items() if base[k] != v}


def run_mode(job: Job, mode: str, cfg: JobConfig) -> dict:
    m = job.modes[mode]
    if m.check is not None:
        m.check(cfg)
    if not m.tracked:
        return m.run(cfg)
    from dsl.service.job_runs import tracked_job
    from dsl.service.lineage import MODE
    from dsl.service.tracking import resolve_tracking_uri

    kind = job.kind or job.name
    tracking_uri = resolve_tracking_uri(cfg.service, default_on=job.tracks_by_default)
    if tracking_uri is None:
        return m.run(cfg)
    checkpoint = cfg.checkpoint.split(",")[0] or None if job.reads("checkpoint") else None
    if checkpoint and "=" in checkpoint.split("://")[0]:
        checkpoint = checkpoint.split("=", 1)[1]   # label=uri (calibration, likelihood)
    tags = {**({MODE: mode} if len(job.modes) > 1 else {}), **(m.tags(cfg) if m.tags else {})}
    run_name = cfg.name or (m.run_name(cfg) if m.run_name else f"{kind} {mode}" if mode != kind else kind)
    return tracked_job(kind, logged_params(job, cfg), checkpoint, lambda: m.run(cfg), tags=tags, after=m.after,
                       tracking_uri=tracking_uri, experiment=cfg.experiment, run_name=run_name)


# ----------------------------------------------------------------------------------------------
# Help


def help_text(job: Job) -> str:
    keys = job.keys()
    aliases: dict[str, list[str]] = {}
    for short, key in ALIASES.items():
        if job.reads(key):
            aliases.setdefault(key, []).append(short)
    default = next(iter(job.modes))
    parts = [job.doc.strip(), "",
             f"usage: python {job.script} [MODE] key=value ...   (-h/--help anywhere: this text)",
             "modes (the first word; default " + default + (f", {job.bare} when run without arguments"
                                                             if job.bare else "") + "):"]
    parts += [f"  {name:<12} {m.help}" for name, m in job.modes.items()]
    presets = run_presets(job.presets)
    if any(job.reads(k) for name in presets for k, _ in preset_overrides(name, presets)):
        parts += ["", describe_presets(job.presets)]
    parts += ["", f"keys (type, range, this job's default{' in mode ' + default if len(job.modes) > 1 else ''}):",
              describe(job.default_config(default), keys, aliases)]
    shown = {s: k for s, k in ALIASES.items() if job.reads(k)}
    if shown:
        parts += ["", "aliases: " + ", ".join(f"{s}= → {k}=" for s, k in shown.items())]
    if job.renamed:
        parts += ["", "old spellings (still accepted with a warning until the next release):"]
        parts += [f"  {old}= → {rule.instead}" for old, rule in job.renamed.items()]
    parts += ["", "booleans: true/false (also yes/no, on/off, 1/0). Bad input: 'error: <one line>' on stderr, "
                  "exit 2, nothing written. The last stdout line of a run is its JSON summary."]
    return "\n".join(parts)


def load_job(script: str) -> Job:
    """The ``JOB`` an entry-point script declares, by its path in the repository (``"jobs/sample.py"``);
    the scripts are not a package, so tests and benchmarks reach their declarations this way."""
    import importlib.util
    from pathlib import Path

    name = "dsl_job_" + "".join(c if c.isalnum() else "_" for c in script)
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / script
        if not path.is_file():
            raise FileNotFoundError(path)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name].JOB


def main(job: Job, argv: list[str] | None = None) -> int:
    """Parse ``argv`` for ``job`` and run the chosen mode: 0 and a JSON summary, or 2 and one error line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_WORDS for a in argv):
        print(help_text(job))
        return 0
    return run_cli(lambda: run_mode(job, *parse(job, argv)))


__all__ = ["ALIASES", "Job", "Mode", "Renamed", "renamed", "parse", "main", "help_text", "used_params",
           "logged_params", "changed_keys", "run_mode", "load_job"]
