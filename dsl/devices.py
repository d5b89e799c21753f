"""Host → accelerator copies that do not stall the host.

Batches and the corruption noise are drawn on the host (one generator per row keeps them identical for
any device and worker count). A plain ``tensor.to("cuda")`` from pageable memory waits for the copy and
so for every kernel queued before it; from page-locked (pinned) memory the copy is queued on the stream
like a kernel and the host runs on.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without waiting."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


__all__ = ["to_device"]
