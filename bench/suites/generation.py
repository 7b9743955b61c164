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

Evaluation cases score ``segments`` segments of ``segment`` tokens of one stream (B=1, as the example's test split)
after a full memory, under no grad: ``reference`` and ``cpu`` as ``model(x, memory, y)``; ``cpu:kv_caches`` with
``kv_caches=model.new_kv_caches()`` passed to every segment (time per step: per segment).

Hourglass cases decode the same way with ``HourglassTransformerXL`` (layout ``2@1 4@3 2@1``, 8 layers; the memory
rounded down to a multiple of its largest factor, 3): ``reference`` / ``cpu`` loop over ``model(group, memory)`` per
token, the token's group of 3 so far padded to a whole one (the memory advancing once the group is complete), as
decoding a model whose memory holds whole groups takes without ``generate``; ``cpu:generate`` is ``model.generate``
(the group decoded against the cached keys, then forgotten until it is complete); ``flat 8@1:generate`` decodes the
flat ``TransformerXL`` of the same depth and memory with ``generate``, for scale.
"""

from __future__ import annotations

import itertools

import torch

from bench.harness import BENCH_ERRORS, describe_error, failure_row, lm_model, time_interleaved
from memtx_ops.nn.hourglass import parse_layout

NAME = "generation"
BASELINE = "reference"
RATIO_FIELD = "step_ms"
HOURGLASS_LAYOUT = "2@1 4@3 2@1"
FLAT = "flat 8@1"  # label of the flat model of the hourglass's depth


def default_config(device):
    cfg = dict(batch=8, memories=[640, 3800], tokens=16, segment=128, segments=8, n_layer=4, n_head=4, d_model=256,
               d_inner=1024, vocab=256, layout=HOURGLASS_LAYOUT)
    fused = "auto" if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        cfg.update(n_layer=8, n_head=8, d_model=512, d_inner=2048, dtypes=["bfloat16"])
    else:
        cfg.update(dtypes=["float32"])
    cfg.update(backends=["reference", fused, f"{fused}:generate"],
               eval_backends=["reference", fused, f"{fused}:kv_caches"],
               hourglass_backends=["reference", fused, f"{fused}:generate", f"{FLAT}:generate"])
    return cfg


def model_with_memory(backend, cfg, B, M, device, dtype, layout=None):
    """(a fresh model in eval mode whose attention runs ``backend``, of ``layout`` if given, a full memory of ``M``
    positions)."""
    model = lm_model(cfg, backend, M, 0.0, device, dtype, layout).eval()
    with torch.no_grad():
        _, memory = model(torch.randint(0, cfg["vocab"], (B, M), device=device))
    return model, memory


def evaluator(label, cfg, M, device, dtype):
    """A measure scoring ``cfg["segments"]`` segments of one stream the way ``label`` names, after a memory of M."""
    backend, _, mode = label.partition(":")
    model, memory = model_with_memory(backend, cfg, 1, M, device, dtype)
    n = cfg["segment"]
    stream = torch.randint(0, cfg["vocab"], (1, n * cfg["segments"] + 1), device=device)

    def score():
        mem, caches = memory, model.new_kv_caches() if mode == "kv_caches" else None
        with torch.no_grad():
            for start in range(0, n * cfg["segments"], n):
                loss, mem = model(stream[:, start:start + n], mem, stream[:, start + 1:start + n + 1],
                                  kv_caches=caches)
        loss.item()
    return score


def decoding(model, memory, mode, cfg, B, device):
    """A measure decoding ``cfg["tokens"]`` greedy tokens after ``memory``: ``model.generate`` (``mode``
    "generate"), else a loop of ``model(group, memory)`` per token, the token's group of ``model.segment_multiple``
    so far padded to a whole one and the memory advancing once it is complete (groups of 1: a forward per token)."""
    first = torch.randint(0, cfg["vocab"], (B, 1), device=device)
    if mode == "generate":
        return lambda: model.generate(first, cfg["tokens"], memory=memory, temperature=0.0)
    F = model.segment_multiple

    def loop():
        token, mem, group = first, memory, first[:, :0]
        with torch.no_grad():
            for _ in range(cfg["tokens"]):
                group = torch.cat([group, token], 1)
                padded = torch.cat([group, group[:, -1:].expand(B, F - group.shape[1])], 1)
                logits, after = model(padded, mem)
                token = logits[:, group.shape[1] - 1].argmax(-1, keepdim=True)
                if group.shape[1] == F:
                    mem, group = after, group[:, :0]
    return loop


def decoder(label, cfg, B, M, device, dtype):
    """A measure decoding ``cfg["tokens"]`` tokens the way ``label`` names, from a memory of ``M`` positions."""
    backend, _, mode = label.partition(":")
    model, memory = model_with_memory(backend, cfg, B, M, device, dtype)
    return decoding(model, memory, mode, cfg, B, device)


def hourglass_decoder(label, cfg, B, M, device, dtype):
    """A measure decoding ``cfg["tokens"]`` tokens with the hourglass model the way ``label`` names (or the flat one
    of its depth), from a memory of ``M`` positions (a multiple of the largest factor)."""
    backend, _, mode = label.partition(":")
    if backend == FLAT:
        depth = sum(layers for layers, _ in parse_layout(cfg["layout"]))
        fused = "auto" if device.type == "cuda" else "cpu"
        model, memory = model_with_memory(fused, dict(cfg, n_layer=depth), B, M, device, dtype)
    else:
        model, memory = model_with_memory(backend, cfg, B, M, device, dtype, cfg["layout"])
    return decoding(model, memory, mode, cfg, B, device)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    B = opts.batch or cfg["batch"]
    rows = []
    shape = f"layers={cfg['n_layer']} d={cfg['d_model']} heads={cfg['n_head']}"
    for M, dtype_name in itertools.product(opts.memories or cfg["memories"], opts.dtypes or cfg["dtypes"]):
        dtype = getattr(torch, dtype_name)
        rows += measure_rows(f"decoding B={B} M={M} {shape}, {cfg['tokens']} tokens", opts.backends or cfg["backends"],
                             lambda label: decoder(label, cfg, B, M, device, dtype), cfg["tokens"], B, dtype_name,
                             opts)
        rows += measure_rows(f"evaluation B=1 M={M} L={cfg['segment']} {shape}, {cfg['segments']} segments",
                             cfg["eval_backends"], lambda label: evaluator(label, cfg, M, device, dtype),
                             cfg["segments"], cfg["segment"], dtype_name, opts)
        M_groups = M - M % max(factor for _, factor in parse_layout(cfg["layout"]))
        rows += measure_rows(f"hourglass {cfg['layout']} decoding B={B} M={M_groups} d={cfg['d_model']} "
                             f"heads={cfg['n_head']}, {cfg['tokens']} tokens", cfg["hourglass_backends"],
                             lambda label: hourglass_decoder(label, cfg, B, M_groups, device, dtype), cfg["tokens"],
                             B, dtype_name, opts)
    return rows


def measure_rows(case, labels, make, steps, tokens_per_step, dtype_name, opts):
    """Rows of the measures ``make(label)`` (each ``steps`` steps of ``tokens_per_step`` tokens) timed in
    interleaved rounds: the time per step and tokens/s; a label that fails is a row with the reason."""
    measures, reasons = {}, {}
    for label in labels:
        try:
            measures[label] = {"step_ms": make(label)}
        except BENCH_ERRORS as exc:
            reasons[label] = describe_error(exc)
    timings, failed = time_interleaved(measures, opts.device, opts.repeats)
    reasons.update(failed)
    rows = []
    for label in labels:
        if label not in timings:
            rows.append(failure_row(NAME, case, label, dtype_name, reasons.get(label) or "not available"))
            continue
        step = timings[label]["step_ms"].per_call(steps)
        row = dict(op=NAME, case=case, backend=label, dtype=dtype_name, **step.fields("step_ms"))
        n = tokens_per_step
        row["extra"] = {"tokens/s": f"{n / step.median:.0f} ({n / step.high:.0f}-{n / step.low:.0f})"}
        rows.append(row)
        print(f"  {case} {dtype_name} {label}: {row['step_ms']:.2f} ms/step, {row['extra']['tokens/s']} tokens/s",
              flush=True)
    return rows
