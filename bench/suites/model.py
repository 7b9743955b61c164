"""Bench suite: one training step (forward, backward, Adam) of the TransformerXL model, fused vs reference ops,
eager and under ``torch.compile(fullgraph=True)``.

Tokens/s counts the segment's tokens (B x L) per step; peak memory is that of one step above the model,
its optimiser state and the memory carried in. The model is the same in every row; only the ops differ:
"reference" is the eager Transformer-XL (reference attention, torch's dropout), the other rows run the
attention backend named and memtx_ops' dropout (its C++ Philox kernel on the CPU, torch's on CUDA). A
``:compiled`` suffix compiles the model's forward (and so its backward) whole with inductor; the optimiser step
stays eager.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from bench.harness import (BENCH_ERRORS, describe_error, failure_row, lm_model, lm_training_step,
                           measure_training_steps)

NAME = "model"
BASELINE = "reference"


def default_config(device):
    cfg = dict(batches=[2, 4, 8], length=512, n_layer=4, n_head=4, d_model=256, d_inner=1024, vocab=256)
    if device.type == "cuda":
        cfg.update(batches=[8], n_layer=8, n_head=8, d_model=512, d_inner=2048, dtypes=["bfloat16"],
                   backends=["reference", "reference:compiled", "auto", "auto:compiled"])
    else:
        cfg.update(backends=["reference", "reference:compiled", "cpu", "cpu:compiled"], dtypes=["float32"])
    return cfg


def train_step_of(label, cfg, B, L, device, autocast):
    """A training step (forward, backward, Adam) of a fresh model whose attention runs the backend of ``label``
    (compiled with a ``:compiled`` suffix), with a full memory of L positions; the optimiser state is created (and
    the model compiled) by one step here."""
    backend, _, compiled = label.partition(":")
    model = lm_model(cfg, backend, L, 0.1, device)
    forward = torch.compile(model, fullgraph=True) if compiled else None
    return lm_training_step(model, cfg["vocab"], B, L, device, autocast, forward)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    L = (opts.lengths or [cfg["length"]])[0]
    rows = []
    batches = [opts.batch] if opts.batch else cfg["batches"]
    for B, dtype_name in itertools.product(batches, opts.dtypes or cfg["dtypes"]):
        autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype_name)) if dtype_name != "float32"
                    else contextlib.nullcontext())
        case = f"B={B} L=M={L} layers={cfg['n_layer']} d={cfg['d_model']} heads={cfg['n_head']}"
        steps = {}
        for backend in opts.backends or cfg["backends"]:
            try:  # the first step compiles: a graph break under fullgraph is a row, and the other rows still run
                steps[backend] = train_step_of(backend, cfg, B, L, device, autocast)
            except BENCH_ERRORS as exc:
                rows.append(failure_row(NAME, case, backend, dtype_name, describe_error(exc)))
        rows += measure_training_steps(NAME, case, dtype_name, steps, B * L, device, opts.repeats)
        del steps
    return rows
