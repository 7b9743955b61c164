"""Bench suite: the short-query regime of evaluation and decoding (forward only, no grad).

Transformer-XL evaluates with short segments against long memories (enwik8: segment 128, memory 3800;
WikiText-103: segment 64, memory 640) and decodes one token at a time (L = 1), so the forward reads K, V and r
once and is bound by memory bandwidth. Rows per shape: the fused backend(s), the eager Transformer-XL attention
under ``torch.compile`` (``reference:compiled``) and ``sdpa``: ``scaled_dot_product_attention`` on the same q, k, v
with no position term, the ceiling; ``cpu@time-major`` (and the like) runs a backend on the same tensors laid out
time-major (:func:`time_major`), as Transformer-XL's own layer and memtx_ops' drop-in one hand them over. Ratios are
against ``sdpa`` (a speedup below 1 is the fused op's time over
SDPA's, inverted). A call takes milliseconds, so each candidate's measure is a burst of calls filling about 25 ms
(``bench.harness.burst``; the calls per round are in the row), timed in the usual interleaved rounds.
"""

from __future__ import annotations

import itertools

import torch

import memtx_ops
from bench.harness import BENCH_ERRORS, burst, describe_error, failure_row, time_interleaved
from bench.suites import rel_memory_attention

NAME = "short_query"
BASELINE = "sdpa"
RATIO_FIELD = "fwd_ms"  # forward only: the report's ratios compare forward times


def default_config(device):
    if device.type == "cuda":
        return dict(batch=8, heads=16, lengths=[1, 16, 64], memories=[640, 1600, 3800], head_dims=[64],
                    dtypes=["bfloat16"], backends=["triton", "cuda", "reference:compiled", "sdpa"])
    return dict(batch=8, heads=8, lengths=[1, 16, 64], memories=[640, 1600, 3800], head_dims=[64],
                dtypes=["float32"], backends=["cpu", "cpu@time-major", "reference:compiled", "sdpa"])


def _sdpa(q, k, v, r, u, vb):
    from torch.nn.attention.bias import causal_lower_right

    L, K = q.shape[2], k.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, K))


def time_major(q, k, v, r, u, vb):
    """The same values as views of time-major buffers: q of [L, B, H, D], k and v of one fused projection
    [K, B, 2, H, D] of ``[memory ; segment]``, r of [R, H, D]."""
    kv = torch.stack((k, v)).permute(3, 1, 0, 2, 4).contiguous()
    return (q.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3), kv[:, :, 0].permute(1, 2, 0, 3),
            kv[:, :, 1].permute(1, 2, 0, 3), r.transpose(0, 1).contiguous().transpose(0, 1), u, vb)


def candidate(name, device):
    """(fn(q, k, v, r, u, vb), None) or (None, why it cannot run here); ``name@time-major`` takes the
    :func:`time_major` layout of its inputs (laid out once, outside the measure)."""
    name, _, layout = name.partition("@")
    if layout:
        return candidate(name, device) if layout == "time-major" else (None, f"unknown layout {layout!r}")
    if name == "sdpa":
        return _sdpa, None
    if name == "reference:compiled":
        torch._dynamo.reset()  # a graph per shape, each case from a clean cache (the warm-up round compiles)
        compiled = torch.compile(memtx_ops.reference.rel_memory_attention, fullgraph=True, dynamic=False)
        return (lambda q, k, v, r, u, vb: compiled(q, k, v, r, u, vb)), None
    return rel_memory_attention.backend_fn(name, device)


def run(opts):
    device = opts.device
    cfg = default_config(device)
    B, H = opts.batch or cfg["batch"], opts.heads or cfg["heads"]
    rows = []
    for L, M, D, dtype_name in itertools.product(opts.lengths or cfg["lengths"], opts.memories or cfg["memories"],
                                                 opts.head_dims or cfg["head_dims"], opts.dtypes or cfg["dtypes"]):
        dtype = getattr(torch, dtype_name)
        inputs = [torch.randn(*shape, device=device, dtype=dtype) for shape in
                  ((B, H, L, D), (B, H, M + L, D), (B, H, M + L, D), (H, M + L, D), (H, D), (H, D))]
        case = f"B={B} H={H} L={L} M={M} D={D}"
        fns, reasons = {}, {}
        for name in opts.backends or cfg["backends"]:
            fns[name], reasons[name] = candidate(name, device)

        laid_out = {"": inputs}
        if any(name.endswith("@time-major") for name in fns):
            laid_out["time-major"] = time_major(*inputs)

        def forward(fn, layout):
            def call():
                with torch.no_grad():
                    fn(*laid_out[layout])
            return call

        bursts = {}
        for name, fn in ((n, f) for n, f in fns.items() if f is not None):
            try:
                bursts[name] = burst(forward(fn, name.partition("@")[2]), device)
            except BENCH_ERRORS as exc:
                reasons[name] = describe_error(exc)
        timings, failed = time_interleaved({n: {"fwd_ms": measure} for n, (measure, _) in bursts.items()}, device,
                                           opts.repeats)
        reasons.update(failed)
        for name in fns:
            if name not in timings:
                rows.append(failure_row(NAME, case, name, dtype_name, reasons.get(name) or "not available"))
                continue
            calls = bursts[name][1]
            row = dict(op=NAME, case=case, backend=name, dtype=dtype_name,
                       **timings[name]["fwd_ms"].per_call(calls).fields("fwd_ms"), extra={"calls/round": calls})
            rows.append(row)
            print(f"  {case} {dtype_name} {name}: fwd {row['fwd_ms']:.2f} ms "
                  f"({row['fwd_ms_range'][0]:.2f}-{row['fwd_ms_range'][1]:.2f})", flush=True)
    return rows
