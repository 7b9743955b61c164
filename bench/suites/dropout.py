"""Bench suite: ``memtx_ops.dropout`` (Philox mask recomputed in backward) against torch's dropout, and
``memtx_ops.relu_dropout`` against torch's ``dropout(relu(x))`` (the feed-forward block's middle).

Rows per activation shape: ``torch`` (torch's functions, the baseline) and ``auto`` (the C++ kernels on the
CPU). On CUDA ``auto`` is torch's own fused dropout, so the suite runs on the CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memtx_ops
from bench.harness import measure_ops

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
        case = f"{op} {'x'.join(map(str, shape))} p={P}"
        rows += measure_ops(NAME, case, "float32", VARIANTS[op], [x], device, opts.repeats)
    return rows
