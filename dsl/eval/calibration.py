"""Token calibration under teacher forcing on corrupted inputs (Sec 7.5, Fig 4).

Held-out sequences x are embedded and *every* position is corrupted at one SNR γ ("all_corrupted" in
Fig 4b): z = γx + √γ ε (Sec 3). A denoiser's posterior p(· | z) then gives, per token, a confidence
(its max probability) and whether its argmax equals the true token. Token ECE (Guo et al. 2017) is
Σ_b (n_b / N) |acc_b − conf_b| over equal-width confidence bins (``n_bins``, default 15 — the paper
does not say; config ``calibration_bins``). Fig 4a is ECE against γ near the clean end (70…100),
Fig 4b the reliability diagram at γ = 100.

An exact posterior is perfectly calibrated, but a finite sample still has ECE > 0;
:func:`calibrated_ece_quantile` gives that sampling floor by drawing "correct" ~ Bernoulli(confidence)
for the same confidences, so "ECE ≈ 0 within sampling error" is a checkable statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_SNRS = (1.0, 5.0, 10.0, 20.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0)

Posterior = Callable[[torch.Tensor], torch.Tensor]  # z (B, L, d) -> probs (B, L, V)
Embed = Callable[[torch.Tensor], torch.Tensor]  # ids (B, L) -> x (B, L, d)


@dataclass
class Reliability:
    """ECE and per-bin statistics of one (denoiser, SNR)."""

    ece: float
    n_tokens: int
    accuracy: float
    confidence: float
    bin_edges: list[float] = field(default_factory=list)
    bin_counts: list[int] = field(default_factory=list)
    bin_confidence: list[float] = field(default_factory=list)  # nan for empty bins
    bin_accuracy: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> Reliability:
    """Token ECE and the reliability-diagram bins of flat ``confidence`` / ``correct`` tensors."""
    conf = confidence.reshape(-1).double()
    corr = correct.reshape(-1).double()
    n = conf.numel()
    if n == 0:
        raise ValueError("calibration: no tokens to score")
    # bin b holds (edge_b, edge_{b+1}]; confidence 0 joins the first bin
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = torch.bincount(idx, weights=corr, minlength=n_bins)
    ece = float((sum_acc - sum_conf).abs().sum() / n)  # Σ_b (n_b/N) |acc_b − conf_b|
    safe = counts.clamp_min(1)
    nan = torch.full_like(counts, float("nan"))
    return Reliability(
        ece=ece, n_tokens=n, accuracy=float(corr.mean()), confidence=float(conf.mean()),
        bin_edges=edges.tolist(), bin_counts=[int(c) for c in counts],
        bin_confidence=torch.where(counts > 0, sum_conf / safe, nan).tolist(),
        bin_accuracy=torch.where(counts > 0, sum_acc / safe, nan).tolist())


def calibrated_ece_quantile(confidence: torch.Tensor, n_bins: int = 15, q: float = 0.99, draws: int = 200,
                            gen: torch.Generator | None = None) -> float:
    """The ``q`` quantile of the ECE a perfectly calibrated predictor with these confidences shows."""
    conf = confidence.reshape(-1).double()
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    eces = [reliability(conf, torch.bernoulli(conf, generator=gen), n_bins).ece for _ in range(draws)]
    return float(torch.tensor(eces).quantile(q))


def teacher_forced(posterior: Posterior, embed: Embed, ids: torch.Tensor, snr: float,
                   gen: torch.Generator, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) of the tokens of ``ids`` (B, L) after corrupting all positions at ``snr``."""
    from dsl.channel import corrupt

    with torch.no_grad():
        x = embed(ids)  # (B, L, d)
        gamma = torch.full(ids.shape, float(snr), dtype=x.dtype, device=x.device)  # all_corrupted
        z = corrupt(x, gamma, gen)  # Sec 3: z = γx + √γ ε
        probs = posterior(z)  # (B, L, V)
        conf, pred = probs.max(dim=-1)
        correct = pred == ids.to(pred.device)
    if mask is not None:
        keep = mask.bool().to(conf.device)
        return conf[keep].double().cpu(), correct[keep].cpu()
    return conf.reshape(-1).double().cpu(), correct.reshape(-1).cpu()


def calibration_by_snr(posterior: Posterior, embed: Embed, batches: Iterable[dict | torch.Tensor],
                       snrs: Sequence[float], gen: torch.Generator, n_bins: int = 15,
                       progress: bool = False) -> dict[float, Reliability]:
    """Reliability of one denoiser at each SNR over the same held-out batches (ids or {ids, mask})."""
    batches = list(batches)
    out: dict[float, Reliability] = {}
    it = snrs
    if progress:
        from tqdm import tqdm

        it = tqdm(snrs, desc="calibration", unit="snr")
    for snr in it:
        confs, corrects = [], []
        for b in batches:
            ids, mask = (b["ids"], b.get("mask")) if isinstance(b, dict) else (b, None)
            c, k = teacher_forced(posterior, embed, ids, snr, gen, mask)
            confs.append(c)
            corrects.append(k)
        out[float(snr)] = reliability(torch.cat(confs), torch.cat(corrects), n_bins)
    return out


def model_posterior(model: torch.nn.Module) -> tuple[Posterior, Embed]:
    """(posterior, embed) of a DSL model: softmax of its logits and its own token embeddings."""

    def posterior(z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(z).float(), dim=-1)

    return posterior, model.embed


def plot_calibration(results: dict[str, dict[float, Reliability]], path: str, reliability_snr: float = 100.0) -> None:
    """Fig 4 as one PNG: (a) ECE vs SNR per denoiser, (b) reliability diagram at ``reliability_snr``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, by_snr in results.items():
        snrs = sorted(by_snr)
        ax_a.plot(snrs, [by_snr[s].ece for s in snrs], marker="o", label=label)
        if reliability_snr in by_snr:
            r = by_snr[reliability_snr]
            pts = [(c, a) for c, a in zip(r.bin_confidence, r.bin_accuracy) if c == c]
            ax_b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} (SNR={reliability_snr:g})")
    ax_a.set(xlabel="SNR", ylabel="ECE", title="Token ECE vs SNR")
    ax_a.legend()
    ax_b.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax_b.set(xlabel="average confidence (bin)", ylabel="empirical accuracy (bin)", xlim=(0, 1), ylim=(0, 1),
             title=f"Reliability at SNR={reliability_snr:g} (all corrupted)")
    ax_b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DEFAULT_SNRS", "Reliability", "calibrated_ece_quantile", "calibration_by_snr", "model_posterior",
           "plot_calibration", "reliability", "teacher_forced"]
