"""Bench suite: cross-head attention (SPEC §2) against plain attention and against copying, per backend.

Rows per backend ``b``: ``b:plain`` (``rel_memory_attention``), ``b:cross_head`` (``cross_head_attention``,
i.e. ``kv_head_index=perm``, with a permutation that moves every head) and ``b:copying`` (the paper's
``K[:, perm]``, ``V[:, perm]``, ``R[perm]`` copies, then ``b``; ``reference:copying`` computes as the paper's code
and :func:`memtx_ops.reference.cross_head_attention` do). The report's ratio columns compare with ``reference:copying``;
the extra columns ``time/plain`` and ``peak/plain`` compare each row with ``b:plain`` (target for the fused
path: time within 5%, equal peak).
"""

from __future__ import annotations

import torch

import memtx_ops
from bench.harness import attention_cases, measure_ops
from memtx_ops.backends import BACKENDS

NAME = "cross_head"
BASELINE = "reference:copying"


def default_config(device):
    if device.type == "cuda":
        return dict(batch=4, heads=16, lengths=[1024, 2048], head_dims=[64, 128], dtypes=["bfloat16"],
                    backends=["reference", "triton", "cuda"])
    return dict(batch=2, heads=8, lengths=[512], head_dims=[64], dtypes=["float32"], backends=["reference", "cpu"])


def variants(backend, device, perm):
    """``{label: fn(q, k, v, r, u, vb)}`` of one backend (None where it cannot run on ``device``), and the reasons."""
    labels = [f"{backend}:{v}" for v in ("plain", "cross_head", "copying")]
    reason = None if backend in ("auto", "reference") else BACKENDS[backend].unavailable_reason(device)
    if reason is not None:
        return dict.fromkeys(labels), dict.fromkeys(labels, reason)
    perm = perm.to(device)
    fns = [
        lambda *t: memtx_ops.rel_memory_attention(*t, backend=backend),
        lambda *t: memtx_ops.cross_head_attention(*t, perm, backend=backend),
        lambda q, k, v, r, u, vb: memtx_ops.rel_memory_attention(q, k[:, perm], v[:, perm], r[perm], u, vb,
                                                                  backend=backend),
    ]
    return dict(zip(labels, fns)), {}


def add_plain_ratios(rows):
    """``extra`` columns: fwd+bwd time and peak memory over those of ``<backend>:plain`` on the same case."""
    plain = {(r["case"], r["dtype"], r["backend"].split(":")[0]): r for r in rows
             if r["backend"].endswith(":plain") and "fwd_bwd_ms" in r}
    for r in rows:
        p = plain.get((r["case"], r["dtype"], r["backend"].split(":")[0]))
        if p is not None and "fwd_bwd_ms" in r:
            r["extra"] = {"time/plain": round(r["fwd_bwd_ms"] / p["fwd_bwd_ms"], 3)}
            if p["peak_mb"]:
                r["extra"]["peak/plain"] = round(r["peak_mb"] / p["peak_mb"], 3)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    perm = torch.roll(torch.arange(opts.heads or cfg["heads"]), 1)  # every query head reads another head's k, v, r
    rows = []
    for case, dtype_name, inputs, _ in attention_cases(opts, cfg, device):
        fns, reasons = {}, {}
        for backend in opts.backends or cfg["backends"]:
            more_fns, more_reasons = variants(backend, device, perm)
            fns.update(more_fns)
            reasons.update(more_reasons)
        rows += measure_ops(NAME, case, dtype_name, fns, inputs, device, opts.repeats, reasons)
    add_plain_ratios(rows)
    return rows
