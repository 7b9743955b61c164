"""Where the time of a short-query forward goes: host (Python, launches) or device (kernels).

``python -m bench.launch_profile`` (a step of ``make gpu-check``). On the first H200 run the Triton forward took
0.62 ms at L = 1 and 0.35 ms at L = 64 for any M from 640 to 3800 (B = 8, H = 16, D = 64, bf16), where the CUDA
backend took 0.06-0.24 ms and SDPA 0.07-0.11 ms: a time flat in M is not the kernel's. This profiles the same calls
under ``torch.profiler`` and ``cProfile`` and prints, per backend and shape, the wall time per call, the device time
per call, the torch operations and the Python functions that took most host time, so that the next change aims at
what costs. Calls are asynchronous: a call costs the larger of its host time and its device time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import memtx_ops
from bench.harness import burst, median_time, synchronize


def inputs(B, H, L, M, D, dtype, device):
    """q, k, v, r, u, vb of the short-query bench (``bench/suites/short_query.py``)."""
    shapes = ((B, H, L, D), (B, H, M + L, D), (B, H, M + L, D), (H, M + L, D), (H, D), (H, D))
    return [torch.randn(*shape, device=device, dtype=dtype) for shape in shapes]


def profile(backend: str, args, calls: int) -> str:
    """A few lines: wall and device time per call, and the top host operations."""
    device = args[0].device

    def call():
        with torch.no_grad():
            memtx_ops.rel_memory_attention(*args, backend=backend)

    for _ in range(5):  # compile, autotune, warm the caches
        call()
    measure, burst_calls = burst(call, device)
    wall = median_time(measure, device).per_call(burst_calls)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0) / calls
    table = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
    return (f"wall {1e6 * wall.median:.1f} us/call ({1e6 * wall.low:.1f}-{1e6 * wall.high:.1f}, median of "
            f"{wall.rounds} rounds of {burst_calls} calls), device {device_us:.1f} us/call\n"
            f"{table}\n{python_profile(call, calls)}")


def python_profile(call, calls: int) -> str:
    """The Python functions that take the host's time (cProfile, by own time): the wrapper, the autotuner, the
    launcher, torch's eager ops."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return text.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launch_profile", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="triton,cuda")
    p.add_argument("--calls", type=int, default=50)
    opts = p.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("launch_profile: no CUDA device here")
        return 0
    for L, M in ((1, 640), (1, 3800), (64, 640)):
        args = inputs(8, 16, L, M, 64, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        for backend in opts.backends.split(","):
            print(f"== {backend} B=8 H=16 L={L} M={M} D=64 {args[0].dtype}: {profile(backend, args, opts.calls)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
