"""C++ CPU backend against the float64 reference: every feature, shapes crossing the 64 x 512 tiles."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import memtx_ops
from helpers import (
    Case,
    FEATURE_CASES,
    assert_close_to_reference,
    assert_compiled_matches_eager,
    assert_matches_reference,
    assert_opcheck_passes,
    assert_strided_inputs_reach_backend,
    attention_scales,
    backend_forward_calls,
    make_inputs,
    reference_float64,
)
from memtx_ops._extension import extension_error

pytestmark = pytest.mark.skipif(extension_error() is not None, reason=f"{extension_error()}")


def cpu_attention(*args, **kwargs):
    return memtx_ops.rel_memory_attention(*args, backend="cpu", **kwargs)


# Larger than the feature grid: several query blocks of 64 and key blocks of 512 on both sides of M.
TILE_CASES = [
    Case(B=1, H=3, L=540, M=530, D=64),
    Case(B=1, H=2, L=129, M=513, D=32, window=300, mem_offset=129),
    Case(B=2, H=4, Hk=2, L=65, M=255, D=128, R=100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", FEATURE_CASES + TILE_CASES, ids=str)
def test_matches_reference(case, dtype):
    assert_matches_reference(cpu_attention, case, dtype)


# Windows of all the keys or more, and memory offsets past r's rows, far past 32 bits: the kernels index distances in
# 32 bits, and such values wrapped (wrong results from 2**31, NaN, reads before r) until the op bounded them exactly.
HUGE_SPAN_CASES = [
    Case(B=1, H=2, L=L, M=30, D=16, R=7, window=window, mem_offset=mem_offset)
    for L in (3, 16, 64)  # key-by-key rows, lane tiles
    for window, mem_offset in ((46, 0), (2**31, 0), (2**32 + 1, 2**31 - 5), (10**12, 2**32 + 3), (None, 2**62 - 1))
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HUGE_SPAN_CASES, ids=str)
def test_huge_window_and_memory_offset_match_reference(case, dtype):
    assert_matches_reference(cpu_attention, case, dtype)
    if dtype != torch.bfloat16:  # the op proper takes the kernels' dtypes (the public function converts 16 bits)
        assert_matches_reference(cpu_custom_op, case, dtype)
    with torch.no_grad():  # the inference path, which calls the kernel without the custom op
        inputs = make_inputs(case, dtype)
        assert_close_to_reference({"out": cpu_attention(*inputs, **case.kwargs())},
                                  {"out": memtx_ops.reference.rel_memory_attention(
                                      *(t.double() for t in inputs), **case.kwargs())}, dtype)


@pytest.mark.parametrize("L", [3, 64], ids=["key-by-key", "lane-tiles"])
def test_direct_kernel_calls_bound_huge_window_and_memory_offset(L):
    """``torch.ops.memtx_C`` called directly, past the public function's checks and kernel_span: the C++ checks bound
    window and mem_offset the same way, so 2**40 and 2**62 - 1 give what the bounded values give (they wrapped)."""
    case = Case(B=1, H=2, L=L, M=30, D=16, R=7)
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(case, torch.float32))
    options = (torch.arange(2), 0.25)

    def both_passes(window, mem_offset):
        out, lse = torch.ops.memtx_C.rel_memory_attention_fwd(q, k, v, r, u, vb, options[0], window, mem_offset,
                                                              options[1])
        grads = torch.ops.memtx_C.rel_memory_attention_bwd(torch.ones_like(out), q, k, v, r, u, vb, out, lse,
                                                           options[0], window, mem_offset, options[1])
        return (out, lse) + tuple(grads)

    for (window, mem_offset), bounded in (((2**40, 2**40), (0, 7)), ((2**62 - 1, 2**31 + 3), (0, 7)),
                                          ((2**31, 5), (0, 5))):
        for got, want in zip(both_passes(window, mem_offset), both_passes(*bounded)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def cpu_custom_op(q, k, v, r, u, vb, kv_head_index=None, window=None, mem_offset=0, scale=None):
    """The custom op itself, which hands its arguments to the kernels as they come (the public function may first
    give k, v dense rows: :func:`test_training_copies_time_major_keys_to_dense_rows`)."""
    if kv_head_index is None:
        kv_head_index = memtx_ops.reference.default_kv_head_index(q.shape[1], k.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.memtx_ops.rel_memory_attention(q, k, v, r, u, vb, kv_head_index, window or 0, mem_offset,
                                                    scale, "cpu")[0]


@pytest.mark.parametrize("fn", [cpu_attention, cpu_custom_op], ids=["function", "custom_op"])
@pytest.mark.parametrize("case", [FEATURE_CASES[2], FEATURE_CASES[8], FEATURE_CASES[12]], ids=str)
def test_strided_fused_projection_views(case, fn):
    """q, k, v as views of a fused qkv projection are read through their strides, by the forward and the backward
    kernels (the custom op) and through the public function."""
    assert_matches_reference(fn, case, torch.float32, strided=True)


def keys_reaching_backend(monkeypatch, q, k, v, r, u, vb):
    """The (q, k, v) the C++ backend's forward receives from ``rel_memory_attention(q, k, v, r, u, vb)``."""
    calls = backend_forward_calls("cpu", monkeypatch)
    cpu_attention(q, k, v, r, u, vb)
    return [t for args in calls for t in args[:3]]


