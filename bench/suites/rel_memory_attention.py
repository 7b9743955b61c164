"""Bench suite: relative-position memory attention, every backend against the eager Transformer-XL code.

FLOP convention (TFLOP/s column): matmuls over visible (query, key) pairs only, 2*D flops per pair
and matmul; forward = 3 matmuls (content q.k, position q.r, p.v), backward = 8 (recomputed content and
position, dv, dp, dq content, dk, dq position, dr). SDPA (no position term) is counted with 2 and 5.
"""

from __future__ import annotations

import torch

import memtx_ops
from bench.harness import attention_cases, measure_ops

NAME = "rel_memory_attention"
BASELINE = "reference"


def default_config(device):
    if device.type == "cuda":
        return dict(batch=4, heads=16, lengths=[512, 1024, 2048, 4096], head_dims=[64, 128], dtypes=["bfloat16"],
                    backends=["reference", "triton", "cuda", "flex_table", "sdpa_flash"])
    return dict(batch=2, heads=8, lengths=[256, 512, 1024], head_dims=[64], dtypes=["float32"],
                backends=["reference", "cpu"])


def visible_pairs(L: int, M: int, window=None) -> int:
    if window is None:
        return L * M + L * (L + 1) // 2
    return sum(min(window, M + i + 1) for i in range(L))


def _flex_table_fn():
    """FlexAttention with the position scores precomputed as a [B, H, L, K] table read in score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from memtx_ops.reference import rel_shift

    compiled = torch.compile(flex_attention)
    cache = {}

    def fn(q, k, v, r, u, vb):
        B, H, L, D = q.shape
        K = k.shape[2]
        M = K - L
        if (L, K) not in cache:
            cache[(L, K)] = create_block_mask(lambda b, h, i, j: j <= M + i, None, None, L, K, device=q.device)
        table = rel_shift(torch.einsum("bhid,hjd->bhij", q + vb[None, :, None], r.flip(1)))

        def score_mod(score, b, h, i, j):
            return score + table[b, h, i, j] * D ** -0.5

        return compiled(q + u[None, :, None], k, v, score_mod=score_mod, block_mask=cache[(L, K)])

    return fn


def _sdpa_flash(q, k, v, r, u, vb):
    """The ceiling: SDPA's flash backend on the same shapes, without the position term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    L, K = q.shape[2], k.shape[2]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        # Bottom-right causal alignment equals "j <= M + i"; flash needs it expressed as a causal bias.
        from torch.nn.attention.bias import causal_lower_right

        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, K))


def backend_fn(name, device):
    """(a callable (q, k, v, r, u, vb) -> out for a backend or baseline name, None) or (None, why it cannot run)."""
    if name == "flex_table":
        return (_flex_table_fn(), None) if device.type == "cuda" else (None, "FlexAttention baseline: GPU only")
    if name == "sdpa_flash":
        return (_sdpa_flash, None) if device.type == "cuda" else (None, "SDPA flash baseline: GPU only")
    if name not in memtx_ops.BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}")
    if name not in ("auto", "reference"):
        from memtx_ops.backends import BACKENDS

        reason = BACKENDS[name].unavailable_reason(device)
        if reason is not None:
            return None, reason
    return (lambda q, k, v, r, u, vb: memtx_ops.rel_memory_attention(q, k, v, r, u, vb, backend=name)), None


def run(opts):
    device = opts.device
    cfg = default_config(device)
    rows = []
    for case, dtype_name, inputs, (B, H, L, D) in attention_cases(opts, cfg, device):
        pairs = B * H * visible_pairs(L, L)
        fns, reasons = {}, {}
        for backend in opts.backends or cfg["backends"]:
            fns[backend], reasons[backend] = backend_fn(backend, device)
        # training_forward: on a GPU the training forward of 16-bit inputs also keeps a float32 out and takes P.V
        # exactly, for the backward's delta (memtx_ops.rel_memory_attention); inference does neither.
        for row in measure_ops(NAME, case, dtype_name, fns, inputs, device, opts.repeats, reasons,
                               training_forward=True):
            if "fwd_bwd_ms" in row:
                n_fwd, n_bwd = (2, 5) if row["backend"] == "sdpa_flash" else (3, 8)
                row["tflops"] = 2 * D * pairs * (n_fwd + n_bwd) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
            rows.append(row)
    return rows


def record_auto(rows, device):
    """Writes the faster of "triton" and "cuda" per dtype and head dim (summed fwd+bwd time over the
    lengths measured) for this GPU into memtx_ops/backends/cuda_choices.json, which backend="auto" reads."""
    import json
    from collections import defaultdict

    from memtx_ops import backends

    totals = defaultdict(lambda: defaultdict(float))
    for r in rows:
        if r["op"] == NAME and r["backend"] in ("triton", "cuda") and "fwd_bwd_ms" in r:
            totals[(r["dtype"], r["case"].split("D=")[1])][r["backend"]] += r["fwd_bwd_ms"]
    choices = {k: dict(v) for k, v in backends.cuda_choices().items()}
    gpu = choices.setdefault(torch.cuda.get_device_name(device), {})
    for (dtype, head_dim), by_backend in totals.items():
        if len(by_backend) == 2:  # both measured on every length
            gpu.setdefault(dtype, {})[head_dim] = min(by_backend, key=by_backend.get)
    with open(backends.CUDA_CHOICES_FILE, "w") as f:
        json.dump(choices, f, indent=1, sort_keys=True)
    backends.reload_cuda_choices()
    return backends.CUDA_CHOICES_FILE


def plot(rows, out_dir, stem):
    """fwd+bwd time and peak memory against L (= M), one figure per head dim."""
    from bench.report import plot_against

    paths = []
    for D in sorted({int(r["case"].split("D=")[1]) for r in rows if r["op"] == NAME}):
        sel = [r for r in rows if r["op"] == NAME and r["case"].endswith(f"D={D}")]
        path = plot_against(sel, NAME, lambda r: int(r["case"].split("L=M=")[1].split()[0]),
                            f"{out_dir}/{stem}-{NAME}-D{D}.png", "L = M", f"{NAME}, D={D}")
        if path:
            paths.append(path)
    return paths
