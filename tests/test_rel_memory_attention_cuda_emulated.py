"""The CUDA backend (csrc/cuda), kernels and launchers, run on the CPU by a host emulator against the float64
reference: no GPU needed, so CI exercises the kernels' logic on every commit.

tests/cuda_emulation/emu.h supplies the CUDA built-ins the kernels use: each CUDA thread is a fiber; barriers,
shuffles, mma.sync, ldmatrix and cp.async follow the PTX ISA, under an adversarial schedule (its header says
what is and is not modelled). g++ compiles the real launchers (rel_memory_attention_{fwd,bwd_dq,bwd_dkv}.cu,
each ``<<<...>>>`` rewritten to the emulator's launch) with the kernels and runner.cpp into a library loaded
through ctypes; ``emulated_cuda_attention`` does what the ATen wrapper rel_memory_attention_cuda.cpp does
around the launchers.

Inputs are copied into NaN-filled buffers (NaN before, after and between the rows of strided views) and the
outputs start as NaN, so an out-of-bounds read, an output element left unwritten or a write outside a buffer
fails. The cases cover every feature in float32, float16 and bfloat16, each under two fiber schedules
(``MEMTX_EMU_SCHEDULES``); the output and all six gradients must meet the SPEC tolerances. A mutant built without
the kernels' cp.async waits must fail. About 90 s on two cores, compile included.

Skipped, with the reason, only where g++ or the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h,
cuda_runtime_api.h; looked up through CUDA_HOME, CUDA_PATH, nvcc, /usr/local/cuda) are missing.

Sanitizer mode, not run by default: ``MEMTX_EMU_SANITIZE=1`` builds the library with ASan and UBSan; the first
report aborts the run (hence ``-s``, or pytest's capture swallows it). About 4 times slower. The ASan runtime
has to be loaded before Python starts::

    MEMTX_EMU_SANITIZE=1 LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        python -m pytest -q -s tests/test_rel_memory_attention_cuda_emulated.py
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from helpers import FEATURE_CASES, GRAD_NAMES, Case, attention_units, make_inputs, reference_errors, reference_float64
from memtx_ops.reference import default_kv_head_index

CUDA_SRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulation"
LAUNCHERS = ("rel_memory_attention_fwd.cu", "rel_memory_attention_bwd_dq.cu", "rel_memory_attention_bwd_dkv.cu")
SANITIZE = os.environ.get("MEMTX_EMU_SANITIZE", "") not in ("", "0")
GXX = shutil.which("g++")


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


# ctypes mirrors of the structs of rel_memory_attention_launch.h (checked against the compiled layout).
class Strided4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("sr", ctypes.c_int64)]


class RelAttnProblem(ctypes.Structure):
    _fields_ = [("q", Strided4), ("k", Strided4), ("v", Strided4),
                ("r", ctypes.c_void_p), ("r_sh", ctypes.c_int64), ("r_sr", ctypes.c_int64),
                ("u", ctypes.c_void_p), ("vb", ctypes.c_void_p), ("kv_head", ctypes.c_void_p),
                *[(name, ctypes.c_int) for name in ("B", "H", "L", "D", "Hk", "K", "M", "R", "window")],
                ("mem_offset", ctypes.c_int64), ("scale", ctypes.c_float), ("dtype", ctypes.c_int)]


class RelAttnForward(ctypes.Structure):
    _fields_ = [("out", ctypes.c_void_p), ("lse", ctypes.c_void_p)]


class RelAttnBackward(ctypes.Structure):
    _fields_ = [("dout", Strided4), ("out", Strided4),
                *[(name, ctypes.c_void_p) for name in ("lse", "delta", "dq", "dk", "dv", "dr_acc", "du_part",
                                                       "dvb_part")]]


DTYPE_NAMES = {torch.float16: "DType::kHalf", torch.bfloat16: "DType::kBFloat16", torch.float32: "DType::kFloat"}


def emulated_launcher_source(path: Path) -> str:
    """A launcher .cu as C++, ``kernel<<<grid, block, smem, stream>>>(args)`` rewritten to
    ``::memtx::emu::launch_kernel(kernel, grid, block, smem, stream)(args)`` (line numbers kept)."""
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)(\s*)<<<(.*?)>>>", re.S)
    text, n = launch.subn(r"::memtx::emu::launch_kernel(\1,\2\3)", path.read_text())
    assert n > 0 and "<<<" not in text, f"{path.name}: kernel launches not recognised"
    return f'#line 1 "{path}"\n{text}'


def build_emulator(build: Path, defines=()):
    """The emulator library (ctypes.CDLL), built in ``build`` (``defines``: extra -D macros, for mutants)."""
    launchers = build / "launchers.cpp"
    launchers.write_text("\n".join(emulated_launcher_source(CUDA_SRC / name) for name in LAUNCHERS))
    flags = (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
             if SANITIZE else ["-O2"]) + [f"-D{d}" for d in defines]
    lib_path = build / "libmemtx_cuda_emu.so"
    cmd = [GXX, "-std=c++17", "-shared", "-fPIC", "-Wl,-z,defs", *flags, "-include", str(EMU_DIR / "emu.h"),
           f"-I{CUDA_SRC}", *[f"-isystem{d}" for d in CUDA_INCLUDES], str(EMU_DIR / "runner.cpp"), str(launchers),
           "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-8000:]}"

    lib = ctypes.CDLL(str(lib_path))
    lib.emu_message.restype = ctypes.c_char_p
    lib.emu_layout.restype = ctypes.c_long
    lib.emu_layout.argtypes = [ctypes.c_char_p]
    for struct in (Strided4, RelAttnProblem, RelAttnForward, RelAttnBackward):
        assert lib.emu_layout(struct.__name__.encode()) == ctypes.sizeof(struct), f"sizeof({struct.__name__})"
        for name, _ in struct._fields_:
            where = f"{struct.__name__}.{name}"
            assert lib.emu_layout(where.encode()) == getattr(struct, name).offset, f"offset of {where}"
    lib.dtype_code = {dt: lib.emu_layout(name.encode()) for dt, name in DTYPE_NAMES.items()}
    return lib


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if SANITIZE and "libasan" not in Path("/proc/self/maps").read_text():
        pytest.fail("MEMTX_EMU_SANITIZE=1 needs the ASan runtime loaded before Python: see this file's docstring")
    return build_emulator(tmp_path_factory.mktemp("cuda_emulation"))


PAD = 256  # NaN elements before and after every buffer the kernels see


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of t, with the same strides and storage offset, inside a NaN-filled buffer."""
    span = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    view = torch.full((span + 2 * PAD,), float("nan"), dtype=t.dtype).as_strided(
        t.shape, t.stride(), PAD + t.storage_offset())
    return view.copy_(t)


