"""Shared test helpers: random inputs, the float64 reference, SPEC tolerances, the feature/shape grid."""

from __future__ import annotations

import dataclasses
import socket
from typing import Optional, Sequence

import torch

from memtx_ops import reference

# SPEC "Tolerances against a float64 reference": relative L2 error of outputs and every gradient.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD_NAMES = ("dq", "dk", "dv", "dr", "du", "dvb")


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: q [B, H, L, D], k/v [B, Hk, M+L, D], r [Hk, R, D] and the op's options."""

    B: int = 2
    H: int = 4
    Hk: Optional[int] = None  # defaults to H
    L: int = 16
    M: int = 8
    D: int = 16
    R: Optional[int] = None  # defaults to M + L (+ mem_offset)
    window: Optional[int] = None
    mem_offset: int = 0
    kv_head_index: Optional[Sequence[int]] = None
    scale: Optional[float] = None

    @property
    def kv_heads(self) -> int:
        return self.Hk if self.Hk is not None else self.H

    @property
    def rows(self) -> int:
        return self.R if self.R is not None else self.M + self.L + self.mem_offset

    def kwargs(self, device="cpu"):
        idx = None if self.kv_head_index is None else torch.tensor(self.kv_head_index, device=device)
        return dict(kv_head_index=idx, window=self.window, mem_offset=self.mem_offset, scale=self.scale)

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default or f.name in ("L", "M", "D")]
        return ",".join(fields)


def make_inputs(case: Case, dtype=torch.float32, device="cpu", strided=False, seed=None):
    """Fresh random (q, k, v, r, u, vb), leaves requiring grad.

    ``strided=True`` returns q, k, v as views of one fused projection [B, L|K, 3, H, D] (last dim
    contiguous, other strides not) -- the layout of a fused qkv linear layer.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    B, H, Hk, L, K, D = case.B, case.H, case.kv_heads, case.L, case.M + case.L, case.D
    if strided:
        q = rnd(B, L, 3, H, D)[:, :, 1].transpose(1, 2)
        kv = rnd(B, K, 3, Hk, D)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 2].transpose(1, 2)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    else:
        q, k, v = (rnd(*s).requires_grad_() for s in ((B, H, L, D), (B, Hk, K, D), (B, Hk, K, D)))
    r = rnd(Hk, case.rows, D).requires_grad_()
    u = (0.5 * rnd(H, D)).requires_grad_()
    vb = (0.5 * rnd(H, D)).requires_grad_()
    return q, k, v, r, u, vb


def reference_float64(inputs, grad_out, case: Case):
    """Output and the six gradients of the float64 reference."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    out = reference.rel_memory_attention(*leaves, **case.kwargs(inputs[0].device))
    grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64))
    return out, grads


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64; NaN anywhere gives NaN (which never passes)."""
    x, ref = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_matches_reference(fn, case: Case, dtype, device="cpu", strided=False, tolerance=None):
    """Runs ``fn(q, k, v, r, u, vb, **case.kwargs())`` forward and backward and compares the output and
    all six gradients with the float64 reference within the SPEC tolerance of ``dtype``."""
    inputs = make_inputs(case, dtype, device, strided)
    out = fn(*inputs, **case.kwargs(device))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    errors = {"out": rel_error(out, ref_out)}
    errors.update({n: rel_error(g, rg) for n, g, rg in zip(GRAD_NAMES, grads, ref_grads)})
    bad = {n: e for n, e in errors.items() if not e <= tol}  # `not <=` also catches NaN
    assert not bad, f"{case} {dtype}: relative errors above {tol}: {bad} (all: {errors})"
    for name, g, t in zip(GRAD_NAMES, grads, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {g.shape}/{g.dtype} vs {t.shape}/{t.dtype}"


# The feature grid every backend runs. Sizes cross the CPU query tiles (32) and typical GPU tiles.
FEATURE_CASES = [
    Case(B=1, H=2, L=5, M=3, D=16),
    Case(B=2, H=2, L=70, M=0, D=32),  # no memory
    Case(B=2, H=4, L=67, M=200, D=64),  # K not a multiple of any block
    Case(B=1, H=2, L=130, M=300, D=16, window=97),  # window: whole key blocks skipped
    Case(B=1, H=2, L=40, M=90, D=32, window=2),  # the query and one key before it
    Case(B=2, H=2, L=33, M=70, D=16, mem_offset=48),  # aged memory (skip-retain)
    Case(B=1, H=2, L=50, M=80, D=16, R=20),  # clamp: distances >= 19 read row 19
    Case(B=1, H=2, L=9, M=17, D=16, R=300),  # R > K: unused rows get zero gradient
    Case(B=2, H=4, Hk=2, L=45, M=60, D=32),  # GQA: dk, dv, dr sum over query heads
    Case(B=1, H=4, Hk=1, L=30, M=40, D=16),  # MQA
    Case(B=2, H=4, L=37, M=50, D=16, kv_head_index=(2, 0, 3, 1)),  # cross-head permutation
    Case(B=1, H=4, Hk=2, L=20, M=33, D=16, kv_head_index=(1, 1, 1, 0)),  # arbitrary map
    Case(B=1, H=2, L=70, M=130, D=16, window=60, mem_offset=70, R=100, kv_head_index=(1, 0)),  # everything
    Case(B=1, H=2, L=64, M=64, D=128, scale=0.3),
]


def assert_strided_inputs_reach_backend(backend: str, fn, dtype, device, monkeypatch):
    """Strided q, k, v (views of a fused projection) reach ``backend``'s forward as they are, uncopied."""
    from memtx_ops.backends import BACKENDS

    q, k, v, r, u, vb = (t.detach() for t in make_inputs(Case(B=1, H=2, L=8, M=8, D=16), dtype, device, strided=True))
    assert not q.is_contiguous() and not k.is_contiguous()
    seen = {}
    forward = BACKENDS[backend].forward

    def spy(*args):
        seen.update(q=args[0].data_ptr(), k=args[1].data_ptr(), v=args[2].data_ptr())
        return forward(*args)

    monkeypatch.setattr(BACKENDS[backend], "forward", spy)
    fn(q, k, v, r, u, vb)
    assert seen == dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr())


