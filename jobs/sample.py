"""Draw samples with any sampler and write them with their per-step diagnostics.

    python jobs/sample.py checkpoint=<run dir|checkpoint dir|s3://...|oracle:hmm|oracle:cyclic> \\
        sampler=<name> sampling.steps=<T> sampling.num_samples=<n> out=<file.jsonl> \\
        [sampling.length=L] [seed=S] [sampling.<key>=...] [data.<key>=... for oracles]
    python jobs/sample.py recover sampling.steps=10 out=fig3.png   # Fig 3: K=7 recovery by confidence remasking
    python jobs/sample.py sde-2d out=fig1b.png                      # Fig 1b: K=5 SDE localization paths

Writes one JSON line per sample to ``out`` (ids, text, seed, settings, NFE, mean rewrites), the per-step
diagnostics to ``<out stem>.diagnostics.jsonl`` next to it, optionally the trajectory (.npy) and the
Fig 2 panels (PNG), and prints a JSON summary as the last line. Files are written under temporary names
and renamed at the end: a failed run overwrites nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from dsl.atomic import atomic_paths
from dsl.cli import Job, Mode, Renamed, main, renamed
from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError
from dsl.service import lineage
from dsl.service.job_runs import current_run


def diagnostics_path(out: str) -> str:
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".diagnostics.jsonl"


def _check_out(path: str, key: str = "out", example: str = "samples.jsonl") -> str:
    if not path:
        raise ConfigError(f"{key}='' : give the output file, e.g. {key}=samples.jsonl")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{key}={path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{key}={path} is a directory; give a file path, e.g. {key}={os.path.join(path, example)}")
    return path


def check_sampling(job: JobConfig) -> None:
    """Before anything is loaded or recorded: a checkpoint is named and every output path can be written."""
    cfg = job.sampling
    if not job.checkpoint:
        raise ConfigError("checkpoint='' : give checkpoint=<run dir|checkpoint dir|s3://...|oracle:hmm|oracle:cyclic>")
    _check_out(job.out)
    _check_out(diagnostics_path(job.out), "out (its diagnostics file)")
    if cfg.trajectory:
        _check_out(cfg.trajectory, "sampling.trajectory", "trajectory.npy")
    if cfg.plot:
        _check_out(cfg.plot, "sampling.plot", "diagnostics.png")


def run_sampling(job: JobConfig) -> dict:
    from dsl.sampling import generate, load_denoiser
    from dsl.sampling.figures import plot_diagnostics

    cfg = job.sampling
    out = job.out  # checked by check_sampling (the mode's check) before the run is recorded
    denoiser = load_denoiser(job.checkpoint, cfg, length=cfg.length or None, data_cfg=job.data)
    length = cfg.length or denoiser.max_length
    if not length:
        raise ConfigError("sampling.length=0 but this denoiser has no length of its own: give sampling.length=<L>")
    if denoiser.max_length and length > denoiser.max_length:
        raise ConfigError(f"sampling.length={length} exceeds the denoiser's length {denoiser.max_length}")
    n = cfg.num_samples
    start = time.perf_counter()
    batch = generate(denoiser, cfg, n, length, job.seed, progress=job.progress,
                     first_index=cfg.first_index, keep_trajectory=bool(cfg.trajectory))
    wall = time.perf_counter() - start
    if batch.eta_cap_extrapolation:
        print(f"warning: {batch.eta_cap_extrapolation}", file=sys.stderr, flush=True)
    settings = batch.settings | {"checkpoint": job.checkpoint}
    run = current_run()
    if run is not None:  # how an evaluation of this file finds this run (and the training run behind it)
        settings |= {lineage.RECORD_RUN_ID: run.run_id, lineage.RECORD_RUN_NAME: run.run_name,
                     lineage.TRAINING_RUN_RECORD: run.tags.get(lineage.TRAINING_RUN)}

    def write_samples(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for i in range(n):
                fh.write(json.dumps({
                    "index": cfg.first_index + i, "ids": batch.ids[i].tolist(), "text": denoiser.decode(batch.ids[i]),
                    "seed": int(batch.seeds[i]), "nfe": int(batch.nfe[i]),
                    "mean_rewrites": float(batch.mean_rewrites[i]), "settings": settings}) + "\n")

    def write_diagnostics(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in batch.diagnostics_records():
                fh.write(json.dumps(rec) + "\n")

    def write_traj(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, batch.trajectory.numpy())

    diag = diagnostics_path(out)
    writers = [(out, write_samples), (diag, write_diagnostics)]
    if cfg.trajectory:
        writers.append((cfg.trajectory, write_traj))
    if cfg.plot:
        writers.append((cfg.plot, lambda tmp: plot_diagnostics(batch.diagnostics, f"{cfg.sampler} T={cfg.steps}", tmp)))
    # every file under a temporary name, then all renamed: a failure leaves no file touched
    with atomic_paths(*(final for final, _ in writers)) as temps:
        for tmp, (_, write) in zip(temps, writers):
            write(str(tmp))
    return {"n": n, "sampler": cfg.sampler, "resolved": batch.settings["resolved"]["rule"],
            "steps": cfg.steps, "length": length, "mean_nfe": float(batch.nfe.double().mean()),
            "mean_rewrites_per_token": float(batch.mean_rewrites.mean()), "rewrite_count": cfg.rewrite_count,
            "wall_time_s": round(wall, 3), "eta_cap": batch.eta_cap, "eta_cap_source": batch.eta_cap_source,
            "eta_cap_extrapolation": batch.eta_cap_extrapolation,
            "out": out, "diagnostics": diag, "trajectory": cfg.trajectory or None, "plot": cfg.plot or None}


def _png_out(job: JobConfig) -> str:
    out = _check_out(job.out, example="figure.png")
    if not out.endswith(".png"):
        raise ConfigError(f"out={out}: a toy writes a PNG; give out=<file>.png")
    return out


def run_recover(job: JobConfig) -> dict:
    from dsl.sampling.figures import recover_figure

    out = _png_out(job)
    return recover_figure(job.sampling.steps, job.sampling.num_samples, job.seed, out) | {"out": out}


def run_sde_2d(job: JobConfig) -> dict:
    from dsl.sampling.figures import sde_figure

    out = _png_out(job)
    s = job.sampling
    return sde_figure(s.steps, s.num_samples, job.seed, s.sde_gamma_end, s.sde_path, out) | {"out": out}


def _toy(raw: str) -> tuple[list[str], str | None]:
    if raw in ("recover", "sde-2d"):
        return [], raw
    if raw == "":
        return [], None
    raise ConfigError(f"toy={raw!r} is not one of: recover, sde-2d (now the first word: sample.py recover ...)")


def log_sampling(run, summary: dict) -> None:
    """The sample run's table fields, small artifacts and Table 6 curves (``Mode.after``)."""
    with open(summary["diagnostics"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    diagnostics = {k: [np.nan if r[k] is None else r[k] for r in records] for k in records[0] if k != "step"}
    run.set_tags({lineage.ETA_CAP_SOURCE: summary["eta_cap_source"]})
    run.log_metrics({lineage.NFE: summary["mean_nfe"], lineage.NUM_SAMPLES_METRIC: summary["n"],
                     lineage.REWRITES_PER_TOKEN: summary["mean_rewrites_per_token"],
                     **({lineage.ETA_CAP: summary["eta_cap"]} if summary["eta_cap"] is not None else {})}, step=0)
    run.log_sampling(diagnostics, samples=summary["out"], diagnostics_file=summary["diagnostics"],
                     figure=summary["plot"], title=run.run_name or "")


def _tags(job: JobConfig) -> dict[str, str]:
    s = job.sampling
    return {lineage.SAMPLER: s.sampler, lineage.STEPS: str(s.steps), lineage.NUM_SAMPLES: str(s.num_samples)}


def _run_name(job: JobConfig) -> str:
    return lineage.sample_run_name(job.checkpoint, job.sampling.sampler, job.sampling.steps)


RENAMED = {
    "n": renamed("sampling.num_samples"), "length": renamed("sampling.length"),
    "first_index": renamed("sampling.first_index"), "trajectory": renamed("sampling.trajectory"),
    "plot": renamed("sampling.plot"), "sampling.seed": renamed("seed"),
    "toy": Renamed("the first word: python jobs/sample.py recover|sde-2d ...", convert=_toy),
    **{k: renamed(f"sampling.{k}") for k in (
        "steps", "top_p", "eta", "t_on", "t_off", "alpha_on", "eps", "noise_removal", "cache", "gamma_vis",
        "sde_path", "sde_gamma_end", "batch_size", "rewrite_count", "diag_top_p")},
}

JOB = Job(
    script="jobs/sample.py", doc=__doc__,
    modes={"sample": Mode(run_sampling, "draw samples from checkpoint= (the default)", tracked=True,
                          check=check_sampling, tags=_tags, run_name=_run_name, after=log_sampling),
           "recover": Mode(run_recover, "Fig 3 toy: K=7 recovery by confidence remasking (out=<file>.png)"),
           "sde-2d": Mode(run_sde_2d, "Fig 1b toy: K=5 SDE localization paths (out=<file>.png)")},
    uses=("name", "experiment", "seed", "checkpoint", "out", "progress", "sampling", "data.hmm_states",
          "data.hmm_words", "data.hmm_seed", "data.cyclic_k", "service.mlflow", "service.tracking_uri"),
    defaults=("progress=false",),
    renamed=RENAMED,
)

if __name__ == "__main__":
    sys.exit(main(JOB))
