"""Bench suite: decoding with ``TransformerXL`` -- new tokens per second after a full memory.

Each measure decodes ``tokens`` greedy tokens for B sequences from a model whose memory already holds ``mem_len``
positions (evaluation mode, no grad); the time per step (one new token for each of the B sequences) and tokens/s
are reported. Rows:

- ``reference``: the eager Transformer-XL (reference attention, torch's dropout), one ``model(token, memory)`` per
  token, as a loop over the eager model decodes;
- ``cpu`` / ``auto``: the same loop with the fused attention;
- ``<backend>:generate``: ``model.generate``, which keeps every layer's projected keys and values of its memory
  (``memtx_ops.nn.generation.KeyValueCache``) and so projects only the new token at each step. Its time includes
  filling those caches from the memory once per call (one projection of the memory, as one step of the loop).
"""

from __future__ import annotations

import itertools

import torch

from bench.harness import BENCH_ERRORS, describe_error, failure_row, time_interleaved
from memtx_ops.nn import TransformerXL

NAME = "generation"
BASELINE = "reference"
RATIO_FIELD = "step_ms"


def default_config(device):
    cfg = dict(batch=8, memories=[640, 3800], tokens=16, n_layer=4, n_head=4, d_model=256, d_inner=1024, vocab=256)
    if device.type == "cuda":
        cfg.update(n_layer=8, n_head=8, d_model=512, d_inner=2048, dtypes=["bfloat16"],
                   backends=["reference", "auto", "auto:generate"])
    else:
        cfg.update(dtypes=["float32"], backends=["reference", "cpu", "cpu:generate"])
    return cfg


def decoder(label, cfg, B, M, device, dtype):
    """A measure decoding ``cfg["tokens"]`` tokens the way ``label`` names, from a memory of ``M`` positions."""
    backend, _, mode = label.partition(":")
    torch.manual_seed(0)
    model = TransformerXL(cfg["vocab"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=cfg["d_model"],
                          d_head=cfg["d_model"] // cfg["n_head"], d_inner=cfg["d_inner"], dropout=0.0, mem_len=M,
                          backend=backend, dropout_backend="torch" if backend == "reference" else "auto")
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        _, memory = model(torch.randint(0, cfg["vocab"], (B, M), device=device))
    first = torch.randint(0, cfg["vocab"], (B, 1), device=device)

    def generate():
        model.generate(first, cfg["tokens"], memory=memory, temperature=0.0)

    def loop():
        token, mem = first, memory
        with torch.no_grad():
            for _ in range(cfg["tokens"]):
                logits, mem = model(token, mem)
                token = logits[:, -1].argmax(-1, keepdim=True)

    return generate if mode == "generate" else loop


def run(opts):
    device = opts.device
    cfg = default_config(device)
    B = opts.batch or cfg["batch"]
    rows = []
    for M, dtype_name in itertools.product(opts.memories or cfg["memories"], opts.dtypes or cfg["dtypes"]):
        dtype = getattr(torch, dtype_name)
        case = (f"B={B} M={M} layers={cfg['n_layer']} d={cfg['d_model']} heads={cfg['n_head']}, "
                f"{cfg['tokens']} tokens")
        measures, reasons = {}, {}
        for label in opts.backends or cfg["backends"]:
            try:
                measures[label] = {"step_ms": decoder(label, cfg, B, M, device, dtype)}
            except BENCH_ERRORS as exc:
                reasons[label] = describe_error(exc)
        timings, failed = time_interleaved(measures, device, opts.repeats)
        reasons.update(failed)
        for label in opts.backends or cfg["backends"]:
            if label not in timings:
                rows.append(failure_row(NAME, case, label, dtype_name, reasons.get(label) or "not available"))
                continue
            step = timings[label]["step_ms"].per_call(cfg["tokens"])
            row = dict(op=NAME, case=case, backend=label, dtype=dtype_name, **step.fields("step_ms"))
            row["extra"] = {"tokens/s": f"{B / step.median:.0f} ({B / step.high:.0f}-{B / step.low:.0f})"}
            rows.append(row)
            print(f"  {case} {dtype_name} {label}: {row['step_ms']:.2f} ms/step, {row['extra']['tokens/s']} "
                  f"tokens/s", flush=True)
    return rows
