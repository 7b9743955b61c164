"""Helpers shared by the Triton kernels: tile loads, the relative-position band of a tile, visibility, configs.

Inside a tile of ``BLOCK_M`` queries ``[i0, i0 + BLOCK_M)`` by ``BLOCK_N`` keys ``[j0, j0 + BLOCK_N)`` the
distances ``M + i - j + offset`` form a band of ``BLOCK_M + BLOCK_N - 1`` consecutive values. Window row ``w``
holds r row ``clamp(dmax - w, 0, R - 1)`` with ``dmax`` the tile's largest distance, so query ``ii`` and key
``jj`` meet at window row ``BLOCK_M - 1 - ii + jj``: the position term of the tile is one matmul of the biased
queries against the window followed by that per-row shift (``tl.gather``), and its gradient is the inverse shift.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import interpreter_enabled

# Under TRITON_INTERPRET=1 every config is one kernel run of numpy: one small tile keeps the tests fast
# while the test shapes still cross several blocks.
INTERPRETER_BLOCK = 32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``. float32: ``"tf32"`` where torch allows TF32 for CUDA matmuls, else
    ``"tf32x3"`` (three TF32 products: float32 accuracy, 1e-4 in SPEC terms, on the tensor cores; IEEE dots would
    run on the CUDA cores). Read through torch's new ``fp32_precision`` API (reading the legacy ``allow_tf32``
    after a user set the new one raises), or the legacy flag on a torch without it. 16-bit inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    allowed = precision == "tf32" if precision is not None else matmul.allow_tf32
    return "tf32" if allowed else "tf32x3"


def dtype_kind(dtype: torch.dtype) -> str:
    """The config table of a dtype: ``"fp32"`` (twice the shared memory per tile) or ``"16bit"``."""
    return "fp32" if dtype == torch.float32 else "16bit"


def tile_config(block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2) -> triton.Config:
    """A ``BLOCK_M`` x ``BLOCK_N`` tile; ``BLOCK_W``: the power of two holding its ``BLOCK_M + BLOCK_N - 1`` r rows."""
    block_w = triton.next_power_of_2(block_m + block_n - 1)
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_W": block_w}, num_warps=num_warps, num_stages=num_stages
    )


def table_configs(gpu_tables, make_config=tile_config):
    """``[(dtype kind, largest BLOCK_D, config)]`` of ``gpu_tables`` = ``{dtype kind: {largest BLOCK_D: [make_config
    arguments, ...]}}`` (the AOT check compiles exactly these)."""
    return [(kind, bound, make_config(*row)) for kind, table in gpu_tables.items() for bound in sorted(table)
            for row in table[bound]]


def autotune_tiles(gpu_tables, make_config=tile_config, key=("BLOCK_D",), reset_to_zero=None):
    """``triton.autotune`` over the configs of ``gpu_tables`` (:func:`table_configs`) that fit the call: the table of
    the inputs' dtype kind (:func:`dtype_kind` of the first tensor argument), the row of the smallest bound ``>=
    BLOCK_D``. ``key`` names the arguments whose values select a tuning result (with the dtypes): every constexpr
    that changes a kernel's resources belongs there. ``reset_to_zero`` names every buffer that a run adds to, or
    fills in parts that depend on the config (slots per block): the autotuner zeroes them before each trial and
    before the real run. Under the interpreter there is exactly one config: ``make_config(32, 32)``.
    """
    key = list(key)
    if interpreter_enabled():
        return triton.autotune([make_config(INTERPRETER_BLOCK, INTERPRETER_BLOCK)], key=key,
                               reset_to_zero=reset_to_zero)
    tagged = table_configs(gpu_tables, make_config)

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        kind = dtype_kind(next(a for a in named_args.values() if isinstance(a, torch.Tensor)).dtype)
        bounds = sorted(gpu_tables[kind])
        bound = next((b for b in bounds if b >= block_d), bounds[-1])
        return [config for k, b, config in tagged if k == kind and b == bound]

    return triton.autotune(
        [config for _, _, config in tagged], key=key, prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )


def on_device(t: torch.Tensor):
    """The context that launches kernels on ``t``'s GPU (which need not be the current one); nothing on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Triton specialises an integer argument divisible by 16 (and a 16-byte aligned pointer): only then can it prove the
