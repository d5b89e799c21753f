"""One line about the machine a bench ran on: threads, cores, load average, processor (and GPU if any).

Timings on a shared machine move with its load; every bench prints this line before and after its figures
so a reader can tell an idle run from a loaded one.
"""

from __future__ import annotations

import os
import platform

import torch


def describe(label: str = "machine") -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{label}: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
            f"load average {load} (1/5/15 min), {cpu}{gpu}")
