"""Numerical checks of the paper's identities against exactly solvable sources.

    python -m dsl.verify path-integral source=hmm n=64 seed=0
    python -m dsl.verify path-integral source=cyclic n=64 seed=0 [n_mc=128 length=32 dim=64 t_end=5 ...]

``path-integral`` draws ``n`` sequences from the source, estimates each -log P(x) with the SNR path
integral (eq. 3, ``dsl.objectives.path_integral_nll``) using the source's exact DSL denoiser
x̂(z) = E[x | z], and compares with the exact -log P(x). The last stdout line is JSON:
``{"exact_nll", "estimate_nll", "stderr", "z_score", "source", "n", ...}`` (nats per sequence, means
over the n sequences; ``stderr`` is the standard error of ``estimate_nll``). ``help`` lists the keys.

``smoothing=ε`` replaces the exact denoiser by its posterior mixed with ε of uniform
(``dsl.sources.SmoothedPosterior``), which like a learned model is never exactly one-hot: the default
contour is then eq. 4's, to t* = γ_max with the factorised end term (``t_end=inf allow_eq3=true`` shows
eq. 3 diverging), and on the cyclic toy with circle embeddings ``exact_bound`` is that bound computed by
quadrature (``CyclicSource.circle_bound``), which ``z_score`` is then measured against.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from dsl import config as C
from dsl.channel import spherical_embeddings
from dsl.config import ConfigError, DataConfig
from dsl.errors import UserError, one_line
from dsl.eval.likelihood import resolve_t_end
from dsl.objectives import nll_to_bits, path_integral_nll
from dsl.seeding import sample_generator
from dsl.sources import SmoothedPosterior, build_source

COMMANDS = ("path-integral",)


@dataclass
class VerifyConfig:
    """Keys of ``python -m dsl.verify path-integral``."""

    source: Literal["hmm", "cyclic"] = C.choice("hmm", "exactly solvable source")
    n: int = C.num(64, 1, help="sequences drawn from the source")
    seed: int = C.num(0, 0, help="seeds the sequences, the embeddings and the Monte Carlo draws")
    n_mc: int = C.num(128, 2, help="Monte Carlo draws of the SNR t per sequence")
    length: int = C.num(0, 0, help="sequence length; 0 = the source's default (hmm 32, cyclic K as in App B)")
    embedding: Literal["auto", "spherical", "circle"] = C.choice(
        "auto", "auto: circle for cyclic K<=7 (App B), spherical otherwise")
    dim: int = C.num(64, 2, help="d of spherical embeddings (App C.1: 64)")
    log_t_loc: float | None = C.num(None, help="proposal location of log t; none = per source "
                                                  "(hmm 1.5, cyclic 0)")
    log_t_scale: float = C.num(1.0, 1.0, help="proposal scale of log t (>= 1 keeps weights bounded)")
    t_end: str = C.text("auto", "auto: inf for the exact denoiser, gamma_max when smoothed | gamma_max | t* | "
                                "inf (eq. 3); a finite t* is eq. 10 with the end term -E log P(x|z_t*) (exact, "
                                "or factorised when smoothed: eq. 4's bound)")
    smoothing: float = C.num(0.0, 0.0, 1.0, hi_open=True,
                             help="mix the exact posterior with this much uniform: a learned-model stand-in")
    gamma_max: float = C.num(50.0, 0.0, lo_open=True, help="t_end=gamma_max: the channel's γ_max (App C.1: 50)")
    allow_eq3: bool = field(default=False, metadata={"help": "allow t_end=inf with smoothing > 0 (diverges)"})
    hmm_states: int = C.num(DataConfig.hmm_states, 2, help="hidden states of the HMM language")
    hmm_words: int = C.num(DataConfig.hmm_words, 4, help="word vocabulary of the HMM language")
    hmm_seed: int = C.num(DataConfig.hmm_seed, 0, help="seed that fixes the HMM's parameters")
    cyclic_k: int = C.num(DataConfig.cyclic_k, 2, 26, help="K of the cyclic toy (App B)")

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.source, hmm_states=self.hmm_states, hmm_words=self.hmm_words,
                          hmm_seed=self.hmm_seed, cyclic_k=self.cyclic_k)


ALIASES = {"states": "hmm_states", "words": "hmm_words", "k": "cyclic_k"}
_DEFAULT_LOC = {"hmm": 1.5, "cyclic": 0.0}
_DEFAULT_HMM_LENGTH = 32


def path_integral(cfg: VerifyConfig, progress: bool = True) -> dict:
    """Exact vs path-integral -log P(x) on ``cfg.n`` sequences of ``cfg.source`` (see module doc)."""
    length = cfg.length or (_DEFAULT_HMM_LENGTH if cfg.source == "hmm" else cfg.cyclic_k)
    source = build_source(cfg.source, cfg.data_config(), length)
    use_circle = cfg.embedding == "circle" or (cfg.embedding == "auto" and cfg.source == "cyclic"
                                               and cfg.cyclic_k <= 7)
    if use_circle:
        if cfg.source != "cyclic" or cfg.cyclic_k > 7:
            raise ConfigError("embedding=circle needs source=cyclic with k <= 7 (App B); use spherical")
        emb = source.circle_embeddings(torch.float64)
    else:
        emb = spherical_embeddings(source.vocab_size, cfg.dim, source.mask_id,
                                   sample_generator(cfg.seed, "verify", "embeddings"), dtype=torch.float64)
    emb = emb.to(torch.float64)
    ids = source.sample(cfg.n, sample_generator(cfg.seed, "verify", "sequences"))  # (n, L)
    exact = -source.log_prob(ids)  # (n,)
    loc = _DEFAULT_LOC[cfg.source] if cfg.log_t_loc is None else cfg.log_t_loc
    smoothed = cfg.smoothing > 0
    t_end = resolve_t_end(("gamma_max" if smoothed else "inf") if cfg.t_end == "auto" else cfg.t_end,
                          cfg.gamma_max, exact_denoiser=not smoothed, allow_eq3=cfg.allow_eq3)
    model = SmoothedPosterior(source, emb, cfg.smoothing)

    def end_log_prob(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # eq. 10's log P(x | z_t*)
        if smoothed:  # eq. 4: the model's factorised Σ_i log p_θ(x_i | z), an upper bound
            return model.factorised_log_prob(ids[rows], z)
        return source.log_posterior(ids[rows], z, emb)

    if t_end is None:
        contour = "eq. 3, t in (0, inf)"
    else:
        contour = f"eq. {4 if smoothed else 10}, t in (0, {t_end:g}] + {'factorised ' if smoothed else ''}end term"
    print(f"path integral ({contour}): source={cfg.source} n={cfg.n} length={length} d={emb.shape[1]} "
          f"n_mc={cfg.n_mc} smoothing={cfg.smoothing:g} proposal log t ~ Logistic({loc:g}, {cfg.log_t_scale:g})",
          flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    estimate, stderr = path_integral_nll(model.posterior_mean, emb[ids], cfg.n_mc,
                                         sample_generator(cfg.seed, "verify", "monte-carlo"),
                                         log_t_loc=loc, log_t_scale=cfg.log_t_scale, t_end=t_end,
                                         end_log_prob=None if t_end is None else end_log_prob,
                                         progress=progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    exact_mean = float(exact.mean())
    bound = exact_mean if not smoothed else None  # what the estimator estimates (None: unknown or infinite)
    if smoothed and use_circle and t_end is not None:
        bound = source.circle_bound(t_end, cfg.smoothing)
    estimate_mean = float(estimate.mean())
    stderr_mean = float(stderr.pow(2).sum().sqrt()) / cfg.n  # sequences are independent
    target = exact_mean if bound is None else bound
    return {
        "exact_nll": exact_mean,
        "exact_bound": bound,
        "estimate_nll": estimate_mean,
        "stderr": stderr_mean,
        "z_score": (estimate_mean - target) / stderr_mean if stderr_mean > 0 else 0.0,
        "max_sequence_nll": float(estimate.max()),
        "source": cfg.source,
        "n": cfg.n,
        "length": length,
        "n_mc": cfg.n_mc,
        "t_end": t_end,
        "smoothing": cfg.smoothing,
        "exact_bits_per_token": float(nll_to_bits(exact_mean, length)),
        "estimate_bits_per_token": float(nll_to_bits(estimate_mean, length)),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),  # wall time is unreliable on a shared machine
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip() + "\n\nkeys:\n" + C.describe(VerifyConfig))
        return 0
    try:
        command, args = argv[0], argv[1:]
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}; available: {', '.join(COMMANDS)}")
        cfg = C.load(VerifyConfig, args, aliases=ALIASES, presets={})
        # small ops in a length-L loop: one thread is faster, and far faster on a shared machine
        torch.set_num_threads(1)
        result = path_integral(cfg)
    except (ConfigError, UserError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    bound = "" if result["exact_bound"] in (None, result["exact_nll"]) else f", its bound {result['exact_bound']:.4f}"
    print(f"exact {result['exact_nll']:.4f} nats{bound}, estimate {result['estimate_nll']:.4f} ± "
          f"{result['stderr']:.4f} (z = {result['z_score']:+.2f}; largest sequence {result['max_sequence_nll']:.2f}) "
          f"in {result['seconds']:.1f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
