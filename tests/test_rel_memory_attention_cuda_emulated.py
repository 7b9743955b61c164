"""The CUDA backend (csrc/cuda) run on the CPU by a host emulator against the float64 reference, through its real
ATen wrapper: no GPU needed, so CI exercises on every commit the kernels' logic and what the wrapper does around
them (checks, output allocation, kv_head/u/vb conversion, dr's zeroing, du/dvb's partial sums, copies).

tests/cuda_emulation/emu.h supplies the CUDA built-ins the kernels use: each CUDA thread is a fiber; barriers,
shuffles, mma.sync, ldmatrix and cp.async follow the PTX ISA, under an adversarial schedule (its header says what
is and is not modelled). g++ compiles, against the CPU torch's headers, the ATen wrapper rel_memory_attention_cuda.cpp
with csrc/common/check_inputs.cpp, the real launchers (rel_memory_attention_{fwd,bwd_dq,bwd_dkv}.cu, each
``<<<...>>>`` rewritten to the emulator's launch) with the kernels, and runner.cpp (the CUDA runtime calls, the
emulated device memory, the wrapper's two functions registered as ``torch.ops.memtx_cuda_emu.*``) into one library,
loaded with ``torch.ops.load_library``; shim/ stands in for c10/cuda, which the CPU wheel has no library for. The
test calls those operators as the Python layer calls memtx_C's, and controls the emulator through ctypes.

Inputs are copied into NaN-filled buffers (NaN before, after and between the rows of strided views) and passed as
they are: the wrapper reads q, k, v through their strides. During the calls, torch's CPU allocator is the
emulator's device memory: every buffer the wrapper allocates starts as NaN, between guard zones. So an
out-of-bounds read, an output element left unwritten or a write outside a buffer fails. The cases cover every
feature in float32, float16 and bfloat16, each under two fiber schedules (``MEMTX_EMU_SCHEDULES``); the output and
all six gradients must meet the SPEC tolerances. Injected faults must be caught: kernels without their cp.async
waits, a failed launch (it raises with the emulator's reason), a launch that never ran. The wrapper's own checks
must raise. About 90 s on two cores, compile included.

Skipped, with the reason, only where g++ or the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h,
cuda_runtime_api.h; looked up through CUDA_HOME, CUDA_PATH, nvcc, /usr/local/cuda) are missing.

Sanitizer mode, not run by default: ``MEMTX_EMU_SANITIZE=1`` builds the library with ASan and UBSan; the first
report aborts the run (hence ``-s``, or pytest's capture swallows it). About 4 times slower. The ASan runtime
has to be loaded before Python starts, and libstdc++ with it (else ASan cannot intercept the C++ exceptions the
wrapper's checks throw)::

    MEMTX_EMU_SANITIZE=1 LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0 python -m pytest -q -s tests/test_rel_memory_attention_cuda_emulated.py
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from helpers import FEATURE_CASES, GRAD_NAMES, Case, attention_scales, make_inputs, reference_errors, reference_float64
from memtx_ops.reference import default_kv_head_index

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCHERS = ("rel_memory_attention_fwd.cu", "rel_memory_attention_bwd_dq.cu", "rel_memory_attention_bwd_dkv.cu")
SANITIZE = os.environ.get("MEMTX_EMU_SANITIZE", "") not in ("", "0")
GXX = shutil.which("g++")
# memtx::emu::Fault (emu.h)
NO_FAULT, DROP_WAIT_ALL, FAIL_NEXT_LAUNCH, SKIP_NEXT_LAUNCH = range(4)


def cuda_include_dirs():
    """The CUDA toolkit's include directory (and its cccl/ where it has one), or None."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             nvcc and str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"]
    for root in filter(None, roots):
        include = Path(root) / "include"
        if all((include / h).exists() for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime_api.h")):
            return [str(d) for d in (include, include / "cccl") if d.is_dir()]
    return None


CUDA_INCLUDES = cuda_include_dirs()
if GXX is None:
    pytestmark = pytest.mark.skip(reason="g++ not found: the CUDA kernels were NOT run under the host emulator")
elif CUDA_INCLUDES is None:
    pytestmark = pytest.mark.skip(reason="the CUDA headers (cuda_fp16.h) were not found (set CUDA_HOME): the CUDA "
                                  "kernels were NOT run under the host emulator")


def emulated_launcher_source(path: Path) -> str:
    """A launcher .cu as C++, ``kernel<<<grid, block, smem, stream>>>(args)`` rewritten to
    ``::memtx::emu::launch_kernel(kernel, grid, block, smem, stream)(args)`` (line numbers kept)."""
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)(\s*)<<<(.*?)>>>", re.S)
    text, n = launch.subn(r"::memtx::emu::launch_kernel(\1,\2\3)", path.read_text())
    assert n > 0 and "<<<" not in text, f"{path.name}: kernel launches not recognised"
    return f'#line 1 "{path}"\n{text}'


