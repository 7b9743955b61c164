"""Shared test helpers: random inputs, the float64 reference, SPEC tolerances, the feature/shape grid."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Optional, Sequence

import torch

import memtx_ops
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
    contiguous, other strides not) -- the layout of a fused qkv linear layer; ``strided="time-major"`` as views
    of [L|K, B, 3, H, D], and r as a view of [R, Hk, D] -- the layout Transformer-XL's own code hands over.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    B, H, Hk, L, K, D = case.B, case.H, case.kv_heads, case.L, case.M + case.L, case.D
    if strided:
        def projection(rows, heads):  # a fused projection seen as [B, 3, heads, rows, D]
            if strided == "time-major":
                return rnd(rows, B, 3, heads, D).permute(1, 2, 3, 0, 4)
            return rnd(B, rows, 3, heads, D).permute(0, 2, 3, 1, 4)

        qkv, kv = projection(L, H), projection(K, Hk)
        q, k, v = (t.detach().requires_grad_() for t in (qkv[:, 1], kv[:, 0], kv[:, 2]))
    else:
        q, k, v = (rnd(*s).requires_grad_() for s in ((B, H, L, D), (B, Hk, K, D), (B, Hk, K, D)))
    r = (rnd(case.rows, Hk, D).transpose(0, 1) if strided == "time-major" else rnd(Hk, case.rows, D)).requires_grad_()
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


# Elementwise bound, beside the SPEC's relative L2 error: |x - ref| <= ELEMENT_ULPS * eps * scale elementwise,
# scale = max |ref| of the tensor. The L2 error of a whole tensor lets one element of a large fp16/bf16 tensor go
# completely wrong; this bound does not. Calibrated on the feature grid (largest error seen: ~30 eps in float32,
# ~2.5 eps in float16), so a wrong element of typical size fails it in every dtype.
EPSILON = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TF32_EPSILON = 2.0**-10  # float32 matmuls on TF32 tensor cores: SPEC tolerance 5e-3
TF32_TOLERANCE = 5e-3
ELEMENT_ULPS = {torch.float64: 256, torch.float32: 256, torch.float16: 8, torch.bfloat16: 8}


VANISHING = 1e-3  # a sum whose RMS is below this fraction of its uncancelled size is dominated by cancellation
# The rounding a sum carries however much it cancels, in eps of its uncancelled size: an L2 error of this many eps
# (RMS) always passes. Calibrated on the feature grids, the emulated CUDA kernels and the layout fuzz (11 seeds on
# the CPU and the reference, 6 under the Triton interpreter): the largest seen below 0.1 of the uncancelled size was
# 6.6 eps in float32 and float64, 0.4 eps in 16-bit, where those kernels compute in float32 (a GPU's round P and dS
# to 16 bits: one eps more).
ROUNDING_ULPS = {torch.float64: 32, torch.float32: 32, torch.float16: 4, torch.bfloat16: 4}


def reference_errors(got, want, dtype, tolerance=None, units=None, terms=None):
    """Relative L2 and elementwise errors of every entry of ``got`` against the float64 ``want`` (dicts of
    tensors with equal keys) -> (errors by name, failures by name).

    ``tolerance``: the SPEC relative L2 bound (default that of ``dtype``; ``TF32_TOLERANCE`` selects TF32's
    epsilon for the elementwise bound). ``units``: by name, the size of the terms an entry is a sum of
    (:func:`attention_scales`), which does not vanish when the sum does; ``terms``: by name, how many such terms
    with independent signs each element adds (default 1), so that ``unit * sqrt(terms)`` is the size of the sum
    uncancelled. The elementwise bound is taken relative to ``max(max |ref|, unit)``. The L2 error is taken relative
    to ``max(||ref||, floor * uncancelled * sqrt(numel))``, ``floor = min(1, ROUNDING_ULPS * eps / tolerance)``
    (0.038 in float32): each term's rounding adds in quadrature, as the terms do, so a sum carries a few eps of its
    uncancelled size however far it cancels, which no kernel can meet relative to the sum itself once the sum is
    below ``floor`` of that size. Gradients that vanish in exact arithmetic or nearly (RMS below ``VANISHING`` of their
    uncancelled size: dq, dk, dr, du, dvb when every query sees one key or all values are equal, dr and dvb when
    every visible distance is clamped, du and dvb when their terms happen to cancel) are marked ``vanishing``.
    """
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    eps = TF32_EPSILON if tolerance == TF32_TOLERANCE and dtype == torch.float32 else EPSILON[dtype]
    element_bound = ELEMENT_ULPS[dtype] * eps
    floor = min(1.0, ROUNDING_ULPS[dtype] * eps / tol)
    errors, bad = {}, {}
    for name, ref in want.items():
        x, ref = got[name].detach().to(torch.float64), ref.detach().to(torch.float64)
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)}, reference {tuple(ref.shape)}"
        if x.numel() == 0:
            continue
        unit = (units or {}).get(name, 0.0)
        uncancelled = unit * (terms or {}).get(name, 1) ** 0.5
        diff = (x - ref).abs()
        vanishing = rms(ref) < VANISHING * uncancelled
        l2_scale = max(ref.norm().item(), floor * uncancelled * ref.numel() ** 0.5)
        inf_scale = max(ref.abs().max().item(), unit)
        rel = diff.norm().item() / max(l2_scale, 1e-300)
        worst = diff.max().item() / max(inf_scale, 1e-300)
        if not bool(torch.isfinite(x).all()):
            rel = worst = float("nan")
        errors[name] = dict(rel_l2=rel, max_elementwise=worst) | (dict(vanishing=True) if vanishing else {})
        problems = []
        if not rel <= tol:  # `not <=` also catches NaN
            problems.append(f"relative L2 {rel:.2e} > {tol:.0e}")
        if not worst <= element_bound:
            index = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if worst == worst else ()
            problems.append(f"max |x - ref| / max(|ref|, unit) = {worst:.2e} > {element_bound:.1e} (at {index})")
        if problems:
            bad[name] = "; ".join(problems)
    return errors, bad


def assert_close_to_reference(got, want, dtype, tolerance=None, units=None, terms=None, context=""):
    """Asserts that ``reference_errors`` finds nothing: both bounds hold for every entry, and nothing is NaN."""
    errors, bad = reference_errors(got, want, dtype, tolerance, units, terms)
    assert not bad, f"{context} {dtype}: {bad} (all: {errors})"


def attention_scales(q, k, v, r, grad_out, scale=None):
    """``units`` and ``terms`` (:func:`reference_errors`) of the attention output and its six gradients, from the
    RMS of the inputs: ``s = scale * sqrt(D) * rms(dO) * rms(v)`` is the size of one dS entry (``dP - delta``), so
    one query's term of dq is ``s * rms(k | r)``, of dk and dr ``s * rms(q)``, of du ``s * rms(k)``, of dvb
    ``s * rms(r)``, and dv's unit is ``rms(dO)``. du and dvb (per head) add one term per batch row and query:
    ``B * L`` terms. On the feature grid every unit is below the largest element of its gradient (0.1-0.8 of it),
    so it changes nothing where the gradient does not vanish."""
    B, _, L, D = q.shape
    s = (scale if scale is not None else D ** -0.5) * D ** 0.5 * rms(grad_out) * rms(v)
    units = dict(dq=s * max(rms(k), rms(r)), dk=s * rms(q), dv=rms(grad_out), dr=s * rms(q), du=s * rms(k),
                 dvb=s * rms(r))
    return dict(units=units, terms=dict(du=B * L, dvb=B * L))


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t`` in float64 (a unit of :func:`reference_errors`)."""
    return t.detach().to(torch.float64).pow(2).mean().sqrt().item()


