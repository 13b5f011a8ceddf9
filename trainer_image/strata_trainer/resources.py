"""What the trial may use: CPU threads and memory from the pod's limits (or the local runner's share).

torch is imported only where a device or threads are set: a worker pod reads its limits here
without it (strata_trainer.podworker, the stand-in trainer)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cpu_limit() -> int:
    """STRATA_CPU_LIMIT (the pod builder maps limits.cpu there), else cgroup v2 cpu.max, else all cores."""
    value = os.environ.get("STRATA_CPU_LIMIT")
    if value:
        return max(1, math.ceil(float(value)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def memory_limit() -> int | None:
    """Bytes: STRATA_MEMORY_LIMIT, else cgroup v2 memory.max, else None (use what is free)."""
    value = os.environ.get("STRATA_MEMORY_LIMIT")
    if value:
        return int(float(value))
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return None if raw == "max" else int(raw)
    except (OSError, ValueError):
        return None


def pick_device(preference: str) -> torch.device:
    import torch

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("spec.training.device is cuda but no GPU is visible in this pod")
        return torch.device("cuda")
    return torch.device("cpu")


def configure_threads() -> int:
    import torch

    threads = cpu_limit()
    torch.set_num_threads(threads)
    return threads
