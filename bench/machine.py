"""One line about the machine a bench ran on: threads, cores, load average, processor (and GPU if any);
and what the benches share: the FLOP counter, their count flags' checks, their target-table rows.

Timings on a shared machine move with its load; every bench prints this line before and after its figures
so a reader can tell an idle run from a loaded one.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch


def describe(label: str = "machine", counts: list[int] | None = None) -> str:
    """The line; ``counts``: the thread counts the bench times (default: torch's present count)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = ",".join(str(t) for t in counts) if counts else str(torch.get_num_threads())
    return (f"{label}: torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores, "
            f"load average {load} (1/5/15 min), {cpu}{gpu}")


def thread_counts(text: str) -> list[int]:
    """``--threads`` of the CPU benches: one count or several, comma-separated ("1,2"), each timed in the
    same run so their figures print side by side. Raises ValueError with one line naming what is accepted."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--threads={text}: one or more thread counts, comma-separated, e.g. 2 or 1,2") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise ValueError(f"--threads={text}: thread counts must be distinct and at least 1, e.g. 2 or 1,2")
    return counts


def refuse_counts_below_one(ap: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """One ``error:`` line (exit 2) naming the first of ``names`` (argparse dests) whose count is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")


def threads_label(count: int) -> str:
    """"1 thread", "2 threads": a column or figure of one thread count."""
    return f"{count} thread{'s' * (count > 1)}"


def target_row(label: str, cells: list[str], target: str = "", width: int = 15) -> str:
    """One line of a bench's target table: the label, one cell per thread count, the target."""
    return f"{label:<58} " + " ".join(f"{c:>{width}}" for c in cells) + f" {target:>8}"


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def flop_counter():
    """torch's FlopCounterMode, also counting the in-place ``addmm_`` (its table has ``addmm`` only): the
    converter accumulates its GEMMs in place, which would otherwise go uncounted."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