# rows of a tile 16-byte aligned, vectorise their loads and stream them with cp.async (software pipelining).
ROW_ALIGNMENT = 16


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[..., D]``, unit last stride) as the kernels stream it: itself when its data pointer is 16-byte
    aligned and every stride is a multiple of 16 elements, else a copy whose rows are padded to a multiple of 16
    elements (a view of the first D columns; the kernels mask the rest). A stride that is not a multiple of 16 (a
    head dim such as 41, 72 or 100 in a contiguous tensor, or a view at an odd offset) would make every load
    scalar and switch off cp.async pipelining; the copy costs one pass over ``t``, the kernels re-read it many
    times. The stride of a dim of size 1 never moves a pointer: it is passed as 0 instead of copying."""
    strides = [0 if size == 1 else stride for size, stride in zip(t.shape[:-1], t.stride()[:-1])]
    if t.data_ptr() % 16 == 0 and all(stride % ROW_ALIGNMENT == 0 for stride in strides):
        return t if strides == list(t.stride()[:-1]) else t.as_strided(t.shape, (*strides, 1))
    padded = triton.cdiv(t.shape[-1], ROW_ALIGNMENT) * ROW_ALIGNMENT
    out = torch.empty(*t.shape[:-1], padded, dtype=t.dtype, device=t.device)[..., : t.shape[-1]]
    return out.copy_(t)


def smallest_block(kernel, name: str) -> int:
    """The smallest value of the constexpr ``name`` among the configs of the autotuned ``kernel``."""
    return min(config.kwargs[name] for config in kernel.configs)


@triton.jit
def load_rows(base, row0, lo, hi, stride, offs_d, mask_d, BLOCK: tl.constexpr):
    """Rows ``[row0, row0 + BLOCK)`` of a row-major ``[*, D]`` matrix (unit last stride) -> ``[BLOCK, BLOCK_D]``.

    Rows outside ``[lo, hi)`` and columns past ``D`` read 0. ``row0`` is advanced in int64.
    """
    offs = tl.arange(0, BLOCK)
    rows = row0 + offs
    ptrs = base + tl.cast(row0, tl.int64) * stride + (offs[:, None] * stride + offs_d[None, :])
    return tl.load(ptrs, mask=((rows >= lo) & (rows < hi))[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def store_rows(base, row0, hi, stride, offs_d, mask_d, value, BLOCK: tl.constexpr):
    """Stores ``value [BLOCK, BLOCK_D]`` into rows ``[row0, min(row0 + BLOCK, hi))`` and columns ``< D``."""
    offs = tl.arange(0, BLOCK)
    ptrs = base + tl.cast(row0, tl.int64) * stride + (offs[:, None] * stride + offs_d[None, :])
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=((row0 + offs) < hi)[:, None] & mask_d[None, :])


@triton.jit
def load_r_window(r_base, stride_r, dmax, R, offs_d, mask_d, BLOCK_W: tl.constexpr):
    """Window row ``w`` = r row ``clamp(dmax - w, 0, R - 1)`` (descending distance) -> ``[BLOCK_W, BLOCK_D]``."""
    rows = tl.minimum(tl.maximum(dmax - tl.arange(0, BLOCK_W), 0), R - 1)
    return tl.load(r_base + rows[:, None] * stride_r + offs_d[None, :], mask=mask_d[None, :], other=0.0)


@triton.jit
def shift_band(band, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``band [BLOCK_M, BLOCK_W]`` (query x window row) -> ``[BLOCK_M, BLOCK_N]``.

    ``out[ii, jj] = band[ii, BLOCK_M - 1 - ii + jj]``.
    """
    index = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] + tl.arange(0, BLOCK_N)[None, :]
    return tl.gather(band, index, axis=1)


@triton.jit
def unshift_band(tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Inverse of :func:`shift_band`: ``tile [BLOCK_M, BLOCK_N]`` -> ``[BLOCK_M, BLOCK_W]``, 0 off the band."""
    jj = tl.arange(0, BLOCK_W)[None, :] - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]
    on_band = (jj >= 0) & (jj < BLOCK_N)
    band = tl.gather(tile, tl.minimum(tl.maximum(jj, 0), BLOCK_N - 1), axis=1)
    return tl.where(on_band, band, 0.0)


@triton.jit
def tile_scores(qu, qv, k, r_base, stride_r, offs_d, mask_d, offs_i, i0, j0, j_lo, j_hi, offset, L, M, R, WINDOW,
                qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                PRECISION: tl.constexpr):
    """Scores of the queries ``offs_i = i0 + arange(BLOCK_M)`` against the keys ``j0 + arange(BLOCK_N)``.

    qu = q + u, qv = q + vb ``[BLOCK_M, BLOCK_D]``; k ``[BLOCK_N, BLOCK_D]``; the tile's keys lie in
    ``[j_lo, j_hi)`` and their distances carry ``offset``. -> (``qk_scale * ((q+u) k^T + (q+vb) r_dist^T)``,
    float32 ``[BLOCK_M, BLOCK_N]``, ``-inf`` where not visible; the r window ``[BLOCK_W, BLOCK_D]``).
    """
    rwin = load_r_window(r_base, stride_r, tile_top_distance(M, i0, j0, offset, BLOCK_M), R, offs_d, mask_d, BLOCK_W)
    band = tl.dot(qv, tl.trans(rwin), input_precision=PRECISION)
    content = tl.dot(qu, tl.trans(k), input_precision=PRECISION)
    return masked_scores(content, band, offs_i, j0, j_lo, j_hi, L, M, WINDOW, qk_scale, BLOCK_M, BLOCK_N), rwin


@triton.jit
def tile_top_distance(M, i0, j0, offset, BLOCK_M: tl.constexpr):
    """The largest distance of the tile of queries ``[i0, i0 + BLOCK_M)`` and keys from ``j0`` (window row 0)."""
    return M + i0 + BLOCK_M - 1 - j0 + offset


@triton.jit
def masked_scores(content, band, offs_i, j0, j_lo, j_hi, L, M, WINDOW, qk_scale, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """A tile's scores from its content part ``content`` ``[BLOCK_M, BLOCK_N]`` and its position band ``band``
    ``[BLOCK_M, BLOCK_W]`` (float32): ``qk_scale * (content + shift_band(band))``, ``-inf`` where not visible."""
    s = content + shift_band(band, BLOCK_M, BLOCK_N)
    offs_j = j0 + tl.arange(0, BLOCK_N)
    return tl.where(visible(offs_i, offs_j, L, M, j_lo, j_hi, WINDOW), s * qk_scale, float("-inf"))


@triton.jit
def visible(offs_i, offs_j, L, M, j_lo, j_hi, WINDOW):
    """SPEC ``visible(i, j)``, for queries ``offs_i < L`` and keys ``offs_j`` in ``[j_lo, j_hi)`` only -> boolean
    ``[BLOCK_M, BLOCK_N]``.

    ``WINDOW`` is the window, or anything above ``M + L`` for none.
    """
    i = offs_i[:, None]
    j = offs_j[None, :]
    return (i < L) & (j >= j_lo) & (j < j_hi) & (j <= M + i) & (j > M + i - WINDOW)