def build_emulator(build: Path) -> Path:
    """The emulator library, built in ``build``: its three translation units compiled in parallel (runner.cpp with
    the wrapper, check_inputs.cpp, the launchers), linked against torch's libraries."""
    from torch.utils.cpp_extension import include_paths, library_paths

    launchers = build / "launchers.cpp"
    launchers.write_text("\n".join(emulated_launcher_source(CUDA_SRC / name) for name in LAUNCHERS))
    flags = (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
             if SANITIZE else ["-O2"])
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    compile_cmd = [GXX, "-std=c++17", "-fPIC", *flags, abi, "-include", str(EMU_DIR / "emu.h"),
                   f"-I{EMU_DIR / 'shim'}", f"-I{CUDA_SRC}",  # shim/ first: it stands in for torch's c10/cuda
                   *[f"-isystem{d}" for d in (*include_paths(), *CUDA_INCLUDES)]]
    sources = (EMU_DIR / "runner.cpp", ROOT / "csrc" / "common" / "check_inputs.cpp", launchers)
    objects = [build / f"{src.stem}.o" for src in sources]
    cmds = [[*compile_cmd, "-c", str(src), "-o", str(obj)] for src, obj in zip(sources, objects)]
    lib_dirs = library_paths()
    cmds.append([GXX, "-shared", *flags, "-Wl,-z,defs", *map(str, objects), *[f"-L{d}" for d in lib_dirs],
                 "-lc10", "-ltorch_cpu", "-ltorch", *[f"-Wl,-rpath,{d}" for d in lib_dirs],
                 "-o", str(build / "libmemtx_cuda_emu.so")])

    def run(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-8000:]}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(run, cmds[:-1]))
    run(cmds[-1])
    return build / "libmemtx_cuda_emu.so"


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The emulator library, loaded once per process (its operators cannot be registered twice): torch.ops
    registers ``torch.ops.memtx_cuda_emu.*``; the ctypes handle (the same library) gives the emulator's controls."""
    if SANITIZE and "libasan" not in Path("/proc/self/maps").read_text():
        pytest.fail("MEMTX_EMU_SANITIZE=1 needs the ASan runtime loaded before Python: see this file's docstring")
    path = build_emulator(tmp_path_factory.mktemp("cuda_emulation"))
    torch.ops.load_library(str(path))
    lib = ctypes.CDLL(str(path))
    lib.emu_message.restype = ctypes.c_char_p
    lib.emu_launches.restype = ctypes.c_uint
    lib.emu_device_memory_check.restype = ctypes.c_char_p
    return lib


