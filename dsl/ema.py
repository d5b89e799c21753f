"""Exponential moving average of a model's trainable parameters, with MDLM's warm-up of the decay.

MDLM (models/ema.py) keeps shadow copies s of the parameters θ and, after the n-th optimizer step,
updates s ← s − (1 − decay_n)(s − θ) with decay_n = min(decay, (1 + n)/(10 + n)). Evaluation and the
saved "EMA weights" use s. The update is a few fused element-wise kernels over all parameters at
once and reads nothing back to the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dsl.errors import UserError


def ema_decay(decay: float, n: int) -> float:
    """MDLM models/ema.py: decay_n = min(decay, (1+n)/(10+n)) for the n-th update (n counts from 1)."""
    return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
    """Shadow weights ``shadow[name]`` of every trainable parameter of ``model``."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone() for n in self.names}

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, n: int) -> None:
        """The n-th update (n = optimizer steps taken so far): s ← s − (1 − decay_n)(s − θ)."""
        shadow = [self.shadow[name] for name in self.names]
        diff = torch._foreach_sub(shadow, self._params(model))
        torch._foreach_mul_(diff, 1.0 - ema_decay(self.decay, n))
        torch._foreach_sub_(shadow, diff)

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The shadow weights in ``model`` for the duration (validation); the trained ones restored after."""
        params = self._params(model)
        backup = [p.clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, [self.shadow[n] for n in self.names])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def full_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict with the shadow weights in place of its parameters: buffers ride
        along, so the EMA loads as a model on its own."""
        return {k: self.shadow.get(k, v) for k, v in model_state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, where: str) -> None:
        if state is None:
            raise UserError(f"{where}: has no EMA weights but train.ema={self.decay}")
        missing = sorted(set(self.shadow) - set(state))
        shapes = [k for k in self.shadow if k in state and state[k].shape != self.shadow[k].shape]
        if missing or shapes:
            raise UserError(f"{where}/ema: does not fit the model (missing: {', '.join(missing[:5])}; "
                            f"wrong shape: {', '.join(shapes[:5])})")
        for k, v in self.shadow.items():
            self.shadow[k] = state[k].to(v.device).clone()


__all__ = ["EMA", "ema_decay"]
