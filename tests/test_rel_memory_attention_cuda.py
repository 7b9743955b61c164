"""CUDA C++ backend (``backend="cuda"``, csrc/cuda) against the float64 reference, on a GPU.

Every feature case and larger shapes (several query and key blocks on both sides of M, every head-dim
configuration: padded 32, 64, 128, odd sizes through the scalar-load path) in float32, float16 and bfloat16;
q, k, v as strided views of a fused projection; all six gradients; opcheck; torch.compile; and, where
compute-sanitizer is installed, memcheck and racecheck runs of a few small calls.

float32 runs on the tensor cores as 3xTF32 (hi/lo split), so it meets the float32 tolerance (1e-4) whatever
``torch.backends.cuda.matmul.allow_tf32`` says.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import memtx_ops
from helpers import (
    Case,
    FEATURE_CASES,
    GRAD_NAMES,
    assert_bad_kv_head_stays_in_its_rows,
    assert_compiled_matches_eager,
    assert_matches_reference,
    assert_opcheck_passes,
    assert_strided_inputs_reach_backend,
    make_inputs,
    attention_scales,
    reference_errors,
    reference_float64,
    rel_error,
    tf32_allowed,
)
from memtx_ops._extension import extension_error, has_cuda_kernels

if not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="backend 'cuda' needs a CUDA device; none is available here")
elif extension_error() is not None:
    pytestmark = pytest.mark.skip(reason=extension_error())
elif not has_cuda_kernels():
    pytestmark = pytest.mark.skip(
        reason="memtx_ops._C was built without its CUDA kernels: rebuild with a CUDA torch and nvcc "
        "(`MEMTX_CUDA=1 pip install --no-build-isolation .`)")
else:
    pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Head dims of every kernel configuration (32 / 64 / 128 after padding), odd sizes (D % 8 != 0: scalar loads),
# an unused kv head, R = 1 avoided (dr, dvb are exactly zero there: see test_degenerate_cases).
EXTRA_CASES = [
    Case(B=1, H=2, L=40, M=30, D=24, window=50, R=45),
    Case(B=1, H=1, L=35, M=40, D=100, mem_offset=5),
    Case(B=1, H=2, Hk=3, L=20, M=12, D=16, kv_head_index=(2, 0)),
    Case(B=1, H=2, L=150, M=70, D=80, window=128),
    Case(B=1, H=2, L=20, M=45, D=16, mem_offset=100000),
    Case(B=1, H=2, L=30, M=20, D=16, window=1000),
    Case(B=1, H=3, Hk=1, L=65, M=63, D=128, R=30),
    Case(B=1, H=2, L=17, M=9, D=7),
]
# Several blocks of every tile size (BM 32/64, BN 32/64) on both sides of M.
LARGE_CASES = [
    Case(B=2, H=4, L=300, M=500, D=64),
    Case(B=1, H=4, Hk=2, L=257, M=513, D=128, window=300, mem_offset=257, R=200),
    Case(B=2, H=2, L=129, M=255, D=32, R=100, kv_head_index=(1, 0)),
    Case(B=1, H=2, L=200, M=100, D=80, window=128),
    Case(B=1, H=8, Hk=2, L=512, M=512, D=64, R=129),
]
SUBSET = [FEATURE_CASES[2], FEATURE_CASES[8], FEATURE_CASES[12], EXTRA_CASES[1]]
# The forward splits keys (flash-decoding, forward_key_splits) when B x H x query blocks fill at most half a wave of
# the device, so on a current GPU every case above takes the split path. The first case here has enough blocks
# (320 of 64 rows in 16 bits, 640 of 32 in float32) to keep the unsplit path on GPUs of up to about 150
# multiprocessors; the decoding ones split into many parts, the last with parts that see no key (window).
KEY_SPLIT_CASES = [
    (Case(B=8, H=8, L=300, M=200, D=64), False),
    (Case(B=2, H=4, L=1, M=3000, D=64), True),
    (Case(B=1, H=2, Hk=1, L=16, M=2000, D=128, window=700, R=900, mem_offset=3), True),
]


def cuda_attention(*args, **kwargs):
    return memtx_ops.rel_memory_attention(*args, backend="cuda", **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEATURE_CASES + EXTRA_CASES, ids=str)
def test_matches_reference(case, dtype):
    assert_matches_reference(cuda_attention, case, dtype, DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_matches_reference_large(case, dtype):
    assert_matches_reference(cuda_attention, case, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,split", KEY_SPLIT_CASES, ids=[str(c) for c, _ in KEY_SPLIT_CASES])
def test_key_splits(case, split, dtype):
    """Both forward paths against the reference, and the path each one takes: the split one launches the merge."""
    assert_matches_reference(cuda_attention, case, dtype, DEVICE)
    inputs = make_inputs(case, dtype, DEVICE, False)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_attention(*inputs, **case.kwargs(DEVICE))
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    assert any("merge_key_splits" in k for k in kernels) == split, kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SUBSET, ids=str)
def test_strided_fused_projection_views(case, dtype):
    """q, k, v as views of a fused qkv projection are read through their strides."""
    assert_matches_reference(cuda_attention, case, dtype, DEVICE, strided=True)


def test_float32_ignores_tf32_setting():
    """3xTF32 keeps float32 accuracy when TF32 matmuls are allowed."""
    with tf32_allowed():
        assert_matches_reference(cuda_attention, FEATURE_CASES[2], torch.float32, DEVICE)


def test_strided_inputs_are_not_copied(monkeypatch):
    assert_strided_inputs_reach_backend("cuda", cuda_attention, torch.float16, DEVICE, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,vanishing", [
    (Case(B=1, H=2, L=40, M=90, D=32, window=1), {"dq", "dk", "dr", "du", "dvb"}),  # each query sees only itself
    (Case(B=1, H=2, L=33, M=0, D=40, R=1), {"dr", "dvb"}),  # R=1: the position term is constant per row
], ids=["window=1", "R=1"])
def test_degenerate_cases(case, vanishing, dtype):
    """Gradients that are exactly zero in exact arithmetic come out as rounding noise of the size of their terms."""
    inputs = make_inputs(case, dtype, DEVICE)
    out = cuda_attention(*inputs, **case.kwargs(DEVICE))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)
    got = dict(zip(("out",) + GRAD_NAMES, (out,) + grads))
    want = dict(zip(("out",) + GRAD_NAMES, (ref_out,) + ref_grads))
    errors, bad = reference_errors(got, want, dtype, **attention_scales(*inputs[:4], grad_out, case.scale))
    assert not bad, f"{case} {dtype}: {bad} (all: {errors})"
    assert {n for n, e in errors.items() if e.get("vanishing")} == vanishing, errors


def test_unused_kv_head_gets_zero_gradients():
    case = Case(B=2, H=2, Hk=3, L=20, M=12, D=16, kv_head_index=(2, 0))
    inputs = make_inputs(case, torch.float16, DEVICE)
    out = cuda_attention(*inputs, **case.kwargs(DEVICE))
    dk, dv, dr = torch.autograd.grad(out, inputs[1:4], torch.randn_like(out))
    assert dk[:, 1].abs().max() == 0 and dv[:, 1].abs().max() == 0 and dr[1].abs().max() == 0


def test_backward_is_deterministic_but_for_dr():
    """dq, dk, dv, du, dvb have no atomics: bitwise reproducible. dr adds float32 atomics in any order."""
    case = Case(B=2, H=4, Hk=2, L=130, M=200, D=64, window=150)
    inputs = make_inputs(case, torch.bfloat16, DEVICE)
    out = cuda_attention(*inputs, **case.kwargs(DEVICE))
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, inputs, grad_out)
    for name, a, b in zip(GRAD_NAMES, first, second):
        if name == "dr":
            assert rel_error(a, b) < 1e-2
        else:
            assert torch.equal(a, b), name


def test_head_dim_above_128_is_refused_clearly():
    case = Case(B=1, H=1, L=8, M=0, D=160)
    inputs = [t.detach() for t in make_inputs(case, torch.float16, DEVICE)]
    with pytest.raises(ValueError, match=r"backend 'cuda' supports head dims D <= 128; got D=160"):
        cuda_attention(*inputs)


@pytest.mark.parametrize("compiled", [False, True], ids=["custom_op", "torch.compile"])
def test_out_of_range_head_writes_only_its_own_rows(compiled):
    assert_bad_kv_head_stays_in_its_rows("cuda", torch.float16, DEVICE, compiled)


@pytest.mark.parametrize("float32_out", [False, True], ids=["float16_out", "float32_out"])
def test_kv_head_index_out_of_range_gives_nan_not_a_fault(float32_out):
    """Called directly (no Python validation), a bad kv head writes NaN rows instead of reading out of bounds."""
    case = Case(B=1, H=2, L=9, M=7, D=16)
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(case, torch.float16, DEVICE))
    idx = torch.tensor([0, 5], device=DEVICE)
    out, lse = torch.ops.memtx_C.rel_memory_attention_fwd(q, k, v, r, u, vb, idx, 0, 0, 0.25, float32_out)
    assert out.dtype == (torch.float32 if float32_out else torch.float16)
    torch.cuda.synchronize()
    assert torch.isfinite(out[:, 0]).all() and torch.isnan(out[:, 1]).all() and torch.isnan(lse[:, 1]).all()


def test_lse_is_the_log_sum_exp_of_the_scores():
    case = Case(B=1, H=2, L=33, M=40, D=32, window=50, mem_offset=3, R=60)
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(case, torch.float32, DEVICE))
    idx = torch.tensor([0, 1], device=DEVICE)
    _, lse = torch.ops.memtx_C.rel_memory_attention_fwd(q, k, v, r, u, vb, idx, 50, 3, 0.2)
    # scores in float64, straight from SPEC §1
    L, M, K, R = 33, 40, 73, 60
    i = torch.arange(L, device=DEVICE)[:, None]
    j = torch.arange(K, device=DEVICE)[None, :]
    dist = M + i - j + torch.where(j < M, 3, 0)
    rows = r.double()[:, dist.clamp(0, R - 1)]  # [H, L, K, D]
    s = 0.2 * (torch.einsum("bhid,bhjd->bhij", q.double() + u.double()[None, :, None], k.double())
               + torch.einsum("bhid,hijd->bhij", q.double() + vb.double()[None, :, None], rows))
    visible = (j <= M + i) & (j > M + i - 50)
    expected = s.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)


def test_opcheck():
    assert_opcheck_passes("cuda", torch.float16, DEVICE)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    assert_compiled_matches_eager(cuda_attention, Case(B=1, H=2, L=40, M=50, D=64), torch.float16, DEVICE, window=48,
                                  compile_backend=compile_backend, rtol=1e-2, atol=1e-2)


def test_runs_on_the_current_stream():
    """Kernels go to the current stream; results match the default stream's."""
    case = Case(B=1, H=2, L=70, M=30, D=64)
    inputs = [t.detach() for t in make_inputs(case, torch.float16, DEVICE)]
    expected = cuda_attention(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_attention(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


SANITIZER_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import memtx_ops
    from helpers import Case, make_inputs
    for case, dtype in [(Case(B=1, H=2, L=37, M=50, D=16, window=40, mem_offset=5, R=30), torch.float16),
                        (Case(B=1, H=2, Hk=1, L=20, M=13, D=100), torch.bfloat16),
                        (Case(B=1, H=2, L=33, M=0, D=64, kv_head_index=(1, 0)), torch.float32)]:
        for strided in (False, True):
            inputs = make_inputs(case, dtype, "cuda", strided)
            out = memtx_ops.rel_memory_attention(*inputs, backend="cuda", **case.kwargs("cuda"))
            torch.autograd.grad(out, inputs, torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitized run done")
""")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    """No out-of-bounds or misaligned access (memcheck), no shared-memory hazard (racecheck)."""
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "run.py"
    script.write_text(SANITIZER_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--target-processes", "all"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "hazard"]
    proc = subprocess.run(cmd + [sys.executable, str(script)], capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitized run done" in log, log[-6000:]
    assert "ERROR SUMMARY: 0 errors" in log or "RACECHECK SUMMARY: 0 hazards" in log, log[-6000:]