@contextlib.contextmanager
def emulated_device(lib, fault=NO_FAULT, device=None):
    """Runs the calls inside on the emulated device: torch's CPU allocator is its device memory (buffers start as
    NaN between guard zones, checked at the end), with ``fault`` injected and, if given, ``device`` = (compute
    capability major, opt-in shared memory per block). Everything is restored afterwards."""
    assert lib.emu_device_memory(1) == 0, "torch kept another CPU allocator: the emulator's device memory is not used"
    lib.emu_set_fault(fault)
    if device is not None:
        lib.emu_set_device(*device)
    try:
        yield
    finally:
        lib.emu_device_memory(0)
        lib.emu_reset()
    broken = lib.emu_device_memory_check().decode()
    assert not broken, broken


def fwd(*args, float32_out=True):
    """The wrapper's forward; by default as the custom op calls it, writing the float32 out the backward reads."""
    return torch.ops.memtx_cuda_emu.rel_memory_attention_fwd(*args, float32_out)


def bwd(*args):
    return torch.ops.memtx_cuda_emu.rel_memory_attention_bwd(*args)


PAD = 256  # NaN elements before and after every input buffer


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of t, with the same strides and storage offset, inside a NaN-filled buffer."""
    span = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    view = torch.full((span + 2 * PAD,), float("nan"), dtype=t.dtype).as_strided(
        t.shape, t.stride(), PAD + t.storage_offset())
    return view.copy_(t)


# Tiles (rel_memory_attention_dispatch.cuh): 64 queries x 64 keys; 64 x 32 for 16-bit types with D > 64;
# 32 x 32 for float32 with D > 32. Entries: (case, q/k/v as strided views of a fused projection, gradients that
# vanish in exact arithmetic). FEATURE_CASES[2] runs at B=1, H=2: a quarter of the time, the same tiles.
CASES = [
    (FEATURE_CASES[0], False, ()),
    (FEATURE_CASES[1], True, ()),  # M = 0, two query blocks
    (Case(B=1, H=2, L=67, M=200, D=64), False, ()),  # D = 64, K = 267 crosses every key-block size
    (FEATURE_CASES[3], True, ()),  # window 97: key blocks skipped on both sides of M
    (FEATURE_CASES[4], False, ()),  # window 2
    (FEATURE_CASES[5], False, ()),  # mem_offset
    (FEATURE_CASES[6], False, ()),  # clamp, R < K
    (FEATURE_CASES[7], False, ()),  # R > K: rows of r nobody reads
    (FEATURE_CASES[8], True, ()),  # GQA
    (FEATURE_CASES[9], False, ()),  # MQA
    (FEATURE_CASES[10], True, ()),  # cross-head permutation
    (FEATURE_CASES[11], False, ()),  # arbitrary map
    (FEATURE_CASES[12], False, ()),  # window, mem_offset, clamp and a permutation together
    (FEATURE_CASES[13], False, ()),  # D = 128, explicit scale
    (Case(B=1, H=2, Hk=3, L=20, M=12, D=16, kv_head_index=(2, 0)), False, ()),  # kv head 1 unused
    (Case(B=1, H=2, L=129, M=255, D=32, R=100, kv_head_index=(1, 0)), True, ()),  # 3 x 6 blocks, clamp
    (Case(B=1, H=2, L=150, M=70, D=80, window=128), True, ()),  # D = 80 (tiles of 128); 3 or 5 query blocks
    (Case(B=1, H=3, Hk=1, L=65, M=63, D=128, R=30), True, ()),  # MQA with D = 128 and a clamp
    (Case(B=1, H=1, L=35, M=40, D=100, mem_offset=5), False, ()),  # D = 100: 16-bit rows load element-wise
    (Case(B=1, H=2, L=20, M=30, D=18), True, ()),  # D = 18: rows load element-wise in every dtype
    (Case(B=1, H=2, L=20, M=45, D=16, mem_offset=100000), False, ()),  # memory distances far past R
    (Case(B=1, H=2, L=40, M=90, D=32, window=1), False, ("dq", "dk", "dr", "du", "dvb")),  # only its own key
    (Case(B=1, H=2, L=33, M=0, D=40, R=1), False, ("dr", "dvb")),  # R = 1: a constant position term per row
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Fiber schedules (and cp.async landing orders) each case runs under: MEMTX_EMU_SCHEDULES, default 2.
SCHEDULES = int(os.environ.get("MEMTX_EMU_SCHEDULES", "2"))


def case_inputs(case, strided, dtype):
    """-> (inputs (the leaves of make_inputs), guarded (q, k, v, r, u, vb), guarded grad_out, kv_head_index,
    the operators' trailing arguments, the seed of the case)."""
    seed = zlib.crc32(f"{case} {strided}".encode())  # inputs: fixed per case
    inputs = make_inputs(case, dtype, "cpu", strided, seed=seed)
    # strided: grad_out rows D + 1 apart, so not 16-byte aligned (the kernels read them element-wise)
    grad_out = torch.randn(case.B, case.H, case.L, case.D + strided, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed)).to(dtype)
    kv_head_index = (torch.tensor(case.kv_head_index) if case.kv_head_index is not None
                     else default_kv_head_index(case.H, case.kv_heads))
    scale = case.scale if case.scale is not None else case.D ** -0.5
    options = (kv_head_index, case.window or 0, case.mem_offset, scale)
    return (inputs, tuple(guarded(t.detach()) for t in inputs), guarded(grad_out[..., :case.D]), kv_head_index,
            options, seed)


