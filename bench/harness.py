"""Measurement primitives shared by every bench suite: timing, peak memory, device naming."""

from __future__ import annotations

import gc
import re
import statistics
import time
from typing import Callable

import torch

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


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensors the call ``fn()`` holds at its peak above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of torch's allocation and free events recorded by
    the profiler (``profile_memory=True``), so the number does not depend on the C allocator's settings and the
    timings are taken under the allocator users run with. Not counted on the CPU: kernels' per-thread scratch
    that is not a tensor (the C++ CPU attention keeps a few tiles, well under 1 MiB per thread).
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


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
