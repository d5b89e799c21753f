"""Draw samples with any sampler and write them with their per-step diagnostics.

    python jobs/sample.py checkpoint=<dir|s3://...|oracle:hmm|oracle:cyclic> sampler=<name> steps=<T> \\
        n=<count> out=<file.jsonl> [length=L] [seed=S] [top_p=P] [eta=E] [eta_cap_table=SPEC] \\
        [trajectory=<file.npy>] [progress=true] [sampling.<key>=...] [data.<key>=...]
    python jobs/sample.py toy=recover out=fig3.png      # Fig 3: K=7 recovery by confidence remasking
    python jobs/sample.py toy=sde-2d out=fig1b.png      # Fig 1b: K=5 SDE localization paths

Writes one JSON line per sample to ``out`` (ids, text, seed, settings, NFE, mean rewrites), the per-step
diagnostics to ``<out stem>.diagnostics.jsonl`` next to it, and prints a JSON summary as the last line.
Files are written under temporary names and renamed at the end: a failed run overwrites nothing.
Bad input prints ``error: <one line>`` and exits 2. ``python jobs/sample.py --help`` lists every key.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch

from dsl.config import ConfigError, DataConfig, SamplingConfig, choice, describe, load, num, text
from dsl.errors import UserError, run_cli


@dataclass
class SampleJob:
    checkpoint: str = text("", "checkpoint dir | s3:// URI | oracle:hmm | oracle:cyclic")
    n: int = num(16, 1, help="number of samples")
    out: str = text("", "JSON-lines output (or the PNG of a toy)")
    length: int = num(0, 0, help="sequence length L; 0 = the model's/source's own")
    first_index: int = num(0, 0, help="global index of the first sample (workers splitting one run)")
    trajectory: str = text("", "also save the draft after every step as a (T, n, L) .npy file")
    plot: str = text("", "also draw the per-step diagnostics (Fig 2 panels) to this PNG")
    progress: bool = field(default=False, metadata={"help": "tqdm progress bar over steps"})
    toy: Literal["", "recover", "sde-2d"] = choice("", "run a toy instead (Fig 3 recover, Fig 1b sde-2d)")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)


ALIASES = {f.name: f"sampling.{f.name}" for f in fields(SamplingConfig)}


def diagnostics_path(out: str) -> str:
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".diagnostics.jsonl"


def _check_out(path: str, key: str = "out") -> str:
    if not path:
        raise ConfigError(f"{key}='' : give the output file, e.g. {key}=samples.jsonl")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{key}={path}: directory {parent} does not exist")
    return path


def _commit_all(writers: list) -> None:
    """Write every file under a temporary name, then rename them all: a failure leaves no file touched."""
    written = []
    try:
        for final, write in writers:
            tmp = f"{final}.tmp-{os.getpid()}"
            written.append((final, tmp))
            write(tmp)
    except BaseException:
        for _, tmp in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for final, tmp in written:
        os.replace(tmp, final)


def run_sampling(job: SampleJob) -> dict:
    from dsl.sampling import generate, load_denoiser

    out = _check_out(job.out)
    if job.trajectory:
        _check_out(job.trajectory, "trajectory")
    if job.plot:
        _check_out(job.plot, "plot")
    cfg = job.sampling
    denoiser = load_denoiser(job.checkpoint, cfg, length=job.length or None, data_cfg=job.data)
    length = job.length or denoiser.max_length
    if not length:
        raise ConfigError("length=0 but this denoiser has no length of its own: give length=<L>")
    if denoiser.max_length and length > denoiser.max_length:
        raise ConfigError(f"length={length} exceeds the denoiser's length {denoiser.max_length}")
    start = time.perf_counter()
    batch = generate(denoiser, cfg, job.n, length, cfg.seed, progress=job.progress,
                     first_index=job.first_index, keep_trajectory=bool(job.trajectory))
    wall = time.perf_counter() - start
    settings = batch.settings | {"checkpoint": job.checkpoint}

    def write_samples(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for i in range(job.n):
                fh.write(json.dumps({
                    "index": job.first_index + i, "ids": batch.ids[i].tolist(), "text": denoiser.decode(batch.ids[i]),
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
    if job.trajectory:
        writers.append((job.trajectory, write_traj))
    if job.plot:
        writers.append((job.plot, lambda tmp: plot_diagnostics(batch.diagnostics, f"{cfg.sampler} T={cfg.steps}", tmp)))
    _commit_all(writers)
    return {"n": job.n, "sampler": cfg.sampler, "resolved": batch.settings["resolved"]["rule"],
            "steps": cfg.steps, "length": length, "mean_nfe": float(batch.nfe.double().mean()),
            "mean_rewrites_per_token": float(batch.mean_rewrites.mean()), "rewrite_count": cfg.rewrite_count,
            "wall_time_s": round(wall, 3), "eta_cap": batch.eta_cap, "eta_cap_source": batch.eta_cap_source,
            "out": out, "diagnostics": diag, "trajectory": job.trajectory or None, "plot": job.plot or None}


def plot_diagnostics(diagnostics: dict, title: str, path: str) -> None:
    """Fig 2's three panels against decoding progress 1 − t: masking/reveal, remasking, sharpness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = 1 - np.asarray(diagnostics["t"])
    panels = [("masking & reveal", ["masked_ratio", "reveal_fraction"]),
              ("remasking / rewrite rate", ["remask_intensity", "remask_ratio", "change_rate"]),
              ("posterior sharpness", ["mean_max_prob", "uncertainty"])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(progress, diagnostics[key], label=key, lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("decoding progress 1 − t")
        ax.legend(fontsize=7)
    axes[3].semilogy(progress, diagnostics["nucleus_size"], label="nucleus size k_t")
    axes[3].set_title("top-p nucleus size (log)", fontsize=10)
    axes[3].set_xlabel("decoding progress 1 − t")
    fig.suptitle(title)
    fig.tight_layout()
    with open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def run_toy(job: SampleJob) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = _check_out(job.out)
    if not out.endswith(".png"):
        raise ConfigError(f"out={out}: a toy writes a PNG; give out=<file>.png")
    if job.toy == "recover":
        from dsl.sampling.toys import FIG3_DRAFT, FIG3_TRUTH, parse_draft, recover_cyclic
        from dsl.sources import CyclicSource

        source = CyclicSource(7)
        draft = parse_draft(FIG3_DRAFT, source)
        runs = [recover_cyclic(source, draft, job.sampling.steps, torch.Generator().manual_seed(job.sampling.seed + i))
                for i in range(job.n)]
        rows = [FIG3_DRAFT] + runs[0].timeline
        fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(rows) + 1))
        for r, row in enumerate(rows):
            for c, ch in enumerate(row):
                ok = ch == FIG3_TRUTH[c]
                ax.text(c, r, ch, ha="center", va="center", family="monospace",
                        color="green" if ok else ("gray" if ch == "_" else "red"))
        ax.set_xlim(-0.5, 6.5)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_yticks(range(len(rows)), ["init"] + [f"step {k}" for k in range(len(rows) - 1)])
        ax.set_xticks(range(7), [str(i + 1) for i in range(7)])
        ax.set_title(f"confidence-driven remasking: {FIG3_DRAFT} → {runs[0].final}")
        summary = {"toy": "recover", "n": job.n, "steps": job.sampling.steps,
                   "valid_rate": sum(r.valid for r in runs) / job.n,
                   "truth_rate": sum(r.final == FIG3_TRUTH for r in runs) / job.n}
    else:
        from dsl.sampling.toys import sde_localization

        res = sde_localization(k=5, steps=job.sampling.steps, n=min(job.n, 4), seed=job.sampling.seed,
                               gamma_end=job.sampling.sde_gamma_end, path=job.sampling.sde_path)
        paths = res.mean_path.numpy()  # (T+1, n, L, 2): x̂(z) moves from the origin to a circle vertex
        fig, axes = plt.subplots(1, paths.shape[1], figsize=(3.2 * paths.shape[1], 3.4), squeeze=False)
        angles = np.linspace(0, 2 * np.pi, 200)
        for j, ax in enumerate(axes[0]):
            ax.plot(np.cos(angles), np.sin(angles), color="0.85", lw=1)
            for v in range(5):
                ax.text(1.15 * np.cos(2 * np.pi * v / 5), 1.15 * np.sin(2 * np.pi * v / 5), "ABCDE"[v],
                        ha="center", va="center")
            for i in range(paths.shape[2]):
                ax.plot(paths[:, j, i, 0], paths[:, j, i, 1], lw=1.2, label=f"token {i + 1}")
                ax.plot(*paths[-1, j, i], "o", ms=4)
            ax.set_aspect("equal")
            ax.set_xlim(-1.35, 1.35)
            ax.set_ylim(-1.35, 1.35)
            ax.set_title(f"sample {j}: " + "".join("ABCDE"[t] for t in res.ids[j].tolist()), fontsize=9)
        axes[0][0].legend(fontsize=6, loc="lower left")
        fig.suptitle(f"SDE (eq. 2), K=5, {job.sampling.sde_path} path: posterior mean x̂(z) paths")
        summary = {"toy": "sde-2d", "n": paths.shape[1], "steps": job.sampling.steps, "nfe": int(res.nfe[0])}
    fig.tight_layout()
    tmp = f"{out}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return summary | {"out": out}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(describe(SampleJob))
        return 0
    def body() -> dict:
        job = load(SampleJob, argv, aliases=ALIASES, presets={})
        if job.toy:
            return run_toy(job)
        if not job.checkpoint:
            raise ConfigError("checkpoint='' : give checkpoint=<dir|s3://...|oracle:hmm|oracle:cyclic>")
        from dsl.service.tracking import tracked_job  # one MLflow run per invocation, if tracking is on

        return tracked_job("sample", job, job.checkpoint, lambda: run_sampling(job))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