@pytest.mark.parametrize("L", [65, 130])
def test_training_copies_time_major_keys_to_dense_rows(monkeypatch, L):
    """A training call of more than one query tile (L > 64) gets time-major k, v (views of a fused projection)
    with dense rows, once, before the op, so the backward reads the copy; q stays a view."""
    q, k, v, r, u, vb = make_inputs(Case(B=2, H=2, L=L, M=40, D=16), torch.float32, strided=True)
    seen_q, seen_k, seen_v = keys_reaching_backend(monkeypatch, q, k, v, r, u, vb)
    assert seen_q.data_ptr() == q.data_ptr()
    for seen, given in ((seen_k, k), (seen_v, v)):
        assert seen.is_contiguous() and seen.data_ptr() != given.data_ptr()
        assert torch.equal(seen, given)


@pytest.mark.parametrize("call", ["no_grad", "detached", "one_query_tile", "expanded"])
def test_keys_stay_in_place_unless_reread(monkeypatch, call):
    """Inference, a single query tile (L <= 64) and stride-0 expanded keys read each key row about once, or would
    materialise an expansion: k, v reach the kernel as they were given."""
    case = Case(B=2, H=2, L=64 if call == "one_query_tile" else 100, M=40, D=16)
    q, k, v, r, u, vb = make_inputs(case, torch.float32, strided=True)
    if call == "detached":
        q, k, v, r, u, vb = (t.detach() for t in (q, k, v, r, u, vb))
    if call == "expanded":
        k, v = (t[:1].expand_as(t) for t in (k, v))
    with torch.set_grad_enabled(call != "no_grad"):
        _, seen_k, seen_v = keys_reaching_backend(monkeypatch, q, k, v, r, u, vb)
    assert (seen_k.data_ptr(), seen_k.stride()) == (k.data_ptr(), k.stride())
    assert (seen_v.data_ptr(), seen_v.stride()) == (v.data_ptr(), v.stride())


