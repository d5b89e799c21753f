"""Single-process trainer; the Ray job runs it unchanged inside each worker (``wrap_model`` = DDP).

One optimizer step (global batch B = micro × accum × world sequences):

1. for each accumulation slice a: rank r takes its rows of the global batch (``Data.batch``), draws the
   corruption noise from one generator per row keyed by (seed, "train", step, row), and backpropagates
   the objective's *summed* token loss;
2. the gradient is divided by the global token count of the step (all slices, all workers) — so the
   update does not depend on how the batch is split, and the LR means the same for any worker count;
3. clip, AdamW with the scheduled LR, EMA update (MDLM: decay_n = min(decay, (1+n)/(10+n)); dsl.ema).

The step reads nothing back to the host: loss, token count and grad norm stay device tensors until the
loop reads them at logging, validation and checkpoint steps, so an accelerator is never left waiting for
the Python side. Host batches and noise travel through pinned memory (dsl.devices). ``train.precision=bf16``
runs the forward under bf16 autocast as MDLM trains (its DiT forces bf16 around the blocks; master
weights, optimizer, softmax and the loss stay fp32); ``train.compile`` wraps the model in torch.compile.

Everything a step depends on — weights, optimizer, EMA, the global RNG (dropout), the step (which fixes
the data and the noise) and a streamed corpus' position — is saved, so a resumed run is bit-identical
on CPU to one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsl.checkpoint import (
    MANIFEST,
    apply_retention,
    decode_rng,
    encode_rng,
    latest_complete,
    list_checkpoints,
    load_checkpoint,
    read_tokenizer,
    remove_interrupted_saves,
    save_checkpoint,
)
from dsl.config import ConfigError, RunConfig, dumps, to_dict
from dsl.data import SYNTHETIC, build_data
from dsl.devices import to_device
from dsl.ema import EMA
from dsl.errors import UserError
from dsl.models.loading import load_weights
from dsl.objectives import select_objective, validation_metrics
from dsl.seeding import derive_seed, row_generators
from dsl.storage import Storage, open_storage


def lr_at(step: int, cfg: Any) -> float:
    """LR for optimizer step ``step`` (0-based): linear warm-up to ``lr``, then constant/cosine/linear."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr + (floor - cfg.lr) * progress  # linear


def run_name(cfg: RunConfig) -> str:
    """``cfg.name`` or a stable name derived from the config (no timestamp: re-running resumes)."""
    if cfg.name:
        return cfg.name
    return f"{cfg.objective}-{hashlib.sha256(dumps(cfg).encode()).hexdigest()[:10]}"


class _ObjectiveView:
    """The wrapped model for ``forward`` (DDP hooks) and the raw model for everything else (``embed``)."""

    def __init__(self, wrapped: torch.nn.Module, raw: torch.nn.Module) -> None:
        self._wrapped, self._raw = wrapped, raw

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@dataclass
class StepFigures:
    """What steps since the last read left on the device: summed loss and token count of the latest step
    (float64, over all workers), its grad norm, and the tokens and token-less steps of the whole window."""

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    window_tokens: torch.Tensor
    unscored_steps: torch.Tensor


