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

from bench.harness import failure_row, peak_memory, time_interleaved
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
    """A training step of a fresh ``name`` model with a full memory; its optimiser state is created by one step."""
    torch.manual_seed(0)
    model = make_model(name, cfg, L).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg["vocab"], (B, L + 1), device=device)
    with torch.no_grad(), autocast:
        _, memory = model(tokens[:, :-1])

    def train_step():
        with autocast:
            loss, _ = model(tokens[:, :-1], memory, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()
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
        case = f"B={B} L=M={L} d={cfg['d_model']} heads={cfg['n_head']} k=3"
        steps = {name: train_step_of(name, cfg, B, L, device, autocast) for name in (BASELINE, f"hourglass {LAYOUT}")}
        timings, failed = time_interleaved({n: {"fwd_bwd_ms": s} for n, s in steps.items()}, device, opts.repeats)
        for name, step in steps.items():
            if name in failed:
                rows.append(failure_row(NAME, case, name, dtype_name, failed[name]))
                continue
            timing = timings[name]["fwd_bwd_ms"]
            row = dict(op=NAME, case=case, backend=name, dtype=dtype_name, **timing.fields("fwd_bwd_ms"),
                       peak_mb=peak_memory(step, device) / 2**20)
            row["extra"] = {"tokens/s": f"{B * L / timing.median:.0f} ({B * L / timing.high:.0f}-"
                                        f"{B * L / timing.low:.0f})"}
            rows.append(row)
            print(f"  {case} {dtype_name} {name}: {row['extra']['tokens/s']} tokens/s, "
                  f"peak {row['peak_mb']:.1f} MiB", flush=True)
        del steps
    return rows
