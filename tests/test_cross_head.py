"""Cross-head attention (SPEC §2): the fused ``kv_head_index=perm`` path on every backend against the paper's
copying reference, perm validation, and the per-layer draws of ``CrossHeadPermutation`` (reproducible and
identical on every rank of a process group)."""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memtx_ops
from helpers import (GRAD_NAMES, TF32_TOLERANCE, TOLERANCE, Case, assert_close_to_reference, attention_scales,
                     gloo_group, make_inputs, spawn_ranks)
from memtx_ops import reference
from memtx_ops.backends import BACKENDS
from memtx_ops.nn import CrossHeadPermutation, SkipRetainSchedule


def backend_device(name: str) -> torch.device:
    """Where a backend is tested: CUDA for "cuda", and for "triton" when there is a GPU (else its interpreter)."""
    gpu = name == "cuda" or (name == "triton" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def backend_params():
    params = []
    for name in ("reference", "cpu", "triton", "cuda"):
        device = backend_device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            reason = None if name == "reference" else BACKENDS[name].unavailable_reason(device)
        marks = pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}") if reason else ()
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        params += [pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}") for dtype in dtypes]
    return params


def tolerance(dtype, device):
    # SPEC: float32 on a GPU is held to the TF32 tolerance.
    return TF32_TOLERANCE if dtype == torch.float32 and device.type == "cuda" else TOLERANCE[dtype]


# kv_head_index holds the permutation; fixed-point-free ones make every head read another head's k/v/r.
CASES = [
    Case(B=2, H=4, L=37, M=50, D=16, kv_head_index=(2, 0, 3, 1)),
    Case(B=1, H=4, L=70, M=130, D=32, window=60, mem_offset=70, R=100, kv_head_index=(3, 2, 0, 1)),
    Case(B=2, H=2, L=16, M=0, D=16, kv_head_index=(1, 0)),  # no memory
]


def split_perm(case: Case, device):
    """(perm, the other keyword arguments) of a case."""
    kwargs = case.kwargs(device)
    return kwargs.pop("kv_head_index"), kwargs


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_copying_reference(backend, dtype, case):
    device = backend_device(backend)
    inputs = make_inputs(case, dtype, device, seed=0)
    perm, kwargs = split_perm(case, device)
    out = memtx_ops.cross_head_attention(*inputs, perm, backend=backend, **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)

    leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    ref = reference.cross_head_attention(*leaves, perm, **kwargs)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.to(torch.float64))

    got = dict(zip(("out",) + GRAD_NAMES, (out,) + grads))
    want = dict(zip(("out",) + GRAD_NAMES, (ref,) + ref_grads))
    assert_close_to_reference(got, want, dtype, tolerance(dtype, device),
                              **attention_scales(*inputs[:4], grad_out, case.scale), context=f"{backend} {case}")


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_gradients_land_on_permuted_heads(backend, dtype):
    """A gradient on query head h only: k, v, r gradients on head perm[h] only; q, u, vb on head h only."""
    case = Case(B=1, H=4, L=16, M=8, D=16, kv_head_index=(2, 0, 3, 1))
    device = backend_device(backend)
    inputs = make_inputs(case, dtype, device, seed=1)
    perm, kwargs = split_perm(case, device)
    out = memtx_ops.cross_head_attention(*inputs, perm, backend=backend, **kwargs)
    for h in range(case.H):
        grad_out = torch.zeros_like(out)
        grad_out[:, h] = 1
        dq, dk, dv, dr, du, dvb = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
        for name, grad, head_dim, head in (("dq", dq, 1, h), ("du", du, 0, h), ("dvb", dvb, 0, h),
                                           ("dk", dk, 1, perm[h]), ("dv", dv, 1, perm[h]), ("dr", dr, 0, perm[h])):
            per_head = grad.abs().transpose(0, head_dim).flatten(1).sum(1)
            nonzero = per_head.nonzero().flatten().tolist()
            assert nonzero == [int(head)], f"{backend}: with a gradient on query head {h}, {name} lands on heads {nonzero}"


def test_plain_attention_when_perm_is_identity():
    case = Case(B=1, H=4, L=20, M=30, D=16)
    inputs = make_inputs(case, seed=2)
    out = memtx_ops.cross_head_attention(*inputs, torch.arange(4), backend="cpu")
    assert torch.equal(out, memtx_ops.rel_memory_attention(*inputs, backend="cpu"))


@pytest.mark.parametrize("perm,error,match", [
    ([1, 0, 3, 2], TypeError, "int32 or int64 tensor"),
    (torch.tensor([1.0, 0.0, 3.0, 2.0]), TypeError, "dtype int32 or int64"),
    (torch.tensor([[1, 0], [3, 2]]), ValueError, r"shape \[H\]"),
    (torch.tensor([1, 0, 1, 2]), ValueError, "permutation of range"),
    (torch.tensor([1, 0, 4, 2]), ValueError, "permutation of range"),
    (torch.tensor([-1, 0, 1, 2]), ValueError, "permutation of range"),
    (torch.tensor([1, 0, 2]), ValueError, "H=3 heads but q has 4"),
], ids=["list", "float", "2d", "repeated", "too-large", "negative", "wrong-length"])
def test_perm_validation(perm, error, match):
    inputs = make_inputs(Case(B=1, H=4, L=8, M=4, D=16), seed=3)
    with pytest.raises(error, match=match):
        memtx_ops.cross_head_attention(*inputs, perm, backend="cpu")


