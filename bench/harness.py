"""Measurement primitives shared by every bench suite: timing, peak memory, device naming."""

from __future__ import annotations

import gc
import os
import re
import statistics
import time
from typing import Callable, Optional

import torch

# glibc keeps freed blocks resident unless large allocations are mmap'd: `python -m bench` sets these so
# that the peak resident set measures what a call really allocates (see bench/__main__.py).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes the call ``fn()`` holds at its peak above what was allocated before it.

    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above the resident set before the call; None where that is not available.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. ``NVIDIA-H100-80GB-HBM3`` or ``cpu-AMD-EPYC-2t``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1] for l in f if l.startswith("model name")), "")
            name = f"cpu-{model.strip()}"
        except OSError:
            pass
        name += f"-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_has_malloc_settings() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