def assert_opcheck_passes(backend: str, dtype, device):
    """``torch.library.opcheck`` on the forward and backward custom ops with ``backend``."""
    q, k, v, r, u, vb = make_inputs(Case(B=1, H=2, L=9, M=7, D=16, window=10, mem_offset=3), dtype, device)
    idx = torch.tensor([1, 0], device=device)
    options = (idx, 10, 3, 0.25, backend)
    torch.library.opcheck(torch.ops.memtx_ops.rel_memory_attention, (q, k, v, r, u, vb, *options))
    out, lse = torch.ops.memtx_ops.rel_memory_attention(q, k, v, r, u, vb, *options)
    tensors = [t.detach() for t in (torch.randn_like(out), q, k, v, r, u, vb, out, lse)]  # no double backward
    torch.library.opcheck(torch.ops.memtx_ops.rel_memory_attention_backward, (*tensors, *options))


def assert_compiled_matches_eager(fn, case: Case, dtype, device, window, compile_backend="inductor", **close):
    """``torch.compile(fullgraph=True)`` of ``fn(...).sum()`` gives the eager gradients."""
    inputs = make_inputs(case, dtype, device)
    compiled = torch.compile(lambda *t: fn(*t, window=window).float().sum(), fullgraph=True, backend=compile_backend)
    compiled(*inputs).backward()
    eager_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*eager_inputs, window=window).float().sum().backward()
    for a, b in zip(inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad, **close)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a multi-process gloo group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_by_autograd(fn):
    """Runs ``fn()`` under a saved-tensors hook: -> (its result, the tensors autograd saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def assert_compiled_dropout_matches_eager(op, monkeypatch, p=0.3):
    """``op(x, p)`` (a memtx dropout) under ``torch.compile(fullgraph=True)`` draws the masks eager does from the
    same generator state: equal gradients, some of them dropped."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the seed from torch's generator, as in eager
    x = torch.randn(8, 300, requires_grad=True)
    compiled = torch.compile(lambda t: (op(t, p) * 2).sum(), fullgraph=True)
    torch.manual_seed(0)
    compiled(x).backward()
    eager_x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    (op(eager_x, p) * 2).sum().backward()
    assert torch.equal(x.grad, eager_x.grad) and (x.grad == 0).any()