class Trainer:
    """``fit()`` trains ``run_cfg`` to ``train.steps``, validating and checkpointing on the way.

    ``on_metrics(metrics, step)`` receives the logged metrics (rank 0); ``on_checkpoint(uri, step)``
    each checkpoint written (rank 0).
    """

    def __init__(self, run_cfg: RunConfig, *, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 storage: Storage | str | None = None,
                 on_metrics: Callable[[dict, int], None] | None = None,
                 on_checkpoint: Callable[[str, int], None] | None = None,
                 device: str | torch.device | None = None) -> None:
        from dsl.models import build_model
        from dsl.models.init import initialise_weights

        cfg = copy.deepcopy(run_cfg)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or "cpu")
        self.on_metrics, self.on_checkpoint = on_metrics, on_checkpoint
        tc = cfg.train
        self.micro = tc.micro_batch_size or tc.batch_size // world_size
        if self.micro < 1 or tc.batch_size % (self.micro * world_size):
            raise ConfigError(f"train.batch_size={tc.batch_size} is not a multiple of train.micro_batch_size="
                              f"{self.micro} x {world_size} workers")
        self.accum = tc.batch_size // (self.micro * world_size)

        self.name = run_name(run_cfg)
        self.storage = open_storage(storage if storage is not None else Path(cfg.out_dir) / self.name)
        # a tokenizer trained on the corpus is reused from the run's checkpoint, never re-trained
        saved_tokenizer = None
        if cfg.data.tokenizer in ("auto", "bpe") and cfg.data.source not in SYNTHETIC:
            latest = latest_complete(self.storage)
            saved_tokenizer = read_tokenizer(latest) if latest else None
        self.data = build_data(cfg, tokenizer=saved_tokenizer)
        if cfg.model.mask_id == -1 and self.data.mask_id != self.data.vocab_size - 1:
            cfg.model.mask_id = self.data.mask_id  # e.g. text8's [MASK]=4 is not the last id
        self.raw_model = build_model(cfg, self.data.vocab_size)  # fills model.vocab_size / mask_id
        self.cfg = cfg
        self.objective = select_objective(cfg)
        initialise_weights(self.raw_model, cfg.init, cfg.objective)
        self.raw_model.to(self.device)
        self.model = wrap_model(self.raw_model) if wrap_model else self.raw_model
        if tc.compile:  # after DDP: its optimizer splits the graph at the gradient buckets
            self.model = torch.compile(self.model)
        self._view = _ObjectiveView(self.model, self.raw_model)
        self._autocast = torch.bfloat16 if tc.precision == "bf16" else None

        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                                           weight_decay=tc.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.ema = EMA(self.raw_model, tc.ema) if tc.ema > 0 else None
        self.step_count = 0
        self.best_valid_loss = math.inf
        self.metrics: dict[str, float] = {}
        self._figures: StepFigures | None = None
        self._window_start = time.perf_counter()
        # dropout is the one consumer of the global RNG: seed it per rank, save and restore it
        torch.manual_seed(derive_seed(cfg.seed, "dropout", rank))

    # ------------------------------------------------------------------------------------------
    def _loss(self, model: Any, split: str, step: int, accum_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and scored-token count of this rank's slice ``accum_index`` of a step's batch."""
        batch = self.data.batch(split, step, self.rank, self.world_size, self.micro, accum_index)
        ids, mask = to_device(batch["ids"], self.device), to_device(batch["mask"], self.device)
        gens = row_generators(self.cfg.seed, split, step, batch["rows"])
        with torch.autocast(self.device.type, dtype=self._autocast or torch.float32,
                            enabled=self._autocast is not None):
            loss_sum, n_tokens, _ = self.objective(model, ids, mask, gens, batch["rows"])
        return loss_sum, n_tokens

    def _summed(self, model: Any, split: str, step: int, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and token count over every accumulation slice and worker (float64 device scalars)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in range(self.accum):
            no_sync = getattr(self.model, "no_sync", None)
            quiet = no_sync() if backward and no_sync is not None and a < self.accum - 1 else contextlib.nullcontext()
            with quiet:
                part, n = self._loss(model, split, step, a)
                if backward:
                    part.backward()
            loss_sum += part.detach().double()
            n_tokens += n.double()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.stack([loss_sum, n_tokens])
            torch.distributed.all_reduce(both)
            loss_sum, n_tokens = both[0], both[1]
        return loss_sum, n_tokens

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        """One optimizer step. Reads nothing back from the device: its figures wait in ``_figures``
        until :meth:`read_metrics`."""
        tc = self.cfg.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, n_tokens = self._summed(self._view, "train", self.step_count, backward=True)
        # the sum over workers divided by the global count is wanted; DDP averaged the gradients over
        # workers. (A step without scored tokens has zero gradients; the next read reports it.)
        scale = (self.world_size / n_tokens.clamp(min=1.0)).to(torch.float32)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            torch._foreach_mul_(grads, scale)
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        elif grads:
            grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        else:
            grad_norm = torch.zeros((), device=self.device)
        lr = lr_at(self.step_count, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        if self.ema is not None:
            self.ema.update(self.raw_model, self.step_count)
        previous = self._figures
        self._figures = StepFigures(
            loss_sum, n_tokens, grad_norm.detach(), lr,
            n_tokens if previous is None else previous.window_tokens + n_tokens,
            (n_tokens <= 0).long() if previous is None else previous.unscored_steps + (n_tokens <= 0).long())

    def read_metrics(self) -> dict[str, float]:
        """The latest step's metrics as floats (waits for the device), merged into ``self.metrics``:
        loss (nats/token over the global batch), lr, grad_norm, and tokens_per_s since the last read."""
        fig, self._figures = self._figures, None
        if fig is None:
            return {}
        unscored = int(fig.unscored_steps)
        elapsed = time.perf_counter() - self._window_start
        self._window_start = time.perf_counter()
        if unscored:
            raise UserError(f"data.source={self.cfg.data.source}: {unscored} step(s) up to step {self.step_count} "
                            "had no scored tokens")
        metrics = {"loss": float(fig.loss_sum / fig.n_tokens), "lr": fig.lr, "grad_norm": float(fig.grad_norm),
                   "tokens_per_s": float(fig.window_tokens) / elapsed if elapsed > 0 else float("nan")}
        self.metrics.update(metrics)
        return metrics

    def step(self) -> dict[str, float]:
        """One optimizer step and its metrics (:meth:`train_step` then :meth:`read_metrics`)."""
        self.read_metrics()
        self.train_step()
        return self.read_metrics()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss (nats/token; the objective's NELBO or CE) with the EMA weights."""
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with self.ema.applied(model) if self.ema is not None else contextlib.nullcontext():
                loss_sum = n_tokens = 0.0
                for k in range(self.cfg.train.eval_batches):
                    part, n = self._summed(model, "valid", k, backward=False)
                    loss_sum, n_tokens = loss_sum + part, n_tokens + n
        finally:
            model.train(was_training)
        return validation_metrics(self.cfg.objective, float(loss_sum) / max(float(n_tokens), 1.0))

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "model": {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()},
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": {"torch": torch.get_rng_state().clone()},
            "data": self.data.state_dict(),
            "best_valid_loss": self.best_valid_loss,
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "state") -> None:
        load_weights(self.raw_model, state["model"], f"{where}/model")
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), where)
        if state.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"{where}/optimizer: does not fit the model ({exc})") from None
        self.step_count = int(state["step"])
        self.best_valid_loss = float(state.get("best_valid_loss", math.inf))
        if state.get("rng", {}).get("torch") is not None:
            torch.set_rng_state(state["rng"]["torch"])
        self.data.load_state_dict(state.get("data") or {})

    # ------------------------------------------------------------------------------------------
    def save(self, step: int | None = None) -> str | None:
        """Write a checkpoint of the current state (rank 0 only) and apply retention; returns its URI."""
        self.read_metrics()  # every rank: a step without tokens must fail before anything is saved
        if self.rank != 0:
            return None
        step = self.step_count if step is None else step
        sd = self.state_dict()
        state = {"rng": {"torch": encode_rng(sd["rng"]["torch"])}, "data": sd["data"],
                 "best_valid_loss": sd["best_valid_loss"] if math.isfinite(sd["best_valid_loss"]) else None,
                 "ema_updates": self.step_count, "run_name": self.name}
        uri = save_checkpoint(self.storage, step, config=to_dict(self.cfg), model_state=sd["model"],
                              ema_state=None if self.ema is None else self.ema.full_state(sd["model"]),
                              optim_state=sd["optimizer"], state=state, metrics=dict(self.metrics),
                              tokenizer=self.data.tokenizer)
        apply_retention(self.storage, self.cfg.train.keep_last)
        if self.on_checkpoint is not None:
            self.on_checkpoint(uri, self.step_count)
        return uri

    def resume(self) -> bool:
        """Restore the latest complete checkpoint in storage; False when there is none. Rank 0 first
        removes what saves killed mid-write left behind (temporary ``step-<N>`` directories)."""
        if self.rank == 0:
            remove_interrupted_saves(self.storage)
        uri = latest_complete(self.storage)
        if uri is None:
            return False
        ckpt = load_checkpoint(uri)
        ema = None
        if ckpt.ema_state is not None:
            names = {n for n, p in self.raw_model.named_parameters() if p.requires_grad}
            ema = {k: v for k, v in ckpt.ema_state.items() if k in names}
        rng = ckpt.state.get("rng", {}).get("torch")
        best = ckpt.state.get("best_valid_loss", ckpt.state.get("best_nll"))  # best_nll: older checkpoints
        self.load_state_dict({
            "step": ckpt.step, "model": ckpt.model_state, "ema": ema, "optimizer": ckpt.optim_state,
            "rng": {"torch": decode_rng(rng) if rng else None}, "data": ckpt.state.get("data", {}),
            "best_valid_loss": math.inf if best is None else best}, where=ckpt.uri)
        self.metrics = dict(ckpt.metrics)
        return True

    def _emit(self, metrics: dict[str, float]) -> None:
        if self.on_metrics is not None and self.rank == 0:
            self.on_metrics(dict(metrics), self.step_count)

    def fit(self) -> dict[str, float]:
        """Train from the current step to ``train.steps``; validate and checkpoint on schedule and at the
        end. Device values are read only at those steps and every ``train.log_every`` steps."""
        from tqdm import tqdm

        tc = self.cfg.train
        ahead = [s for s in list_checkpoints(self.storage)
                 if s > self.step_count and self.storage.exists(f"step-{s}/{MANIFEST}")]
        if ahead:  # training on would collide with (and must never replace) what is already saved
            raise UserError(f"{self.storage.uri} already holds checkpoints up to step {max(ahead)} of run "
                            f"{self.name}; call resume() first, or give a new run name / storage")
        bar = tqdm(total=tc.steps, initial=self.step_count, desc=f"train {self.name}",
                   disable=self.rank != 0, leave=False)
        last_eval = last_ckpt = -1
        self.read_metrics()
        try:
            while self.step_count < tc.steps:
                self.train_step()
                bar.update(1)
                if self.step_count % tc.log_every == 0 or self.step_count == tc.steps:
                    metrics = self.read_metrics()
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                    self._emit(metrics)
                if tc.eval_every and self.step_count % tc.eval_every == 0:
                    self._validate_and_record()
                    last_eval = self.step_count
                if tc.ckpt_every and self.step_count % tc.ckpt_every == 0:
                    self.save()
                    last_ckpt = self.step_count
        finally:
            bar.close()
        if last_eval != self.step_count:
            self._validate_and_record()
        if last_ckpt != self.step_count and self.step_count not in list_checkpoints(self.storage):
            self.save()
        return dict(self.metrics)

    def _validate_and_record(self) -> None:
        valid = self.validate()
        self.best_valid_loss = min(self.best_valid_loss, valid["valid_loss"])
        self.metrics.update(valid)
        self._emit(valid)


__all__ = ["Trainer", "StepFigures", "lr_at", "run_name"]
