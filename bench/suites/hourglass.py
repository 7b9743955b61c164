"""Bench suite: a training step (forward, backward, Adam) of the hourglass Transformer-XL against the flat one of the
same depth: ``2@1 4@3 2@1`` against ``8@1`` (k = 3), same widths, every op fused.

Tokens/s counts the segment's tokens (B x L) per step; peak memory is that of one step above the model, its optimiser
state and the memory carried in (a full memory of L positions at full resolution, L / 3 at the shortened level).
Candidates run in interleaved, shuffled rounds (``bench.harness.time_interleaved``). ``--batch`` and ``--lengths``
(segment length = memory length, a multiple of 3) override the sizes.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from bench.harness import lm_training_step, measure_training_steps
from memtx_ops.nn import HourglassTransformerXL, TransformerXL

NAME = "hourglass"
LAYOUT = "2@1 4@3 2@1"
BASELINE = "flat 8@1"


def default_config(device):
    cfg = dict(batches=[4, 8], length=384, n_head=4, d_model=256, d_inner=1024, vocab=256, dtypes=["float32"])
    if device.type == "cuda":
        cfg.update(batches=[8], length=1536, n_head=8, d_model=512, d_inner=2048, dtypes=["bfloat16"])
    return cfg


def make_model(name, cfg, L):
    shape = dict(n_head=cfg["n_head"], d_model=cfg["d_model"], d_head=cfg["d_model"] // cfg["n_head"],
                 d_inner=cfg["d_inner"], dropout=0.1, mem_len=L)
    if name == BASELINE:
        return TransformerXL(cfg["vocab"], n_layer=8, **shape)
    return HourglassTransformerXL(cfg["vocab"], layout=LAYOUT, **shape)


def train_step_of(name, cfg, B, L, device, autocast):
    """A training step of a fresh ``name`` model with a full memory (:func:`bench.harness.lm_training_step`)."""
    torch.manual_seed(0)
    return lm_training_step(make_model(name, cfg, L).to(device), cfg["vocab"], B, L, device, autocast)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    L = (opts.lengths or [cfg["length"]])[0]
    rows = []
    batches = [opts.batch] if opts.batch else cfg["batches"]
    for B, dtype_name in itertools.product(batches, opts.dtypes or cfg["dtypes"]):
        autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype_name)) if dtype_name != "float32"
                    else contextlib.nullcontext())
        case = f"B={B} L=M={L} d={cfg['d_model']} heads={cfg['n_head']} k=3"
        steps = {name: train_step_of(name, cfg, B, L, device, autocast) for name in (BASELINE, f"hourglass {LAYOUT}")}
        rows += measure_training_steps(NAME, case, dtype_name, steps, B * L, device, opts.repeats)
        del steps
    return rows
