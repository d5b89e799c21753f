"""Single-process trainer; the Ray job runs it unchanged inside each worker (``wrap_model`` = DDP).

One optimizer step (global batch B = micro × accum × world sequences):

1. for each accumulation slice a: rank r takes its rows of the global batch (``Data.batch``), draws the
   corruption noise from one generator per row keyed by (seed, "train", step, row), and backpropagates
   the objective's *summed* token loss;
2. the gradient is divided by the global token count of the step (all slices, all workers) — so the
   update does not depend on how the batch is split, and the LR means the same for any worker count;
3. clip, AdamW with the scheduled LR, EMA update (MDLM: decay_n = min(decay, (1+n)/(10+n))).

Everything a step depends on — weights, optimizer, EMA, the global RNG (dropout), the step (which fixes
the data and the noise) and a streamed corpus' position — is saved, so a resumed run is bit-identical
on CPU to one that never stopped.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsl.checkpoint import (
    MANIFEST,
    Storage,
    apply_retention,
    decode_rng,
    encode_rng,
    latest_complete,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    open_storage,
    read_tokenizer,
    remove_interrupted_saves,
    save_checkpoint,
)
from dsl.config import ConfigError, RunConfig, dumps, to_dict
from dsl.data import SYNTHETIC, build_data
from dsl.errors import UserError
from dsl.seeding import derive_seed, sample_generator


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


def ema_decay(decay: float, n: int) -> float:
    """MDLM models/ema.py: decay_n = min(decay, (1+n)/(10+n)) for the n-th update (n counts from 1)."""
    return min(decay, (1.0 + n) / (10.0 + n))


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


# What each objective's validation loss is, by name (nats per token). Only AR's is a likelihood. MDLM's is
# its NELBO (MDLM eq. 10), an upper bound on the NLL. DSL's is the denoiser's token cross-entropy over
# Alg 1's mixed-SNR corruptions, not a likelihood at all: the path-integral NLL (eq. 3/10) is
# ``jobs/evaluate.py likelihood``'s, at many forward passes per sequence.
VALIDATION_METRIC = {"ar": "valid_nll", "mdlm": "valid_nelbo", "dsl": "valid_denoising_ce"}


def validation_metrics(objective: str, loss: float) -> dict[str, float]:
    """``valid_loss`` (what retention ranks checkpoints by, for every objective) and the same number
    under its own name; in bits per token too where it bounds or is the NLL."""
    name = VALIDATION_METRIC[objective]
    out = {"valid_loss": loss, name: loss}
    if objective != "dsl":
        out[f"{name}_bits_per_token"] = loss / math.log(2.0)
    return out


class Trainer:
    """``fit()`` trains ``run_cfg`` to ``train.steps``, validating and checkpointing on the way."""

    def __init__(self, run_cfg: RunConfig, *, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 storage: Storage | str | None = None,
                 on_metrics: Callable[[dict, int], None] | None = None,
                 device: str | torch.device | None = None) -> None:
        from dsl.models import build_model

        cfg = copy.deepcopy(run_cfg)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or "cpu")
        self.on_metrics = on_metrics
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
        self._init_weights(cfg.init)
        self.raw_model.to(self.device)
        self.model = wrap_model(self.raw_model) if wrap_model else self.raw_model
        self._view = _ObjectiveView(self.model, self.raw_model)

        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
                                           weight_decay=tc.weight_decay)
        self.ema: dict[str, torch.Tensor] | None = None
        if tc.ema > 0:
            self.ema = {n: p.detach().clone() for n, p in self.raw_model.named_parameters() if p.requires_grad}
        self.step_count = 0
        self.best_valid_loss = math.inf
        self.metrics: dict[str, float] = {}
        # dropout is the one consumer of the global RNG: seed it per rank, save and restore it
        torch.manual_seed(derive_seed(cfg.seed, "dropout", rank))

    # ------------------------------------------------------------------------------------------
    def _init_weights(self, init: str) -> None:
        from dsl.model_spec import INIT_KINDS, parse_model_spec

        spec = parse_model_spec(init, "init", INIT_KINDS)
        if spec.kind == "scratch":
            return
        if spec.ours:
            storage = open_storage(init)
            uri = init if storage.exists(MANIFEST) else latest_complete(storage)
            if uri is None:
                raise UserError(f"init={init}: no complete checkpoint there")
            ckpt = load_checkpoint(uri)
            weights = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
            source_objective = ckpt.config.get("objective")
            if source_objective == "mdlm" and self.cfg.objective == "dsl":
                # Sec 6.1: DSL fine-tuning starts from an MDLM run (backbone + W_trans from vocab_embed)
                from dsl.models.mdlm_weights import init_dsl_from_mdlm

                init_dsl_from_mdlm(self.raw_model, weights, f"init={ckpt.uri}")
            elif source_objective not in (None, self.cfg.objective):
                raise UserError(f"init={ckpt.uri}: a {source_objective} checkpoint cannot initialise "
                                f"objective={self.cfg.objective} (accepted: the same objective, or mdlm for dsl)")
            else:
                load_weights(self.raw_model, weights, f"init={ckpt.uri}")
            return
        from dsl.models.mdlm_weights import init_from_mdlm

        init_from_mdlm(self.raw_model, init)

    def _loss(self, model: Any, batch: dict[str, torch.Tensor], split: str, step: int
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        from dsl.objectives import ar_loss, dsl_loss, mdlm_loss

        ids = batch["ids"].to(self.device)
        mask = batch["mask"].to(self.device)
        rows = batch["rows"]
        gens = [sample_generator(self.cfg.seed, split, step, int(r)) for r in rows]
        precision = torch.bfloat16 if self.cfg.train.precision == "bf16" else None
        with torch.autocast(self.device.type, dtype=precision or torch.float32, enabled=precision is not None):
            if self.cfg.objective == "dsl":
                return dsl_loss(model, ids, mask, self.cfg.channel, gens)
            if self.cfg.objective == "mdlm":
                return mdlm_loss(model, ids, mask, self.cfg.mdlm, gens, rows, self.cfg.train.batch_size)
            return ar_loss(model, ids, mask)

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (loss in nats/token over the global batch)."""
        tc = self.cfg.train
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, n_tokens = 0.0, 0.0
        for a in range(self.accum):
            batch = self.data.batch("train", self.step_count, self.rank, self.world_size, self.micro, a)
            last = a == self.accum - 1
            sync = getattr(self.model, "no_sync", None)
            if sync is not None and not last:
                with sync():
                    part, n, _ = self._loss(self._view, batch, "train", self.step_count)
                    part.backward()
            else:
                part, n, _ = self._loss(self._view, batch, "train", self.step_count)
                part.backward()
            loss_sum += float(part.detach())
            n_tokens += float(n)
        loss_sum, n_tokens = self._all_reduce([loss_sum, n_tokens])
        if n_tokens <= 0:
            raise UserError(f"data.source={self.cfg.data.source}: step {self.step_count} has no scored tokens")
        # DDP averages gradients over workers; the sum over workers divided by the global count is wanted
        scale = self.world_size / n_tokens
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        for p in params:
            p.grad.mul_(scale)
        if tc.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) \
                if params else 0.0
        lr = lr_at(self.step_count, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        if self.ema is not None:
            decay = ema_decay(tc.ema, self.step_count)
            with torch.no_grad():
                for name, p in self.raw_model.named_parameters():
                    if name in self.ema:
                        s = self.ema[name]
                        s.sub_((1.0 - decay) * (s - p.detach()))  # ema.py: s ← s − (1−decay)(s − θ)
        elapsed = time.perf_counter() - t0
        return {"loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_tokens / elapsed if elapsed > 0 else float("nan")}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss and NLL (nats/token; the objective's NELBO or CE) with the EMA weights."""
        tc = self.cfg.train
        model = self.raw_model
        backup = self._swap_in_ema()
        was_training = model.training
        model.eval()
        try:
            loss_sum, n_tokens = 0.0, 0.0
            for k in range(tc.eval_batches):
                for a in range(self.accum):
                    batch = self.data.batch("valid", k, self.rank, self.world_size, self.micro, a)
                    part, n, _ = self._loss(model, batch, "valid", k)
                    loss_sum += float(part)
                    n_tokens += float(n)
            loss_sum, n_tokens = self._all_reduce([loss_sum, n_tokens])
        finally:
            self._swap_out_ema(backup)
            model.train(was_training)
        return validation_metrics(self.cfg.objective, loss_sum / max(n_tokens, 1.0))

    def _swap_in_ema(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        backup = {}
        for name, p in self.raw_model.named_parameters():
            if name in self.ema:
                backup[name] = p.detach().clone()
                p.data.copy_(self.ema[name])
        return backup

    def _swap_out_ema(self, backup: dict[str, torch.Tensor] | None) -> None:
        if backup is None:
            return
        for name, p in self.raw_model.named_parameters():
            if name in backup:
                p.data.copy_(backup[name])

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "model": {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()},
            "ema": None if self.ema is None else {k: v.clone() for k, v in self.ema.items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": {"torch": torch.get_rng_state().clone()},
            "data": self.data.state_dict(),
            "best_valid_loss": self.best_valid_loss,
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "state") -> None:
        load_weights(self.raw_model, state["model"], f"{where}/model")
        if self.ema is not None:
            if state.get("ema") is None:
                raise UserError(f"{where}: has no EMA weights but train.ema={self.cfg.train.ema}")
            missing = sorted(set(self.ema) - set(state["ema"]))
            shapes = [k for k in self.ema if k in state["ema"] and state["ema"][k].shape != self.ema[k].shape]
            if missing or shapes:
                raise UserError(f"{where}/ema: does not fit the model (missing: {', '.join(missing[:5])}; "
                                f"wrong shape: {', '.join(shapes[:5])})")
            for k in self.ema:
                self.ema[k] = state["ema"][k].to(self.device).clone()
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
        if self.rank != 0:
            return None
        step = self.step_count if step is None else step
        sd = self.state_dict()
        ema_full = None
        if sd["ema"] is not None:  # EMA shadows parameters; buffers ride along so it loads as a model
            ema_full = {k: sd["ema"].get(k, v) for k, v in sd["model"].items()}
        state = {"rng": {"torch": encode_rng(sd["rng"]["torch"])}, "data": sd["data"],
                 "best_valid_loss": sd["best_valid_loss"] if math.isfinite(sd["best_valid_loss"]) else None,
                 "ema_updates": self.step_count, "run_name": self.name}
        uri = save_checkpoint(self.storage, step, config=to_dict(self.cfg), model_state=sd["model"],
                              ema_state=ema_full, optim_state=sd["optimizer"], state=state,
                              metrics=dict(self.metrics), tokenizer=self.data.tokenizer)
        apply_retention(self.storage, self.cfg.train.keep_last)
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
        """Train from the current step to ``train.steps``; validate and checkpoint on schedule and at the end."""
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
        try:
            while self.step_count < tc.steps:
                metrics = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                self.metrics.update(metrics)
                if self.step_count % tc.log_every == 0 or self.step_count == tc.steps:
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


__all__ = ["Trainer", "lr_at", "ema_decay", "run_name", "validation_metrics", "VALIDATION_METRIC"]
