"""Bench suite: the fused causal resampling ops against their eager compositions (SPEC §4).

``causal_downsample`` (shift by k - 1 with the previous segment's rows, mean or learned group weights) against
``cat`` + ``view`` + ``mean``/``einsum``; ``upsample_add`` (repeat or linear) against ``repeat_interleave`` + ``add``
(linear: the ramp's two weighted terms). Rows per case: ``eager`` (memtx_ops.reference, the baseline) and the fused
backend of the device (``cpu`` on the CPU, ``triton`` on CUDA): fwd, bwd, fwd+bwd and peak tensor memory of one
fwd+bwd. Inputs are contiguous ``[B, L, d]`` leaves (a time-major leaf would add, to every candidate alike, the copy
autograd makes to give its .grad the leaf's strides; in the model the inputs are not leaves). ``--batch`` and
``--lengths`` (fine sequence length, a multiple of 3) override the sizes; d_model is 512.
"""

from __future__ import annotations

import torch

import memtx_ops
from bench.harness import measure_ops
from memtx_ops import reference

NAME = "causal_resample"
BASELINE = "eager"
FACTOR = 3
D_MODEL = 512


def default_config(device):
    if device.type == "cuda":
        return dict(batch=16, lengths=[3072], dtypes=["bfloat16"], fused="triton")
    return dict(batch=8, lengths=[1536], dtypes=["float32"], fused="cpu")


def leaf(*shape, dtype, device):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def cases(B, L, dtype, device):
    """(op, case, {label: fn}, inputs, grad) of one size."""
    k, d = FACTOR, D_MODEL
    x, prev, x_short, prev_short = (leaf(B, n, d, dtype=dtype, device=device) for n in (L, k - 1, L // k, 1))
    weights = torch.full((k,), 1.0 / k, device=device, dtype=dtype, requires_grad=True)
    short_grad = torch.randn(B, L // k, d, device=device, dtype=dtype)
    fine_grad = torch.randn(B, L, d, device=device, dtype=dtype)
    size = f"B={B} L={L} d={d} k={k}"
    yield ("causal_downsample", f"mean {size}",
           {"eager": lambda t, p: reference.causal_downsample(t, k, p),
            "fused": lambda t, p: memtx_ops.causal_downsample(t, k, prev=p)}, [x, prev], short_grad)
    yield ("causal_downsample", f"weighted {size}",
           {"eager": lambda t, p, w: reference.causal_downsample(t, k, p, w),
            "fused": lambda t, p, w: memtx_ops.causal_downsample(t, k, prev=p, weights=w)}, [x, prev, weights],
           short_grad)
    yield ("upsample_add", f"repeat {size}",
           {"eager": lambda s, r: reference.upsample_add(s, r, k),
            "fused": lambda s, r: memtx_ops.upsample_add(s, r, k)}, [x_short, x], fine_grad)
    yield ("upsample_add", f"linear {size}",
           {"eager": lambda s, r, p: reference.upsample_add(s, r, k, "linear", p),
            "fused": lambda s, r, p: memtx_ops.upsample_add(s, r, k, mode="linear", prev=p)},
           [x_short, x, prev_short], fine_grad)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    rows = []
    for L in opts.lengths or cfg["lengths"]:
        for dtype_name in opts.dtypes or cfg["dtypes"]:
            for op, case, fns, inputs, grad in cases(opts.batch or cfg["batch"], L, getattr(torch, dtype_name),
                                                     device):
                labelled = {"eager": fns["eager"], cfg["fused"]: fns["fused"]}
                if opts.backends:
                    labelled = {label: fn for label, fn in labelled.items() if label in opts.backends}
                rows += measure_ops(NAME, f"{op} {case}", dtype_name, labelled, inputs, device, opts.repeats,
                                    grad=grad)
    return rows