def nan_buffer(*shape, dtype, fill=float("nan")) -> torch.Tensor:
    return guarded(torch.full(shape, fill, dtype=dtype))


def margins_intact(t: torch.Tensor) -> bool:
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    return bool(flat[:PAD].isnan().all() and flat[-PAD:].isnan().all())


def strided4(t: torch.Tensor) -> Strided4:
    return Strided4(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def emulated_cuda_attention(lib, q, k, v, r, u, vb, grad_out, kv_head_index, window, mem_offset, scale):
    """rel_memory_attention_fwd_cuda then rel_memory_attention_bwd_cuda (rel_memory_attention_cuda.cpp) minus
    the input checks, on NaN-guarded output buffers. -> (out, lse, (dq, dk, dv, dr, du, dvb))."""
    B, H, L, D = q.shape
    Hk, K, R = k.shape[1], k.shape[2], r.shape[1]
    kv_head, u, vb = kv_head_index.to(torch.int64).contiguous(), u.contiguous(), vb.contiguous()
    dtype = lib.dtype_code[q.dtype]
    problem = RelAttnProblem(strided4(q), strided4(k), strided4(v), r.data_ptr(), r.stride(0), r.stride(1),
                             u.data_ptr(), vb.data_ptr(), kv_head.data_ptr(), B, H, L, D, Hk, K, K - L, R,
                             0 if window >= K else window, mem_offset, scale, dtype)

    def launch(entry, outputs):
        err = entry(ctypes.byref(problem), ctypes.byref(outputs))
        assert err == 0, f"{entry.__name__}: cudaError_t {err}: {lib.emu_message().decode()}"

    out, lse = nan_buffer(B, H, L, D, dtype=q.dtype), nan_buffer(B, H, L, dtype=torch.float32)
    launch(lib.emu_forward, RelAttnForward(out.data_ptr(), lse.data_ptr()))

    dout = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    n_qb = -(-L // lib.emu_query_block_rows(D, dtype))
    dq, delta = nan_buffer(B, H, L, D, dtype=q.dtype), nan_buffer(B, H, L, dtype=torch.float32)
    dk, dv = nan_buffer(B, Hk, K, D, dtype=q.dtype), nan_buffer(B, Hk, K, D, dtype=q.dtype)
    dr_acc = nan_buffer(Hk, R, D, dtype=torch.float32, fill=0.0)
    du_part, dvb_part = nan_buffer(B * n_qb, H, D, dtype=torch.float32), nan_buffer(B * n_qb, H, D, dtype=torch.float32)
    buffers = (lse, delta, dq, dk, dv, dr_acc, du_part, dvb_part)
    launch(lib.emu_backward, RelAttnBackward(strided4(dout), strided4(out), *(t.data_ptr() for t in buffers)))
    assert all(margins_intact(t) for t in (out, *buffers)), "a kernel wrote outside its output buffer"
    return out, lse, (dq, dk, dv, dr_acc.to(q.dtype), du_part.sum(0).to(q.dtype), dvb_part.sum(0).to(q.dtype))


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


def run_case(lib, case, strided, dtype, schedule):
    """One case under one schedule -> (inputs, grad_out, out, grads)."""
    seed = zlib.crc32(f"{case} {strided}".encode())  # inputs: fixed per case
    inputs = make_inputs(case, dtype, "cpu", strided, seed=seed)
    q, k, v, r, u, vb = (guarded(t.detach()) for t in inputs)
    # strided: grad_out rows D + 1 apart, so not 16-byte aligned (the kernels read them element-wise)
    grad_out = torch.randn(case.B, case.H, case.L, case.D + strided, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed)).to(dtype)
    grad_out = guarded(grad_out[..., :case.D])
    kv_head_index = (torch.tensor(case.kv_head_index) if case.kv_head_index is not None
                     else default_kv_head_index(case.H, case.kv_heads))
    scale = case.scale if case.scale is not None else case.D ** -0.5
    lib.emu_set_seed(seed + 7919 * schedule)
    out, _, grads = emulated_cuda_attention(lib, q, k, v, r, u, vb, grad_out, kv_head_index, case.window or 0,
                                            case.mem_offset, scale)
    return inputs, grad_out, kv_head_index, out, grads


@pytest.mark.parametrize("schedule", range(SCHEDULES), ids=lambda s: f"schedule{s}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,strided,zero_grads", CASES,
                         ids=[f"{case}{',strided' if strided else ''}" for case, strided, _ in CASES])
def test_matches_reference(emulator, case, strided, zero_grads, dtype, schedule):
    inputs, grad_out, kv_head_index, out, grads = run_case(emulator, case, strided, dtype, schedule)
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)

    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert g.shape == ref.shape and g.dtype == dtype, name
    got = dict(zip(("out",) + GRAD_NAMES, (out,) + tuple(grads)))
    want = dict(zip(("out",) + GRAD_NAMES, (ref_out,) + tuple(ref_grads)))
    units = attention_units(*inputs[:4], grad_out, case.scale)
    errors, bad = reference_errors(got, want, dtype, units=units)
    assert not bad, f"{case} {dtype}: {bad} (all: {errors})"
    assert {n for n, e in errors.items() if e.get("vanishing")} == set(zero_grads), errors
    for g in set(range(case.kv_heads)) - set(kv_head_index.tolist()):  # kv heads no query head reads
        assert not grads[1][:, g].any() and not grads[2][:, g].any() and not grads[3][g].any(), f"kv head {g}"


def test_missing_cp_async_wait_is_caught(tmp_path):
    """The kernels built without their cp.async.wait_all: the copies land late, at random switches, so tiles are
    read before they arrive and the results go wrong (or NaN). The emulator must see it."""
    mutant = build_emulator(tmp_path, defines=("MEMTX_EMU_DROP_WAIT_ALL",))
    case = FEATURE_CASES[0]
    inputs, grad_out, _, out, grads = run_case(mutant, case, False, torch.float16, 0)
    ref_out, ref_grads = reference_float64(inputs, grad_out, case)
    got = dict(zip(("out",) + GRAD_NAMES, (out,) + tuple(grads)))
    want = dict(zip(("out",) + GRAD_NAMES, (ref_out,) + tuple(ref_grads)))
    _, bad = reference_errors(got, want, torch.float16, units=attention_units(*inputs[:4], grad_out, case.scale))
    assert bad, "the kernels without cp.async.wait_all passed under the emulator"