def test_perm_on_another_device_rejected_before_its_values_are_read():
    inputs = make_inputs(Case(B=1, H=2, L=3, M=2, D=8), seed=5)
    with pytest.raises(ValueError, match="perm must be on q's device cpu, got perm on meta"):
        memtx_ops.cross_head_attention(*inputs, torch.tensor([1, 0], device="meta"))


@pytest.mark.parametrize("kind", ["meta", "fake"])
def test_perm_without_values_is_not_value_checked(kind):
    """perm on the meta device or fake (shape propagation) has no values to check: the call gives the output's
    shape instead of failing to read them."""
    inputs, perm = [t.detach() for t in make_inputs(Case(B=1, H=2, L=3, M=2, D=8), seed=6)], torch.tensor([1, 0])
    if kind == "meta":
        out = memtx_ops.cross_head_attention(*(t.to("meta") for t in inputs), perm.to("meta"))
    else:
        with FakeTensorMode() as mode:
            out = memtx_ops.cross_head_attention(*(mode.from_tensor(t) for t in inputs), mode.from_tensor(perm))
    assert out.shape == (1, 2, 3, 8)


def test_grouped_query_heads_rejected():
    inputs = make_inputs(Case(B=1, H=4, Hk=2, L=8, M=4, D=16), seed=4)
    with pytest.raises(ValueError, match="H == Hk"):
        memtx_ops.cross_head_attention(*inputs, torch.tensor([1, 0, 3, 2]), backend="cpu")


def draws(module, n=400, heads=6):
    return [module(heads) for _ in range(n)]


def same_draws(a, b):
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                                    for x, y in zip(a, b))


def test_permutation_draws():
    module = CrossHeadPermutation(0.3, generator=torch.Generator().manual_seed(5))
    drawn = draws(module, n=4000)
    perms = [d for d in drawn if d is not None]
    # Binomial(4000, 0.3): standard deviation 29; 5 of them either side.
    assert abs(len(perms) - 1200) < 145, len(perms)
    for perm in perms:
        assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(6)), perm
    assert len({tuple(p.tolist()) for p in perms}) > 300  # 720 permutations of 6 heads, ~1200 draws

    always = CrossHeadPermutation(1.0)
    assert all(d is not None for d in draws(always, n=50))
    assert all(d is None for d in draws(CrossHeadPermutation(0.0), n=50))
    always.eval()
    assert all(d is None for d in draws(always, n=50))


def test_permutation_draws_reproducible():
    module = CrossHeadPermutation(0.5, generator=torch.Generator().manual_seed(6))
    first = draws(module)
    module.generator = torch.Generator().manual_seed(6)
    assert same_draws(draws(module), first)
    module.generator = torch.Generator().manual_seed(7)
    assert not same_draws(draws(module), first)
    torch.manual_seed(8)
    default_first = draws(CrossHeadPermutation(0.5))
    torch.manual_seed(8)
    assert same_draws(draws(CrossHeadPermutation(0.5)), default_first)


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.1", True])
def test_permutation_bad_p(p):
    with pytest.raises(ValueError, match="probability"):
        CrossHeadPermutation(p)


def test_permutation_bad_generator():
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        CrossHeadPermutation(0.1, generator=42)


# --- rank consistency: two gloo processes on the CPU ------------------------------------------------------

def seeded(rank):
    return torch.Generator().manual_seed(1000 + rank)  # a different seed on every rank


def rank_draws(rank):
    """What one rank draws: cross-head permutations of two layers, then skip decisions."""
    layers = [CrossHeadPermutation(0.5, generator=seeded(rank)) for _ in range(2)]
    schedule = SkipRetainSchedule(6, p=0.4, schedule="uniform", generator=seeded(rank))
    perms = [layer(8) for _ in range(20) for layer in layers]
    return perms, [schedule.decide(True) for _ in range(20)]


def _rank_main(rank, world_size, store_file, out_dir):
    with gloo_group(rank, world_size, store_file):
        torch.save(rank_draws(rank), os.path.join(out_dir, f"{rank}.pt"))


def test_draws_identical_on_every_rank(tmp_path):
    """Cross-head draws and skip decisions (same mechanism) agree across ranks and follow rank 0's generator."""
    spawn_ranks(_rank_main, (2, str(tmp_path / "store"), str(tmp_path)), [str(tmp_path / f"{r}.pt") for r in (0, 1)])
    (perms0, skips0), (perms1, skips1) = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert same_draws(perms0, perms1) and skips0 == skips1
    alone = {rank: rank_draws(rank) for rank in (0, 1)}  # no process group: each rank's own generator
    assert same_draws(perms0, alone[0][0]) and skips0 == alone[0][1]
    assert not same_draws(alone[0][0], alone[1][0]) and alone[0][1] != alone[1][1]  # so the broadcast mattered
