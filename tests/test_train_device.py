"""The training step's accelerator path, checked on the CPU: the step reads nothing back from the device
between logging steps (counted by a torch function mode, not timed), and the ``train.compile`` key."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dsl.config import ConfigError, RunConfig, load
from dsl.train import Trainer

torch.set_num_threads(1)

# Every way Python reads a tensor's value: on a GPU each one waits for all the kernels queued before it.
READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}
# Code that works on the step's device values, directly or through torch (clipping, autograd). Host-side
# by design, not counted: the data layer's batches, the per-row generator keys, the optimizer's step counters.
STEP_CODE = ("dsl/train.py", "dsl/ema.py", "dsl/objectives.py", "dsl/channel.py", "dsl/converter.py",
             "dsl/models/", "dsl/devices.py")


DISPATCH = ("torch/_tensor.py", "torch/overrides.py")  # how a read reaches this mode, not who reads


class DeviceReads(TorchFunctionMode):
    """Counts value reads whose innermost caller is step code, with that caller's file and line."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            stack = [f for f in reversed(traceback.extract_stack()[:-1])
                     if f.filename != __file__ and not f.filename.endswith(DISPATCH)]
            if "/torch/optim/" not in stack[0].filename:  # the optimizer's step counters live on the host
                caller = next(f for f in stack if "/torch/" not in f.filename)
                if any(part in caller.filename for part in STEP_CODE):
                    self.sites.append(f"{caller.filename.split('/dsl/')[-1]}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


def _cfg(objective: str, *args: str) -> RunConfig:
    base = ["model=toy", "model.length=16", "model.dropout=0.1", "data.source=hmm", f"objective={objective}",
            "train.batch_size=4", "train.micro_batch_size=2", "train.lr=3e-3", "train.ema=0.9",
            "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0"]
    return load(RunConfig, base + (["model.arch=ar"] if objective == "ar" else []) + list(args))


@pytest.mark.parametrize("objective,clip", [("dsl", "1.0"), ("mdlm", "1.0"), ("ar", "0"), ("dsl", "0")])
def test_a_training_step_reads_nothing_back_from_the_device(objective: str, clip: str, tmp_path: Path) -> None:
    """Loss, token count, grad norm (clipped or not), the gradient scaling and the EMA update stay on the
    device; reading the metrics is where the values come back (and the counter sees those reads)."""
    trainer = Trainer(_cfg(objective, "train.steps=3", f"train.grad_clip={clip}"), storage=tmp_path)
    with DeviceReads() as reads:
        for _ in range(3):
            trainer.train_step()
    assert reads.sites == []
    with DeviceReads() as reads:
        metrics = trainer.read_metrics()
    assert reads.sites and {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(metrics)


def test_the_loop_reads_the_device_only_at_logging_steps(tmp_path: Path) -> None:
    """Six steps logged every six read exactly as often as three steps logged every three: the reads
    belong to the logging, the final validation and the save, none to the steps in between."""
    counts = []
    for steps in (3, 6):
        trainer = Trainer(_cfg("dsl", f"train.steps={steps}", f"train.log_every={steps}"), storage=tmp_path / str(steps))
        seen: list[int] = []
        trainer.on_metrics = lambda metrics, step, seen=seen: seen.append(step)
        with DeviceReads() as reads:
            trainer.fit()
        assert seen == [steps, steps]  # the training metrics, then the final validation's
        counts.append(len(reads.sites))
    assert counts[0] == counts[1] > 0


def test_a_step_without_scored_tokens_fails_before_anything_is_saved(tmp_path: Path) -> None:
    trainer = Trainer(_cfg("mdlm", "train.steps=2"), storage=tmp_path)
    trainer.train_step()
    trainer._figures.unscored_steps += 1  # as a batch of padding only leaves it
    with pytest.raises(Exception, match="no scored tokens"):
        trainer.save()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("word,value", [("true", True), ("yes", True), ("false", False), ("off", False)])
def test_the_compile_key_wraps_the_training_model_only(word: str, value: bool, tmp_path: Path) -> None:
    trainer = Trainer(_cfg("mdlm", "train.steps=1", f"train.compile={word}"), storage=tmp_path)
    assert trainer.cfg.train.compile is value
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) is value
    assert not isinstance(trainer.raw_model, torch._dynamo.eval_frame.OptimizedModule)
    assert all(not k.startswith("_orig_mod") for k in trainer.state_dict()["model"])  # checkpoints unchanged


@pytest.mark.parametrize("word", ["maybe", "2", ""])
def test_the_compile_key_refuses_other_values(word: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.compile") as info:
        _cfg("mdlm", f"train.compile={word}")
    assert "\n" not in str(info.value)


class AttentionCalls(TorchFunctionMode):
    """Records the arguments of every scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((args, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective", ["mdlm", "dsl", "ar"])
def test_attention_under_bf16_autocast_qualifies_for_the_fused_kernels(objective: str, tmp_path: Path) -> None:
    """What CUDA's flash kernel needs: bf16 q, k, v with unit stride in the head dimension, a head size
    that is a multiple of 8, no mask tensor and no dropout (causality by flag)."""
    trainer = Trainer(_cfg(objective, "train.steps=1", "train.precision=bf16"), storage=tmp_path)
    with AttentionCalls() as seen:
        trainer.train_step()
    assert len(seen.calls) == trainer.cfg.model.blocks * trainer.accum  # one per block and micro-batch
    for args, kwargs in seen.calls:
        q, k, v = args[:3]
        assert {q.dtype, k.dtype, v.dtype} == {torch.bfloat16}
        assert all(t.stride(-1) == 1 for t in (q, k, v)) and q.shape[-1] % 8 == 0
        assert kwargs.get("attn_mask") is None and len(args) <= 3 and not kwargs.get("dropout_p")
        assert kwargs.get("is_causal", False) is (objective == "ar")
