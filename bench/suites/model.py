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

from bench.harness import failure_row, peak_memory, time_interleaved
from memtx_ops.nn import TransformerXL

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
    torch.manual_seed(0)
    model = TransformerXL(cfg["vocab"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=cfg["d_model"],
                          d_head=cfg["d_model"] // cfg["n_head"], d_inner=cfg["d_inner"], dropout=0.1,
                          mem_len=L, backend=backend,
                          dropout_backend="torch" if backend == "reference" else "auto").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg["vocab"], (B, L + 1), device=device)
    with torch.no_grad(), autocast:
        _, memory = model(tokens[:, :-1])  # a full memory of L positions

    forward = torch.compile(model, fullgraph=True) if compiled else model

    def train_step():
        with autocast:
            loss, _ = forward(tokens[:, :-1], memory, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()  # creates the optimiser state
    return train_step


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
        steps = {backend: train_step_of(backend, cfg, B, L, device, autocast)
                 for backend in opts.backends or cfg["backends"]}
        timings, failed = time_interleaved({b: {"fwd_bwd_ms": step} for b, step in steps.items()}, device,
                                           opts.repeats)
        for backend, step in steps.items():
            if backend in failed:
                rows.append(failure_row(NAME, case, backend, dtype_name, failed[backend]))
                continue
            timing = timings[backend]["fwd_bwd_ms"]
            row = dict(op=NAME, case=case, backend=backend, dtype=dtype_name, **timing.fields("fwd_bwd_ms"),
                       peak_mb=peak_memory(step, device) / 2**20)
            row["extra"] = {"tokens/s": f"{B * L / timing.median:.0f} ({B * L / timing.high:.0f}-"
                                        f"{B * L / timing.low:.0f})"}
            rows.append(row)
            print(f"  {case} {dtype_name} {backend}: {row['extra']['tokens/s']} tokens/s", flush=True)
        del steps
    return rows