def run_case(lib, case, strided, dtype, schedule, fault=NO_FAULT):
    """One case under one schedule, forward then backward through the wrapper -> (inputs, grad_out,
    kv_head_index, out, grads)."""
    inputs, qkvruvb, grad_out, kv_head_index, options, seed = case_inputs(case, strided, dtype)
    lib.emu_set_seed(seed + 7919 * schedule)
    with emulated_device(lib, fault):
        out, lse = fwd(*qkvruvb, *options)
        grads = bwd(grad_out, *qkvruvb, out, lse, *options)
    return inputs, grad_out, kv_head_index, out, grads


def errors_against_reference(case, dtype, inputs, grad_out, out, grads):
    """reference_errors of out and the six gradients -> (errors, bad)."""
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert g.shape == ref.shape and g.dtype == dtype, name
    got = dict(zip(("out",) + GRAD_NAMES, (out,) + tuple(grads)))
    want = dict(zip(("out",) + GRAD_NAMES, (ref_out,) + tuple(ref_grads)))
    return reference_errors(got, want, dtype, **attention_scales(*inputs[:4], grad_out, case.scale))


@pytest.mark.parametrize("schedule", range(SCHEDULES), ids=lambda s: f"schedule{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,strided,zero_grads", CASES,
                         ids=[f"{case}{',strided' if strided else ''}" for case, strided, _ in CASES])
def test_matches_reference(emulator, case, strided, zero_grads, dtype, schedule):
    inputs, grad_out, kv_head_index, out, grads = run_case(emulator, case, strided, dtype, schedule)
    errors, bad = errors_against_reference(case, dtype, inputs, grad_out, out, grads)
    assert not bad, f"{case} {dtype}: {bad} (all: {errors})"
    assert {n for n, e in errors.items() if e.get("vanishing")} == set(zero_grads), errors
    for g in set(range(case.kv_heads)) - set(kv_head_index.tolist()):  # kv heads no query head reads
        assert not grads[1][:, g].any() and not grads[2][:, g].any() and not grads[3][g].any(), f"kv head {g}"