@pytest.mark.parametrize("dim", [0, 1, 2], ids=["batch", "head", "key"])
def test_keys_and_values_expanded_with_stride_zero(dim):
    """k, v expanded along any dimension (stride 0) match the reference. Along the keys, the BLAS leading
    dimension would be 0 < D: MKL rejected it ("Parameter 8 was incorrect on entry to DGEMM") and the op returned
    garbage; such rows are now copied first."""
    case = Case(B=2, H=2, L=20, M=30, D=16)
    q, k, v, r, u, vb = make_inputs(case, torch.float64)
    shape = list(k.shape)
    shape[dim] = 1
    k1, v1 = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = cpu_attention(q, k1.expand_as(k), v1.expand_as(v), r, u, vb)
    ref = memtx_ops.reference.rel_memory_attention(q, k1.expand_as(k), v1.expand_as(v), r, u, vb)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k1, v1, r), g), torch.autograd.grad(ref, (q, k1, v1, r), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_strided_inputs_are_not_copied(monkeypatch):
    assert_strided_inputs_reach_backend("cpu", cpu_attention, torch.float32, "cpu", monkeypatch)


def test_gradcheck_float64():
    for case in (Case(B=1, H=2, Hk=1, L=5, M=4, D=4, R=6, window=6, mem_offset=2),
                 Case(B=2, H=2, L=3, M=0, D=4, kv_head_index=(1, 0))):
        inputs = make_inputs(case, torch.float64)
        assert torch.autograd.gradcheck(lambda *t: cpu_attention(*t, **case.kwargs()), inputs)


def test_window_one_attends_to_itself_only():
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(Case(B=1, H=2, L=40, M=90, D=32), torch.float32))
    out = cpu_attention(q, k, v, r, u, vb, window=1)
    torch.testing.assert_close(out, v[:, :, 90:], rtol=1e-6, atol=1e-6)


def test_default_kv_head_index_is_grouped_query():
    case = Case(B=1, H=4, Hk=2, L=10, M=6, D=16)
    inputs = [t.detach() for t in make_inputs(case, torch.float64)]
    implicit = cpu_attention(*inputs)
    explicit = cpu_attention(*inputs, kv_head_index=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)


def test_auto_picks_cpu_backend_for_float32():
    from memtx_ops.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32, 64) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, 64) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float16, 64) == "cpu"


def test_training_after_a_call_under_inference_mode():
    """The default kv_head_index is cached per (H, Hk, device): made by a call under inference_mode it was an inference
    tensor, which every later training call failed to save for backward."""
    from memtx_ops.ops.rel_memory_attention import _default_kv_heads

    _default_kv_heads.cache_clear()
    case = Case(B=1, H=4, Hk=2, L=5, M=7, D=8)
    with torch.inference_mode():
        cpu_attention(*make_inputs(case))
    assert_matches_reference(cpu_attention, case, torch.float32)


@pytest.fixture
def empty_kv_head_cache():
    """The cache of default kv_head_index tensors, emptied before the test and after it."""
    from memtx_ops.ops.rel_memory_attention import _default_kv_heads

    _default_kv_heads.cache_clear()
    yield
    _default_kv_heads.cache_clear()


@pytest.mark.parametrize("requires_grad", [False, True])
def test_call_under_fake_mode_caches_nothing(requires_grad, empty_kv_head_cache):
    """A call under FakeTensorMode (shape propagation) runs the custom op's fake implementation, also without a
    gradient to compute (the kernel has none), and caches no fake default kv_head_index: one made every later real
    call with the same (H, Hk, device) fail."""
    case = Case(B=1, H=4, Hk=2, L=3, M=2, D=8)
    inputs = [t.detach() for t in make_inputs(case)]
    with FakeTensorMode() as mode:
        out = cpu_attention(*(mode.from_tensor(t).requires_grad_(requires_grad) for t in inputs))
    assert isinstance(out, FakeTensor) and out.shape == (1, 4, 3, 8)
    torch.testing.assert_close(cpu_attention(*inputs), memtx_ops.reference.rel_memory_attention(*inputs))
    assert_matches_reference(cpu_attention, case, torch.float32)


def test_inference_mode_inputs_in_a_training_call():
    """q, k, v, r and kv_head_index made under torch.inference_mode, u and vb learned: autograd cannot save inference
    tensors for the backward, so the op saves copies of them, and trains as the reference does."""
    case = Case(B=1, H=4, Hk=2, L=5, M=7, D=8, kv_head_index=(1, 0, 0, 1))
    inputs = make_inputs(case)
    with torch.inference_mode():
        q, k, v, r = (t.detach().clone() for t in inputs[:4])
        kv_head_index = torch.tensor(case.kv_head_index)
    u, vb = inputs[4:]
    out = cpu_attention(q, k, v, r, u, vb, kv_head_index=kv_head_index)
    grad_out = torch.randn_like(out)
    du, dvb = torch.autograd.grad(out, (u, vb), grad_out)
    ref_out, (*_, ref_du, ref_dvb) = reference_float64(inputs, grad_out, case)
    scales = attention_scales(*inputs[:4], grad_out)
    assert_close_to_reference(dict(out=out, du=du, dvb=dvb), dict(out=ref_out, du=ref_du, dvb=ref_dvb), torch.float32,
                              **scales)