def assert_matches_reference(fn, case: Case, dtype, device="cpu", strided=False, tolerance=None, seed=None):
    """Runs ``fn(q, k, v, r, u, vb, **case.kwargs())`` forward and backward and compares the output and
    all six gradients with the float64 reference: the SPEC's relative L2 bound of ``dtype`` and the
    elementwise bound (:func:`reference_errors`). ``seed``: a fixed draw of the inputs and the output's gradient."""
    inputs = make_inputs(case, dtype, device, strided, seed=seed)
    out = fn(*inputs, **case.kwargs(device))
    grad_out = (torch.randn_like(out) if seed is None else
                torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out))
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)
    got = dict(zip(("out",) + GRAD_NAMES, (out,) + grads))
    want = dict(zip(("out",) + GRAD_NAMES, (ref_out,) + ref_grads))
    scales = attention_scales(*inputs[:4], grad_out, case.scale)
    assert_close_to_reference(got, want, dtype, tolerance, **scales, context=str(case))
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


def backend_forward_calls(backend: str, monkeypatch) -> list:
    """The argument tuples of every call of ``backend``'s forward from now on (the test's monkeypatch undoes it)."""
    from memtx_ops.backends import BACKENDS

    calls, forward = [], BACKENDS[backend].forward
    monkeypatch.setattr(BACKENDS[backend], "forward",
                        lambda *args, **options: calls.append(args) or forward(*args, **options))
    return calls


