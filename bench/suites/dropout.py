"""Bench suite: ``memtx_ops.dropout`` (Philox mask recomputed in backward) against torch's dropout, and
``memtx_ops.relu_dropout`` against torch's ``dropout(relu(x))`` (the feed-forward block's middle).

Rows per activation shape: ``torch`` (torch's functions, the baseline) and ``auto`` (the C++ kernels on the
CPU). On CUDA ``auto`` is torch's own fused dropout, so the suite runs on the CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memtx_ops
from bench.suites.rel_memory_attention import measure

NAME = "dropout"
BASELINE = "torch"
P = 0.1
# a d_model and a d_inner activation of the model bench's step (B=2), and a d_inner one of B=8
SHAPES = ([1024, 2, 256], [512, 2, 1024], [512, 8, 1024])
RELU_SHAPES = SHAPES[1:]  # d_inner activations
VARIANTS = {
    "dropout": {"torch": lambda x: F.dropout(x, P, True), "auto": lambda x: memtx_ops.dropout(x, P)},
    "relu_dropout": {"torch": lambda x: F.dropout(F.relu(x), P, True), "auto": lambda x: memtx_ops.relu_dropout(x, P)},
}


def run(opts):
    device = opts.device
    if device.type != "cpu":
        print("  skipped: on CUDA memtx_ops.dropout is torch's own dropout")
        return []
    rows = []
    for op, shape in [("dropout", s) for s in SHAPES] + [("relu_dropout", s) for s in RELU_SHAPES]:
        x = torch.randn(shape, requires_grad=True)
        for backend, fn in VARIANTS[op].items():
            t_fwd, t_bwd, t_fb, peak = measure(fn, [x], device, opts.repeats)
            case = f"{op} {'x'.join(map(str, shape))} p={P}"
            rows.append(dict(op=NAME, case=case, backend=backend, dtype="float32", fwd_ms=1e3 * t_fwd,
                             bwd_ms=1e3 * t_bwd, fwd_bwd_ms=1e3 * t_fb, peak_mb=peak / 2**20))
            print(f"  {case} {backend}: fwd+bwd {1e3 * t_fb:.2f} ms", flush=True)
    return rows