def test_opcheck():
    assert_opcheck_passes("cpu", torch.float32, "cpu")  # float16 and bfloat16 reach the op as float32


def test_torch_compile_fullgraph():
    assert_compiled_matches_eager(cpu_attention, Case(B=1, H=2, L=12, M=20, D=16), torch.float32, "cpu", window=16,
                                  compile_backend="aot_eager")


# Short queries take the forward's own tiles instead of BLAS: L <= 4 the key-by-key pass, longer segments the lane
# tiles of one to four registers (float32; float64 takes BLAS). Keys in groups of 16 and chunks of 64 with tails, head dims with a partial vector or
# under one, partial lanes, every mask feature, two key blocks, views of a batch-major or time-major projection
# (decoding over time-major keys takes every head per task: staged_heads_block) and plain tensors.
SHORT_QUERY_CASES = [
    Case(B=3, H=4, L=1, M=200, D=64),
    Case(B=2, H=2, L=2, M=150, D=41, window=100, R=120),
    Case(B=2, H=4, Hk=2, L=1, M=77, D=100, mem_offset=30, kv_head_index=(1, 0, 0, 1)),
    Case(B=1, H=2, L=4, M=13, D=8, window=3),
    Case(B=2, H=2, L=1, M=4200, D=32, R=3000),  # two key blocks of 4096 and the clamp
    Case(B=2, H=4, L=16, M=300, D=64),
    Case(B=3, H=2, L=11, M=150, D=41, window=100, R=120),
    Case(B=2, H=4, Hk=2, L=7, M=77, D=100, mem_offset=30, kv_head_index=(1, 0, 0, 1)),
    Case(B=2, H=2, L=13, M=0, D=16),
    Case(B=1, H=2, L=16, M=4200, D=32, window=4150, mem_offset=5),  # two key blocks, the first one half seen
    Case(B=1, H=2, L=5, M=40, D=128, window=2, R=30),
    Case(B=2, H=2, L=12, M=90, D=24, R=40),  # the clamp under the lane tiles: distances >= 39 read row 39
    Case(B=2, H=2, L=8, M=100, D=256),  # the largest head dim
    Case(B=1, H=2, L=12, M=50, D=1),
    # lane tiles of two to four registers (17 to 64 rows; longer segments in tiles of 64)
    Case(B=2, H=2, L=17, M=120, D=64),  # two registers, the second one holds one row
    Case(B=2, H=4, Hk=2, L=40, M=77, D=41, window=60, mem_offset=30, kv_head_index=(1, 0, 0, 1), R=90),
    Case(B=1, H=2, L=100, M=70, D=24, R=50),  # a tile of 64 rows, then one of 36 in four registers; the clamp
    Case(B=2, H=2, L=64, M=300, D=128),
    Case(B=1, H=2, L=33, M=10, D=1),  # fewer dims than a block of output columns
    Case(B=2, H=2, L=48, M=0, D=7, window=20),  # three registers, blocks of 5 dims and a tail of 2
]