@contextlib.contextmanager
def tf32_allowed(api: str = "legacy"):
    """TF32 for CUDA float32 matmuls within the block, set through torch's ``"legacy"`` flag (``allow_tf32``) or its
    ``"new"`` one (``fp32_precision``); both precision settings are restored after it (the legacy setter also
    changes ``fp32_precision`` and the float32 matmul precision, which a plain restore of the flag leaves changed)."""
    matmul = torch.backends.cuda.matmul
    previous = torch.get_float32_matmul_precision(), matmul.fp32_precision
    try:
        if api == "new":
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        matmul.fp32_precision = previous[1]


def assert_strided_inputs_reach_backend(backend: str, fn, dtype, device, monkeypatch):
    """Strided q, k, v (views of a fused projection) reach ``backend``'s forward as they are, uncopied."""
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(Case(B=1, H=2, L=8, M=8, D=16), dtype, device, strided=True))
    assert not q.is_contiguous() and not k.is_contiguous()
    calls = backend_forward_calls(backend, monkeypatch)
    fn(q, k, v, r, u, vb)
    assert [tuple(t.data_ptr() for t in args[:3]) for args in calls] == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]


def assert_opcheck_passes(backend: str, dtype, device):
    """``torch.library.opcheck`` on the forward and backward custom ops with ``backend``."""
    q, k, v, r, u, vb = make_inputs(Case(B=1, H=2, L=9, M=7, D=16, window=10, mem_offset=3), dtype, device)
    idx = torch.tensor([1, 0], device=device)
    options = (idx, 10, 3, 0.25, backend)
    torch.library.opcheck(torch.ops.memtx_ops.rel_memory_attention, (q, k, v, r, u, vb, *options))
    out, lse = torch.ops.memtx_ops.rel_memory_attention(q, k, v, r, u, vb, *options)
    # grad_out in q's dtype, out as the forward gave it (float32 for 16-bit inputs); no double backward
    tensors = [t.detach() for t in (torch.randn_like(q), q, k, v, r, u, vb, out, lse)]
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


def assert_bad_kv_head_stays_in_its_rows(backend: str, dtype, device, compiled: bool):
    """A kv head index outside [0, Hk) reaches the kernels when the Python value check is skipped (the custom op
    called directly, or torch.compile). That query head's out (and lse), dq, du, dvb must be NaN, and nothing else may
    change: the dk, dv, dr of every real kv head and query head 0's dq are those of the valid head alone."""
    case = Case(B=1, H=2, Hk=2, L=20, M=12, D=16)
    inputs = make_inputs(case, dtype, device)
    bad = torch.tensor([1, 5], device=device)
    if compiled:
        fn = torch.compile(lambda *t: memtx_ops.rel_memory_attention(*t, kv_head_index=bad, backend=backend),
                           fullgraph=True, backend="aot_eager")
        out = fn(*inputs)
    else:
        out, lse = torch.ops.memtx_ops.rel_memory_attention(*inputs, bad, 0, 0, case.D ** -0.5, backend)
        assert lse[:, 1].isnan().all() and not lse[:, 0].isnan().any()
    grad_out = torch.randn_like(out)
    dq, dk, dv, dr, du, dvb = torch.autograd.grad(out, inputs, grad_out)
    assert out[:, 1].isnan().all() and dq[:, 1].isnan().all() and du[1].isnan().all() and dvb[1].isnan().all()
    assert not out[:, 0].isnan().any() and not dq[:, 0].isnan().any()
    alone = [t.detach()[:, :1] if i == 0 else t.detach()[:1] if i >= 4 else t.detach() for i, t in enumerate(inputs)]
    alone = [t.clone().requires_grad_() for t in alone]
    ref = memtx_ops.rel_memory_attention(*alone, kv_head_index=torch.tensor([1], device=device), backend=backend)
    ref_dq, ref_dk, ref_dv, ref_dr, _, _ = torch.autograd.grad(ref, alone, grad_out[:, :1])
    close = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in ((dq[:, :1], ref_dq), (dk, ref_dk), (dv, ref_dv), (dr, ref_dr)):
        torch.testing.assert_close(got, want, **close)
    assert not dk[:, 0].any() and not dr[0].any()  # nothing reached kv head 0