# Key splits (flash-decoding, forward_key_splits in rel_memory_attention_fwd.cu): on an emulated device of 64
# multiprocessors (one resident block each) the forward of every case here has at most 16 blocks, so it splits each
# query block's keys into up to min(64 / blocks, key blocks) parts and merges them in a second kernel (CASES but the
# last, whose 16-bit keys fit one block). The decoding cases add: one key block a part (L=1), MQA with a clamp, parts
# that see no key at all (a window of 40 keys over 17 key blocks), 16-bit tiles of 32 keys (D=80), and query blocks
# whose visible ranges differ.
SPLIT_CASES = [(case, strided) for case, strided, _ in CASES[:-1]] + [
    (Case(B=2, H=2, L=1, M=700, D=64), False),
    (Case(B=1, H=4, Hk=1, L=1, M=300, D=32, R=200), True),
    (Case(B=1, H=2, L=3, M=1000, D=16, window=40, mem_offset=5), False),
    (Case(B=1, H=1, L=16, M=500, D=80), True),
    (Case(B=1, H=2, L=100, M=150, D=32, window=120), False),
]
SPLIT_MULTIPROCESSORS = 64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,strided", SPLIT_CASES, ids=[f"{c}{',strided' if s else ''}" for c, s in SPLIT_CASES])
def test_key_splits_match_reference(emulator, case, strided, dtype):
    """The split forward (partials, then the merge: two launches) for training (float32 out, whose lse the backward
    reads: all six gradients are checked) and for inference (out of q's dtype, the same lse)."""
    inputs, qkvruvb, grad_out, _, options, seed = case_inputs(case, strided, dtype)
    emulator.emu_set_seed(seed)
    with emulated_device(emulator):
        emulator.emu_set_multiprocessors(SPLIT_MULTIPROCESSORS)
        out, lse = fwd(*qkvruvb, *options)
        assert emulator.emu_launches() == 2, "the forward did not split its keys"
        grads = bwd(grad_out, *qkvruvb, out, lse, *options)
        out16, lse16 = fwd(*qkvruvb, *options, float32_out=False)
    errors, bad = errors_against_reference(case, dtype, inputs, grad_out, out, grads)
    assert not bad, f"{case} {dtype}: {bad} (all: {errors})"
    ref_out, _ = reference_float64(inputs, grad_out, case)
    _, bad = reference_errors({"out": out16}, {"out": ref_out}, dtype)
    assert not bad and out16.dtype == dtype and torch.equal(lse16, lse), bad


