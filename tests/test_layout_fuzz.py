"""Layout fuzz test: no input layout changes the result, on any backend that runs here.

Each draw picks a random problem (shape, window, memory offset, clamp, scale, head map) and, for every tensor
argument, a random layout a model may hand over: contiguous; expanded with stride 0 along any dimension; the
dimensions permuted (the last one too); a time-major buffer ``[T, B, H, D]`` or a fused projection ``[T, B, 3, H,
D]`` seen as ``[B, H, T, D]``; a slice (offset or step) along any dimension; rows padded past D; a strided last
dimension. ``kv_head_index`` comes as None, int32 or int64, contiguous, a strided view of a longer tensor whose
other entries are out of range, an offset slice, or expanded. The output and all six gradients (of the tensors
the views were taken from) are compared with the float64 reference on contiguous copies, within the SPEC's
relative L2 bound and the elementwise bound of ``helpers.reference_errors``.

Draws are fixed per test id, so CI is reproducible; ``MEMTX_FUZZ_SEED=<int>`` draws another set (the failure
message names the seed and the draw).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import memtx_ops
from helpers import GRAD_NAMES, assert_close_to_reference, attention_scales
from memtx_ops import reference
from memtx_ops._extension import extension_error
from memtx_ops.backends import BACKENDS

SEED = int(os.environ.get("MEMTX_FUZZ_SEED", "20261201"))
# (backend, dtypes, draws): the Triton interpreter is slow, so it gets fewer draws; the CPU's half precision runs its
# float32 kernels on copies, whose layouts get draws of their own.
PLAN = [("reference", (torch.float32,), 20), ("cpu", (torch.float32, torch.float64), 60),
        ("cpu", (torch.float16, torch.bfloat16), 20), ("triton", (torch.float32, torch.float16), 16)]
HEAD_DIMS = (1, 3, 8, 16, 24, 33, 40)


def unavailable(backend: str):
    if backend == "reference":
        return None
    if backend == "cpu" and extension_error() is not None:
        return extension_error()
    return BACKENDS[backend].unavailable_reason(torch.device("cpu"))


def draw_problem(rng: random.Random):
    """Sizes and options of one call."""
    H = rng.choice((1, 2, 3, 4))
    Hk = rng.choice([h for h in range(1, H + 1) if H % h == 0] + [H + 1])
    L, M, D = rng.randint(1, 48), rng.choice((0, rng.randint(1, 60))), rng.choice(HEAD_DIMS)
    K = M + L
    mem_offset = rng.choice((0, 0, rng.randint(1, 40)))
    return dict(
        B=rng.randint(1, 3), H=H, Hk=Hk, L=L, M=M, D=D,
        R=rng.choice((K + mem_offset, rng.randint(1, K + mem_offset + 10))),
        window=rng.choice((None, None, rng.randint(1, K + 5))), mem_offset=mem_offset,
        scale=rng.choice((None, round(rng.uniform(0.05, 0.5), 3))),
        head_map=None if (H % Hk == 0 and rng.random() < 0.4) else [rng.randrange(Hk) for _ in range(H)],
    )


def draw_layout(rng: random.Random, shape):
    """(name, base shape, view) such that ``view(base)`` has ``shape``."""
    n = len(shape)
    kind = rng.choice(("contiguous", "expanded", "permuted", "time_major", "fused_time_major", "sliced", "stepped",
                       "padded", "strided_last") if n == 4 else
                      ("contiguous", "expanded", "permuted", "sliced", "stepped", "padded", "strided_last"))
    if kind == "expanded":
        dim = rng.randrange(n)
        base = list(shape)
        base[dim] = 1
        return f"expanded({dim})", base, lambda t: t.expand(*shape)
    if kind == "permuted":
        order = list(range(n))
        rng.shuffle(order)
        inverse = [order.index(i) for i in range(n)]
        return f"permuted{tuple(order)}", [shape[i] for i in order], lambda t: t.permute(*inverse)
    if kind == "time_major":
        B, H, T, D = shape
        return "time_major", [T, B, H, D], lambda t: t.permute(1, 2, 0, 3)
    if kind == "fused_time_major":
        B, H, T, D = shape
        part = rng.randrange(3)
        return f"fused_time_major[{part}]", [T, B, 3, H, D], lambda t: t[:, :, part].permute(1, 2, 0, 3)
    if kind == "sliced":
        dim, offset = rng.randrange(n), rng.randint(1, 3)
        base = list(shape)
        base[dim] += offset + rng.randint(0, 2)
        return f"sliced({dim}, {offset})", base, lambda t: t.narrow(dim, offset, shape[dim])
    if kind == "stepped":
        dim = rng.randrange(n - 1)
        base = list(shape)
        base[dim] *= 2
        index = [slice(None)] * n
        index[dim] = slice(None, None, 2)
        return f"stepped({dim})", base, lambda t: t[tuple(index)]
    if kind == "padded":
        pad = rng.randint(1, 9)
        return f"padded(+{pad})", list(shape[:-1]) + [shape[-1] + pad], lambda t: t[..., : shape[-1]]
    if kind == "strided_last":
        return "strided_last", list(shape[:-1]) + [2 * shape[-1]], lambda t: t[..., ::2]
    return "contiguous", list(shape), lambda t: t


def draw_head_index(rng: random.Random, head_map, H, Hk):
    """(name, kv_head_index or None) holding ``head_map`` in a random layout."""
    if head_map is None:
        return "default", None
    dtype = rng.choice((torch.int64, torch.int32))
    kind = rng.choice(("contiguous", "stepped", "offset", "expanded"))
    values = torch.tensor(head_map, dtype=dtype)
    if kind == "stepped":  # the entries in between are out of range: read as if contiguous, they would fail
        longer = torch.full((2 * H,), Hk + 7, dtype=dtype)
        longer[::2] = values
        return f"stepped {dtype}", longer[::2]
    if kind == "offset":
        longer = torch.full((H + 3,), -5, dtype=dtype)
        longer[2:2 + H] = values
        return f"offset {dtype}", longer[2:2 + H]
    if kind == "expanded" and len(set(head_map)) == 1:
        return f"expanded {dtype}", values[:1].expand(H)
    return f"contiguous {dtype}", values


def run_draw(backend, dtype, draw):
    rng = random.Random(f"{SEED}-{backend}-{dtype}-{draw}")
    p = draw_problem(rng)
    B, H, Hk, L, M, D, R = p["B"], p["H"], p["Hk"], p["L"], p["M"], p["D"], p["R"]
    K = M + L
    shapes = dict(q=(B, H, L, D), k=(B, Hk, K, D), v=(B, Hk, K, D), r=(Hk, R, D), u=(H, D), vb=(H, D))
    layouts = {name: draw_layout(rng, shape) for name, shape in shapes.items()}
    index_name, kv_head_index = draw_head_index(rng, p["head_map"], H, Hk)
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    bases64 = {name: torch.randn(base, generator=gen, dtype=torch.float64) * (0.5 if name in ("u", "vb") else 1.0)
               for name, (_, base, _) in layouts.items()}
    options = dict(window=p["window"], mem_offset=p["mem_offset"], scale=p["scale"])
    described = (f"MEMTX_FUZZ_SEED={SEED} {backend} {dtype} draw {draw}: {p}, kv_head_index {index_name}, "
                 f"layouts {({n: l[0] for n, l in layouts.items()})}")

    bases = {n: b.to(dtype).requires_grad_() for n, b in bases64.items()}
    views = [layouts[n][2](bases[n]) for n in shapes]
    out = memtx_ops.rel_memory_attention(*views, kv_head_index=kv_head_index, backend=backend, **options)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)  # the reference's too
    grads = torch.autograd.grad(out, [bases[n] for n in shapes], grad_out)

    leaves64 = {n: b.to(dtype).to(torch.float64).requires_grad_() for n, b in bases64.items()}  # same values
    views64 = [layouts[n][2](leaves64[n]).contiguous() for n in shapes]
    index64 = None if kv_head_index is None else kv_head_index.contiguous()
    ref = reference.rel_memory_attention(*views64, kv_head_index=index64, **options)
    ref_grads = torch.autograd.grad(ref, [leaves64[n] for n in shapes], grad_out.to(torch.float64))

    got = dict(zip(("out",) + GRAD_NAMES, (out,) + grads))
    want = dict(zip(("out",) + GRAD_NAMES, (ref,) + ref_grads))
    # A base that a view expands sums the gradient over its C copies, and the kernel rounds identical copies alike
    # (an expanded D: every column of a product against those rows is the same sums in the same order), so their
    # errors add up coherently: C units, the triangle inequality's bound, not the sqrt(C) of independent ones
    # (MEMTX_FUZZ_SEED=107 cpu float32 draw 21, vb expanded 40 times along D: 56 eps of C units, 352 of sqrt(C)).
    scales = attention_scales(*views64[:4], grad_out, p["scale"])
    for view, name, grad_name in zip(views64, shapes, GRAD_NAMES):
        scales["units"][grad_name] *= max(1.0, view.numel() / bases64[name].numel())
    assert_close_to_reference(got, want, dtype, **scales, context=described)


@pytest.mark.parametrize(
    "backend,dtype,draw",
    [pytest.param(b, dt, i, id=f"{b}-{str(dt)[6:]}-{i}",
                  marks=[pytest.mark.skip(reason=str(unavailable(b)))] if unavailable(b) else [])
     for b, dtypes, n in PLAN for dt in dtypes for i in range(n)],
)
def test_layout_matches_reference(backend, dtype, draw):
    run_draw(backend, dtype, draw)