def spawn_ranks(fn, args, outputs: Sequence[str], nprocs: int = 2, timeout_s: float = 600.0,
                teardown_s: float = 30.0) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` that cannot hang a test run. A rank's error fails the test
    as in ``mp.spawn``. Once every file of ``outputs`` (what the ranks write when their work is done) exists, the
    ranks get ``teardown_s`` to exit; one still alive then is killed: torch's gloo teardown can deadlock (seen with
    DDP: ``~ProcessGroupGloo`` joins a worker thread that waits for the GIL the destructor's caller holds). A rank
    still running at ``timeout_s`` fails the test."""
    import os
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    start, done_at = time.monotonic(), None
    while not context.join(timeout=1):
        now = time.monotonic()
        if done_at is None and all(os.path.exists(path) for path in outputs):
            done_at = now
        late = done_at is not None and now - done_at > teardown_s
        if late or now - start > timeout_s:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            if not late:
                pytest.fail(f"ranks of {fn.__name__} still running after {timeout_s} s, outputs "
                            f"{[path for path in outputs if not os.path.exists(path)]} missing")
            return


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, store_file: str, timeout_s: float = 60.0):
    """One rank's membership of a gloo group that meets in ``store_file`` (a path no earlier group used: a
    ``tmp_path`` file), for the body of the ``with``. A file store, not a TCP port: a port picked free and then bound
    by the group races with every other test's, and a rank that joined another test's group waited out its timeout.
    On success the ranks meet at a barrier before the group is torn down: a rank that destroys it while a peer's gloo
    pair is still sending aborts the peer ("terminate called without an active exception", seen in CI under FSDP2).
    On an error the group is torn down at once (``mp.spawn`` then stops the other ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def saved_by_autograd(fn):
    """Runs ``fn()`` under a saved-tensors hook: -> (its result, the tensors autograd saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def non_finite_activation(dtype) -> torch.Tensor:
    """A [329] activation (five batches of 64 dropout elements and a tail of 9) with +inf, NaN and -inf spread over
    kept and dropped positions."""
    x = torch.randn(64 * 5 + 9).to(dtype)
    x[::3] = float("inf")
    x[1::5] = float("nan")
    x[2::7] = -float("inf")
    return x


def assert_compiled_dropout_matches_eager(op, p=0.3):
    """``op(x, p)`` (a memtx dropout) under ``torch.compile(fullgraph=True)`` draws the masks eager does from the
    same generator state: equal gradients, some of them dropped."""
    import torch._inductor.config as inductor_config

    x = torch.randn(8, 300, requires_grad=True)
    # the seed from torch's generator, as in eager; torch's own patch restores the setting on exit
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(lambda t: (op(t, p) * 2).sum(), fullgraph=True)
        torch.manual_seed(0)
        compiled(x).backward()
    eager_x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    (op(eager_x, p) * 2).sum().backward()
    assert torch.equal(x.grad, eager_x.grad) and (x.grad == 0).any()


def bptt_like_replay(model, xs, ys):
    """Full back-propagation through time over the segments of a TransformerXL-style model (any memory layout:
    ``model.memory_lengths()``), with the random-number stream ``model.replay_segments`` uses: plain segments until
    every memory entry is full, then before each step the state that memory replay's forward pass (memory path only)
    leaves. -> (the segment losses, the final memory)."""
    memory, losses = model.empty_memory(xs[0].shape[0]), []
    for x, y in zip(xs, ys):
        full = all(m.hidden.shape[1] >= n for m, n in zip(memory, model.memory_lengths()))
        perms = model._draw_permutations(x.device) if full else ()
        state = torch.get_rng_state()
        kv = [None if row[0] < 0 else row for row in perms[0]] if perms else None
        hidden, next_memory = model.hidden_states(x, memory, detach_memory=False, kv_head_index=kv)
        losses.append(model._loss(hidden, y))
        if full:
            torch.set_rng_state(state)
            with torch.no_grad():
                model.hidden_states(x, memory, detach_memory=False, kv_head_index=kv, top_layer=False)
        memory = next_memory
    return losses, memory


def assert_replay_equals_bptt(model, xs, ys):
    """``model.replay_segments`` over the segments ``xs``/``ys`` gives the losses and every parameter gradient of
    :func:`bptt_like_replay`, from the same random streams (torch's, and each cross-head layer's generator)."""
    grads = []
    for run in (bptt_like_replay, lambda m, a, b: m.replay_segments(a, b)):
        torch.manual_seed(7)
        for layer in model.layers:
            if layer.cross_head is not None:
                layer.cross_head.generator = torch.Generator().manual_seed(3)
        model.zero_grad()
        losses, _ = run(model, xs, ys)
        (sum(losses) / len(losses)).backward()
        grads.append([torch.stack([loss.detach() for loss in losses])] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