def test_key_splits_only_where_the_blocks_cannot_fill_the_device(emulator):
    """The same call splits on a device of many multiprocessors and not on one that its blocks fill; both agree."""
    case = CASES[2][0]  # float32 at D=64: 3 query blocks of 32 rows x 2 heads, 6 blocks
    _, qkvruvb, _, _, options, seed = case_inputs(case, False, torch.float32)
    results = {}
    for multiprocessors, launches in ((11, 1), (12, 2), (SPLIT_MULTIPROCESSORS, 2)):
        emulator.emu_set_seed(seed)
        with emulated_device(emulator):
            emulator.emu_set_multiprocessors(multiprocessors)
            results[multiprocessors] = fwd(*qkvruvb, *options)
            assert emulator.emu_launches() == launches, multiprocessors
    for multiprocessors in (12, SPLIT_MULTIPROCESSORS):
        for got, want in zip(results[multiprocessors], results[11]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# The backward's delta = rowsum(dO * O) once came from a rounded 16-bit O, which swamped the gradients of queries that
# see only a few keys: these draws (two queries, scale 0.08) gave relative L2 errors of 3.9e-2 in float16 and
# 7.6e-2 / 9.0e-2 in bfloat16, where SPEC section 1 allows 1e-2 / 2e-2. The forward now keeps a float32 O for it.
# Then the forward's P.V, from P rounded to 16 bits, missed the P the backward recomputes (2.9e-2 in bfloat16-a):
# the training forward now adds what the rounding lost.
@pytest.mark.parametrize("mem_offset,dtype", [(28, torch.float16), (13, torch.bfloat16), (25, torch.bfloat16)],
                         ids=["float16", "bfloat16-a", "bfloat16-b"])
def test_16bit_gradients_of_queries_with_few_keys(emulator, mem_offset, dtype):
    case = Case(B=1, H=1, L=2, M=0, D=40, mem_offset=mem_offset, scale=0.08)
    inputs, grad_out, _, out, grads = run_case(emulator, case, False, dtype, 0)
    errors, bad = errors_against_reference(case, dtype, inputs, grad_out, out, grads)
    assert not bad, f"{case} {dtype}: {bad} (all: {errors})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_inference_out(emulator, dtype):
    """Without float32_out (inference) the forward writes its 16-bit out directly, from one 16-bit P.V: the same
    lse and, within the dtype's tolerance, the float32 out of the training call (P.V in two parts)."""
    case = Case(B=1, H=2, L=70, M=45, D=40, mem_offset=3)
    _, qkvruvb, _, _, options, _ = case_inputs(case, True, dtype)
    with emulated_device(emulator):
        out32, lse32 = fwd(*qkvruvb, *options)
        out, lse = fwd(*qkvruvb, *options, float32_out=False)
    assert out32.dtype == torch.float32 and out.dtype == dtype and torch.equal(lse, lse32)
    _, bad = reference_errors({"out": out}, {"out": out32.double()}, dtype)
    assert not bad and not torch.equal(out, out32.to(dtype)), bad


@pytest.mark.parametrize("schedule", range(SCHEDULES), ids=lambda s: f"schedule{s}")
def test_missing_cp_async_wait_is_caught(emulator, schedule):
    """The kernels without their cp.async.wait_all: the copies land late, at random switches, so tiles are read
    before they arrive and the results go wrong (or NaN). The emulator must see it, under every schedule.

    The case has 2 query blocks x 5 key blocks per head: on a single tile (B=1, H=2, L=5, M=3, D=16) every copy lands in time under about
    one schedule in 30, and the mutant passed there in CI."""
    case = CASES[2][0]
    inputs, grad_out, _, out, grads = run_case(emulator, case, False, torch.float16, schedule, fault=DROP_WAIT_ALL)
    _, bad = errors_against_reference(case, torch.float16, inputs, grad_out, out, grads)
    assert bad, f"the kernels without cp.async.wait_all passed under the emulator (schedule {schedule})"


SMALL = Case(B=1, H=2, L=8, M=8, D=16)


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_layouts_the_wrapper_converts(emulator, layout):
    """Inputs the wrapper copies before the launches: u and vb with their rows apart (``.contiguous()``), grad_out
    with a last dim that is not contiguous (``last_dim_contiguous``): a transposed copy, or one element expanded,
    as ``out.sum().backward()`` gives it."""
    case = Case(B=1, H=2, L=20, M=12, D=16)
    inputs, (q, k, v, r, u, vb), _, _, options, seed = case_inputs(case, True, torch.float32)
    u, vb = (guarded(torch.cat([t, t], -1)[:, :case.D]) for t in (u, vb))  # NaN between the rows
    if layout == "transposed":
        grad_out = torch.randn(case.B, case.H, case.D, case.L, generator=torch.Generator().manual_seed(seed))
        grad_out = guarded(grad_out).transpose(-1, -2)
    else:
        grad_out = guarded(torch.full((), 0.5)).expand(case.B, case.H, case.L, case.D)
    assert u.stride(0) == 2 * case.D and grad_out.stride(-1) != 1
    with emulated_device(emulator):
        out, lse = fwd(q, k, v, r, u, vb, *options)
        grads = bwd(grad_out, q, k, v, r, u, vb, out, lse, *options)
    errors, bad = errors_against_reference(case, torch.float32, inputs, grad_out.contiguous(), out, grads)
    assert not bad, f"{bad} (all: {errors})"


def test_failed_launch_raises_the_emulators_reason(emulator):
    """A launch that fails (here by an injected fault) comes back through the launcher's cudaError_t and the
    wrapper's check_launch as an error carrying the emulator's message."""
    _, qkvruvb, _, _, options, _ = case_inputs(SMALL, False, torch.float32)
    with pytest.raises(RuntimeError, match="forward kernel launch failed: unspecified launch failure") as info:
        with emulated_device(emulator, FAIL_NEXT_LAUNCH):
            fwd(*qkvruvb, *options)
    reason = emulator.emu_message().decode()
    assert reason.startswith("cuda emulator: block (0, 0, 0) thread ") and "fault injected" in reason, reason
    assert reason in str(info.value)


def test_unwritten_outputs_are_caught(emulator):
    """The forward's launch skipped: the outputs the wrapper allocated keep the NaN the device memory starts as,
    and the comparison with the reference fails."""
    inputs, qkvruvb, grad_out, _, options, _ = case_inputs(SMALL, False, torch.float32)
    with emulated_device(emulator, SKIP_NEXT_LAUNCH):
        out, lse = fwd(*qkvruvb, *options)
    assert out.isnan().all() and lse.isnan().all()
    ref_out, _ = reference_float64(inputs, grad_out, SMALL)
    _, bad = reference_errors({"out": out}, {"out": ref_out}, torch.float32)
    assert list(bad) == ["out"], bad


def test_device_memory_catches_a_write_outside_a_buffer(emulator):
    """The emulator's device memory itself: a buffer starts as NaN; a byte changed just past its end is reported."""
    with emulated_device(emulator):
        t = torch.empty(10)  # from the device memory
    assert t.isnan().all()
    after = ctypes.c_ubyte.from_address(t.data_ptr() + t.nbytes)
    after.value = 0
    assert emulator.emu_device_memory_check() == b"cuda emulator: a write outside a buffer of 40 bytes of device " \
                                                 b"memory, at byte 40 of it"
    after.value = 0xFF
    assert emulator.emu_device_memory_check() == b""


def test_the_wrappers_checks_run(emulator):
    """The wrapper's checks raise their messages: those of check_rel_attn_inputs (csrc/common) and its own, on the
    inputs and on the device cudaDeviceGetAttribute describes."""
    _, (q, k, v, r, u, vb), grad_out, kv_head_index, options, _ = case_inputs(SMALL, False, torch.float32)
    rest = options[1:]

    def raises(match, *args, device=None, op=fwd):
        with pytest.raises(RuntimeError, match=match):
            with emulated_device(emulator, device=device):
                op(*args)

    raises(r"kv_head_index values must lie in \[0, Hk\)", q, k, v, r, u, vb, kv_head_index + 2, *rest)
    raises("inputs must share one dtype", q.half(), k, v, r, u, vb, *options)
    raises("supports float16, bfloat16 and float32, got Double",
           *(t.double() for t in (q, k, v, r, u, vb)), *options)
    raises("expected CPU tensors, got meta", *(t.to("meta") for t in (q, k, v, r, u, vb)), *options)
    wide = [torch.zeros(*t.shape[:-1], 160) for t in (q, k, v, r, u, vb)]
    raises(r"head dim D=160 is not supported \(D <= 128\)", *wide, *options)
    raises(r"needs compute capability 8.0 or newer .* got major 7", q, k, v, r, u, vb, *options, device=(7, 166912))
    raises(r"needs \d+ bytes of shared memory per block for D=16, the device allows 1024", q, k, v, r, u, vb,
           *options, device=(8, 1024))
    out = torch.zeros_like(q)
    raises("grad_out and out must have the shape of q", grad_out[:, :1], q, k, v, r, u, vb, out,
           torch.zeros(1, 2, 8), *options, op=bwd)
    raises(r"lse must be float32 \[B, H, L\]", grad_out, q, k, v, r, u, vb, out, torch.zeros(1, 2, 7), *options,
           op=bwd)
    half = [t.half() for t in (grad_out, q, k, v, r, u, vb)]
    raises("out must be the forward's float32 out", *half, out.half(), torch.zeros(1, 2, 8), *options, op=bwd)