@pytest.mark.parametrize("strided", [False, True, "time-major"], ids=["contiguous", "batch-major", "time-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", SHORT_QUERY_CASES, ids=str)
def test_short_query_tiles_match_reference(case, dtype, strided):
    assert_matches_reference(cpu_attention, case, dtype, strided=strided)


# Float16 and bfloat16 run the float32 kernels on float32 copies (memtx_ops/ops/rel_memory_attention.py): every kind
# of tile and pass, each layout a model hands over, and expanded (stride-0) keys, whose copy stays expanded.
HALF_CASES = [FEATURE_CASES[2], FEATURE_CASES[8], FEATURE_CASES[12], TILE_CASES[1], SHORT_QUERY_CASES[0],
              SHORT_QUERY_CASES[6], SHORT_QUERY_CASES[16]]


@pytest.mark.parametrize("strided", [False, True, "time-major"], ids=["contiguous", "batch-major", "time-major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=str)
def test_half_precision_matches_reference(case, dtype, strided):
    assert_matches_reference(cpu_attention, case, dtype, strided=strided)


# Inference in float16 / bfloat16: the forward reads k and v in their own dtype (decoding and short segments, every
# kind of tile and work split), widening each row as it reads it.
HALF_INFERENCE_CASES = [SHORT_QUERY_CASES[i] for i in (0, 1, 2, 4, 5, 7, 9, 11, 12, 14, 16, 19)] + [
    Case(B=3, H=4, L=2, M=500, D=256, R=400),  # time-major decoding: groups of batches, every head per task
    Case(B=1, H=1, L=1, M=3000, D=16),  # split-K
    Case(B=1, H=2, L=70, M=100, D=24, R=50),  # two query tiles
]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("strided", [False, True, "time-major"], ids=["contiguous", "batch-major", "time-major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HALF_INFERENCE_CASES, ids=str)
def test_half_precision_inference_reads_keys_as_given(case, dtype, strided, threads, monkeypatch):
    seen = backend_forward_calls("cpu", monkeypatch)
    inputs = make_inputs(case, dtype, strided=strided)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = cpu_attention(*inputs, **case.kwargs())
    finally:
        torch.set_num_threads(previous)
    (q_seen, k_seen, v_seen, *_), = seen
    assert (q_seen.dtype, k_seen.dtype, v_seen.dtype) == (torch.float32, dtype, dtype)
    assert k_seen.data_ptr() == inputs[1].data_ptr() and k_seen.stride() == inputs[1].stride()  # read in place
    want = memtx_ops.reference.rel_memory_attention(*(t.detach().double() for t in inputs), **case.kwargs())
    assert out.dtype == dtype
    assert_close_to_reference({"out": out}, {"out": want}, dtype, context=str(case))


def test_only_keys_and_values_may_be_narrower():
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(Case(B=1, H=2, L=3, M=5, D=16)))
    options = (torch.arange(2), 0, 0, 0.25)
    for args, why in (((q, k.bfloat16(), v.half(), r, u, vb), "k and v of two dtypes"),
                      ((q.double(), k.half(), v.half(), r.double(), u.double(), vb.double()), "under float64"),
                      ((q, k, v, r.bfloat16(), u, vb), "a narrow r")):
        with pytest.raises(RuntimeError, match="inputs must share one dtype"):
            torch.ops.memtx_C.rel_memory_attention_fwd(*args, *options)
            pytest.fail(why)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_keeps_expanded_keys_expanded(dtype, monkeypatch):
    case = Case(B=2, H=4, L=20, M=30, D=16)
    q, k, v, r, u, vb = make_inputs(case, dtype)
    k_shared, v_shared = (t[:, :1].detach().clone().requires_grad_() for t in (k, v))  # one kv head for all
    seen = backend_forward_calls("cpu", monkeypatch)
    out = cpu_attention(q, k_shared.expand_as(k), v_shared.expand_as(v), r, u, vb)
    (_, k_seen, v_seen, *_), = seen
    assert (k_seen.dtype, k_seen.stride(1), v_seen.stride(1)) == (torch.float32, 0, 0), k_seen.stride()
    grads = torch.autograd.grad(out.float().square().sum(), (q, k_shared, v_shared))
    args = [t.detach().double().requires_grad_() for t in (q, k_shared, v_shared, r, u, vb)]
    want = memtx_ops.reference.rel_memory_attention(args[0], args[1].expand(k.shape), args[2].expand(v.shape),
                                                    *args[3:])
    want_grads = torch.autograd.grad(want.square().sum(), args[:3])
    got = dict(zip(("out", "dq", "dk", "dv"), (out,) + grads))
    assert_close_to_reference(got, dict(zip(got, (want,) + want_grads)), dtype)
    with torch.no_grad():  # inference reads the expanded half-precision rows themselves
        inferred = cpu_attention(q, k_shared.expand_as(k), v_shared.expand_as(v), r, u, vb)
    assert seen[-1][1].dtype == dtype and seen[-1][1].stride(1) == 0
    assert_close_to_reference({"out": inferred}, {"out": want}, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gradients_of_queries_with_few_keys(dtype):
    """The draw on which the GPU backends' delta from a rounded O fails (test_rel_memory_attention_triton.py): the
    float32 O kept for the backward gets it right."""
    assert_matches_reference(cpu_attention, Case(B=1, H=1, L=2, M=0, D=40, scale=0.08), dtype, seed=13)


def test_half_precision_stride_zero_leaf_gets_a_gradient_per_position():
    q, k, v, r, u, vb = make_inputs(Case(B=1, H=2, L=5, M=7, D=16), torch.bfloat16)
    k = k[:, :1].detach().expand_as(k).requires_grad_()  # a leaf whose head dimension has stride 0
    out = cpu_attention(q, k, v, r, u, vb)
    (dk,) = torch.autograd.grad(out.float().square().sum(), (k,))
    args = [t.detach().double().requires_grad_() for t in (q, k, v, r, u, vb)]
    want = memtx_ops.reference.rel_memory_attention(*args)
    (want_dk,) = torch.autograd.grad(want.square().sum(), (args[1],))
    assert_close_to_reference({"dk": dk}, {"dk": want_dk}, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_torch_compile_fullgraph(dtype):
    assert_compiled_matches_eager(cpu_attention, Case(B=1, H=2, L=12, M=20, D=16), dtype, "cpu", window=16,
                                  compile_backend="aot_eager")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", [
    Case(B=8, H=8, L=1, M=700, D=32),  # decoding: one task per head, all batches share the r rows
    Case(B=3, H=2, L=5, M=1100, D=16, window=900, mem_offset=40, R=500),  # groups of batches, the last one short
    Case(B=1, H=1, L=1, M=3000, D=16),  # one tile: split-K over the key blocks, merged by log-sum-exp
    Case(B=1, H=2, Hk=1, L=16, M=2100, D=24, window=1500, R=1800),  # split-K with ranges that see no key
    Case(B=2, H=2, L=3, M=4500, D=16, window=4200, R=3000),  # long key blocks (4096) unless split-K: two of them
    Case(B=4, H=2, L=16, M=2500, D=16, mem_offset=7),  # long key blocks of 4096 for 16 query rows
    Case(B=5, H=2, L=64, M=300, D=16, window=200),  # groups of 128 query rows (2 batches), the last one short
    # over time-major keys: groups of batches whose chunks fit the L2 budget (1 or 2 of 3 batches at D=256), GQA
    Case(B=3, H=4, L=2, M=500, D=256, R=400),
    Case(B=2, H=4, Hk=2, L=4, M=1500, D=24, window=1000, mem_offset=20, kv_head_index=(1, 0, 0, 1)),
    # lane tiles over time-major keys: every head per task over each key block, groups of up to 32 query rows
    Case(B=5, H=2, L=16, M=1200, D=16),  # groups of 2 batches, the last one short
    Case(B=3, H=4, Hk=2, L=9, M=700, D=24, window=600, mem_offset=11, kv_head_index=(1, 0, 0, 1)),  # GQA, 3 batches
], ids=str)
@pytest.mark.parametrize("strided", [False, "time-major"], ids=["contiguous", "time-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_short_queries_every_work_split(case, threads, dtype, strided):
    """The forward's plan (whole batch groups, smaller groups, split-K; every head per task over time-major keys
    with one query tile) depends on the thread count and the layout; every plan gives the float64 reference, and the
    backward (from the forward's lse) too, with each kind of tile (float32 takes the lane tiles from 5 rows on)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert_matches_reference(cpu_attention, case, dtype, strided=strided)
    finally:
        torch.set_num_threads(previous)
