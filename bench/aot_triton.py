"""Ahead-of-time compile check of every Triton kernel, with Triton's real compiler and no GPU: ``make check-aot``.

For each kernel of ``kernels/`` (attention and resampling), every autotune config of its tables, dtype (float16, bfloat16,
float32 with 3xTF32 or TF32 dots), mode (deterministic dq/dr; split-K forward) and head-dim class (D = 64, 128,
256, the largest of each class), it compiles the kernel for sm_90 (H100/H200) and sm_80 (A100) with
``triton.compile(ASTSource(...), target=GPUTarget(...))``. Run it with the Triton of the GPU image (3.6.0) first on
the path: ``make check-aot`` installs that beside the CI's Triton and sets ``PYTHONPATH``.

The check fails when a config does not compile, when a config needs more shared memory than its target has
(232,448 bytes a block on sm_90, 166,912 on sm_80: autotune would raise OutOfResources for it on the GPU), or when a
(kernel, dtype, mode, D) group has no config that fits. It also fails on register spills in the 16-bit configs that
autotune can pick (the float32 ones are recorded). Every config's registers, spill stores/loads, stack and shared
memory go into ``bench/results/triton-aot-<version>.{md,json}``. A head dim that is not a multiple of 16 must not
switch off cp.async pipelining: every attention config is also compiled at D = 72 (16-bit, sm_90), with the strides
the launcher guarantees (``kernels.utils.aligned_rows``), and must copy asynchronously wherever it does at its
table's bound.

Speed: ptxas dominates. Compiles run in a process pool; their result rows are cached in ``$MEMTX_AOT_CACHE``
(default ``~/.cache/memtx-aot``), keyed by the job (kernel, dtype, precision, mode, D, target, config) and a hash of
the sources it compiles from (its package under ``kernels/`` and ``kernels/*.py``): an unchanged kernel costs a
lookup, an edit recompiles that package's kernels. The committed table records those hashes, so a test sees when it
is stale. A full run from scratch took 4.4-7.7 minutes on 2 cores (685 compiles). ``--sample`` (a quicker look)
compiles every 16-bit config but, of the float32 configs of a group, only the first that fits
(the rest are listed as not compiled). ``--explore KERNEL`` prints a grid of candidate tiles for choosing a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from bench.report import write_gate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = {90: 232448, 80: 166912}  # shared memory a block may use (the opt-in maximum), bytes
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIMS = (64, 128, 256)  # one per class of the config tables (their bounds)
# A head dim that is not a multiple of 16 (masked columns of BLOCK_D = 128), compiled as the launcher hands it over
# (rows padded to 16 elements by kernels.utils.aligned_rows): it must keep the cp.async pipelining of D = 128.
UNALIGNED_HEAD_DIM, UNALIGNED_ARCH, UNALIGNED_DTYPE = 72, 90, "float16"
CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its pointer arguments' element types ("in": the inputs' dtype; "out": float32 in
    the EXACT_PV mode, the training forward's, else the inputs' dtype), float arguments, the config table and the
    modes (extra constexprs) it is launched with."""

    name: str  # attribute of its module
    module: str  # module under kernels/
    pointers: Dict[str, str]
    floats: Tuple[str, ...]
    table: Optional[str]  # attribute holding {dtype kind: {bound: rows}}; None: one fixed launch
    make_config: str = "tile_config"
    modes: Tuple[Tuple[Tuple[str, object], ...], ...] = ((),)
    fixed: Tuple[Tuple[str, object], ...] = ()  # constexprs of a kernel without a table
    warps: int = 4  # num_warps and num_stages of a kernel without a table (Triton's defaults)
    stages: int = 3
    precisions: bool = True  # float32 compiled with both dot precisions (kernels with tl.dot)


IN, OUT, F32, I64 = "in", "out", "fp32", "i64"
ATTN = dict(Q=IN, K=IN, V=IN, R_=IN, U=IN, VB=IN, KV_HEAD=I64)
FWD, BWD = "rel_memory_attention.fwd", "rel_memory_attention.bwd"
DOWN, UP = "causal_resample.downsample", "causal_resample.upsample"


def _flags(*names):
    """Every combination of the boolean constexprs ``names`` -> modes."""
    combos = [()]
    for name in names:
        combos = [c + ((name, value),) for c in combos for value in (False, True)]
    return tuple(combos)


ROWS = dict(make_config="row_tiles", precisions=False)  # the resampling kernels: tile_sizes(D), no dots
KERNELS = [
    KernelSpec("_fwd_kernel", FWD, dict(ATTN, O=OUT, LSE=F32, PART_O=F32, PART_ML=F32), ("qk_scale",),
               "FWD_CONFIGS", modes=_flags("PARTIAL", "EXACT_PV")),
    # EXACT_PV is not one of its constexprs: the mode of the forward it merges, which makes O float32
    KernelSpec("_merge_key_splits_kernel", FWD, dict(PART_O=F32, PART_ML=F32, O=OUT, LSE=F32), (), None,
               fixed=(("BLOCK_R", 16),), warps=2, stages=1, modes=_flags("EXACT_PV"), precisions=False),
    KernelSpec("_bwd_preprocess", BWD, dict(O=F32, DO=IN, DELTA=F32), (), None, fixed=(("BLOCK_M", 64),),
               precisions=False),
    KernelSpec("_bwd_dkdv_kernel", BWD, dict(ATTN, DO=IN, LSE=F32, DELTA=F32, DK=IN, DV=IN), ("scale", "qk_scale"),
               "DKDV_CONFIGS"),
    KernelSpec("_bwd_dq_kernel", BWD, dict(ATTN, DO=IN, LSE=F32, DELTA=F32, DQ=IN, DU=F32, DVB=F32, DR=F32, CQ=F32),
               ("scale", "qk_scale"), "DQ_CONFIGS", modes=_flags("DETERMINISTIC")),
    KernelSpec("_bwd_dr_kernel", BWD, dict(ATTN, DO=IN, LSE=F32, DELTA=F32, CQ=F32, DR=IN), ("scale", "qk_scale"),
               "DR_CONFIGS", make_config="band_config"),
    KernelSpec("_downsample_fwd_kernel", DOWN, dict(X=IN, PREV=IN, W=IN, Y=IN), (), None,
               modes=_flags("HAS_PREV", "HAS_WEIGHTS"), **ROWS),
    KernelSpec("_downsample_bwd_kernel", DOWN, dict(G=IN, W=IN, DX=IN, DPREV=IN), (), None,
               modes=_flags("HAS_WEIGHTS"), **ROWS),
    KernelSpec("_downsample_weights_grad_kernel", DOWN, dict(X=IN, PREV=IN, G=IN, PARTIAL=F32), (), None,
               modes=_flags("HAS_PREV"), **ROWS),
    KernelSpec("_upsample_fwd_kernel", UP, dict(XS=IN, RES=IN, PREV=IN, OUT=IN), (), None,
               modes=_flags("LINEAR", "HAS_PREV"), **ROWS),
    KernelSpec("_upsample_bwd_kernel", UP, dict(G=IN, DXS=IN, DPREV=IN), (), None,
               modes=(((("LINEAR", True), ("FIRST_ROW", 0))), (("LINEAR", False), ("FIRST_ROW", 1))), **ROWS),
]


@dataclasses.dataclass
class Job:
    """One compile: a kernel, a config (or the fixed launch), a dtype and precision, a mode, D and a target."""

    kernel: str
    module: str
    dtype: str
    precision: str
    mode: Tuple[Tuple[str, object], ...]
    head_dim: int
    arch: int
    config: Dict[str, object]  # constexprs of the config
    num_warps: int
    num_stages: int
    bound: int  # the table row (largest BLOCK_D) the config belongs to

    @property
    def group(self) -> Tuple:
        return (self.kernel, self.dtype, self.precision, self.mode, self.head_dim, self.arch)

    def label(self) -> str:
        tile = "x".join(str(v) for k, v in self.config.items() if k.startswith("BLOCK") and k not in ("BLOCK_W",
                                                                                                     "BLOCK_T"))
        return f"{tile} w{self.num_warps} s{self.num_stages}"


def load_kernels():
    """The kernel modules as plain imports from the repository (``kernels`` is a leaf: no memtx_ops, no device)."""
    sys.path.insert(0, ROOT)
    import importlib

    return {spec.module: importlib.import_module(f"kernels.{spec.module}") for spec in KERNELS}


def kernels_digest(module: str) -> str:
    """A hash of the sources a kernel module compiles from: its package under ``kernels/`` and the shared
    ``kernels/*.py``. Cached results are reused only for the same sources."""
    digest = hashlib.sha256()
    folder = os.path.join(ROOT, "kernels")
    package = os.path.join(folder, module.split(".")[0])
    paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py")]
    paths += [os.path.join(package, f) for f in os.listdir(package) if f.endswith(".py")]
    for path in sorted(paths):
        with open(path, "rb") as f:
            digest.update(os.path.relpath(path, folder).encode() + f.read())
    return digest.hexdigest()[:16]


def precisions_of(spec: KernelSpec, dtype: str) -> Tuple[str, ...]:
    return ("tf32x3", "tf32") if dtype == "float32" and spec.precisions else ("tf32",)


def configs_of(spec: KernelSpec, module, dtype: str, head_dim: int, tables=None):
    """[(constexprs, num_warps, num_stages, bound)] a launch of ``spec`` at ``head_dim`` can pick."""
    from kernels import utils

    if spec.make_config == "row_tiles":
        block_m, block_d = module.tile_sizes(head_dim, interpreted=False)
        return [(dict(BLOCK_M=block_m, BLOCK_D=block_d), 4, 3, head_dim)]
    if spec.table is None:
        return [(dict(spec.fixed), spec.warps, spec.stages, head_dim)]
    table = (tables or {}).get(spec.name) or getattr(module, spec.table)["fp32" if dtype == "float32" else "16bit"]
    bound = next(b for b in sorted(table) if b >= head_dim)
    make = getattr(module, spec.make_config, None) or getattr(utils, spec.make_config)
    return [(dict(c.kwargs), c.num_warps, c.num_stages, bound) for c in (make(*row) for row in table[bound])]


def jobs(modules, head_dims=HEAD_DIMS, arches=(90, 80), tables=None, dtypes=tuple(DTYPES), unaligned=True) -> List[Job]:
    """Every compile of the check; ``tables`` ({kernel: {bound: rows}}) replaces a kernel's table (``--explore``).
    With ``unaligned``, also every attention config at ``UNALIGNED_HEAD_DIM`` (16-bit, sm_90: the pipelining check)."""
    out = []
    for spec in KERNELS:
        module = modules[spec.module]
        for dtype in dtypes:
            for precision, mode, head_dim, arch in ((p, m, d, a) for p in precisions_of(spec, dtype)
                                                    for m in spec.modes for d in head_dims for a in arches):
                if dtype == "float32" and dict(mode).get("EXACT_PV"):
                    continue  # the launcher splits P for 16-bit inputs only
                for config, warps, stages, bound in configs_of(spec, module, dtype, head_dim, tables):
                    out.append(Job(spec.name, spec.module, dtype, precision, mode, head_dim, arch, config, warps,
                                   stages, bound))
    if unaligned:
        out += [j for j in jobs(modules, (UNALIGNED_HEAD_DIM,), (UNALIGNED_ARCH,), tables, (UNALIGNED_DTYPE,), False)
                if j.module in (FWD, BWD)]
    return out


PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(log: str) -> Dict[str, int]:
    """Registers of the entry function and stack / spills summed over every function in ptxas -v ``log`` (a called
    device function's spills run too) -> {} when the log has none."""
    entry = PTXAS_ENTRY.search(log)
    if entry is None:
        return {}
    registers = PTXAS_REGISTERS.search(log, entry.end())
    frames = [tuple(map(int, m.groups())) for m in PTXAS_FRAME.finditer(log)]
    if registers is None or not frames:
        return {}
    return dict(registers=int(registers.group(1)), stack=max(f[0] for f in frames),
                spill_stores=sum(f[1] for f in frames), spill_loads=sum(f[2] for f in frames))


def compile_job(job: Job) -> Dict[str, object]:
    """Compiles one job in this (worker) process -> its result row (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    modules = load_kernels()
    spec = next(s for s in KERNELS if s.name == job.kernel)
    kernel = getattr(modules[job.module], job.kernel)
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an Autotuner wraps the JITFunction
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    block_d = max(16, triton.next_power_of_2(job.head_dim))
    constexprs = dict(D=job.head_dim, BLOCK_D=block_d, PRECISION=job.precision)
    if "BLOCK_DC" in constexpr:  # the backward's column block, set by its launcher
        constexprs["BLOCK_DC"] = modules[job.module].column_block(block_d)
    constexprs = {k: v for k, v in dict(constexprs, **job.config, **dict(job.mode)).items() if k in constexpr}
    signature, attrs = {}, {}
    element = DTYPES[job.dtype]
    for index, name in enumerate(fn.arg_names):
        if name in constexpr:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            role = spec.pointers[name]
            if role == OUT:
                role = F32 if dict(job.mode).get("EXACT_PV") else IN
            signature[name] = "*" + (element if role == IN else role)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations: 16-byte aligned
        elif name in spec.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(index,)] = [["tt.divisibility", 16]]  # rows of D >= 16 elements
    row = dict(kernel=job.kernel, dtype=job.dtype, precision=job.precision, mode=dict(job.mode), D=job.head_dim,
               arch=job.arch, config=job.label(), bound=job.bound)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with _captured_fd(1) as captured:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", job.arch, 32),
                                      options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
        log.write(captured())
    except Exception as exc:  # noqa: BLE001 - every failure is a result row
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        return row
    row.update(ok=True, seconds=round(time.perf_counter() - start, 2), shared=compiled.metadata.shared,
               hash=compiled.hash, async_copies=len(CP_ASYNC.findall(compiled.asm["ptx"])))
    resources = ptxas_resources(log.getvalue())
    if not resources:
        row.update(ok=False, error="no ptxas -v log (was the compile served from a cache?)")
    return dict(row, **resources)


@contextlib.contextmanager
def _captured_fd(fd: int):
    """Captures what is written to the file descriptor ``fd`` (ptxas's -v log, which Triton prints to stdout with
    TRITON_DUMP_PTXAS_LOG=1) -> a function returning it."""
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(fd)
        sys.stdout.flush()
        os.dup2(tmp.fileno(), fd)
        text = []
        try:
            yield lambda: "".join(text)
        finally:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read())


def check(rows: List[Dict]) -> List[str]:
    """The failures: compile errors, shared memory over the target's limit, groups with no fitting config, spills in
    16-bit configs that autotune can pick, and cp.async pipelining lost at the unaligned head dim (a config that
    streams its tiles with cp.async at its table's bound D must still do so at ``UNALIGNED_HEAD_DIM``)."""
    failures, groups = [], {}
    config_of = lambda r: (r["kernel"], r["dtype"], r["precision"], json.dumps(r["mode"]), r["arch"], r["config"])  # noqa
    async_at_bound = {config_of(r): r.get("async_copies", 0) for r in rows
                      if r.get("ok") and r["D"] == r.get("bound")}
    for r in rows:
        if r.get("skipped"):
            continue
        key = (r["kernel"], r["dtype"], r["precision"], json.dumps(r["mode"]), r["D"], r["arch"])
        fits = r["ok"] and r["shared"] <= SHARED_LIMIT[r["arch"]]
        groups.setdefault(key, []).append(fits)
        what = f"{r['kernel']} {r['dtype']} {r['precision']} {r['mode']} D={r['D']} sm_{r['arch']} {r['config']}"
        if not r["ok"]:
            failures.append(f"does not compile: {what}: {r['error']}")
        elif not fits:
            failures.append(f"shared memory {r['shared']} > {SHARED_LIMIT[r['arch']]}: {what}")
        elif r["dtype"] != "float32" and (r.get("spill_stores") or r.get("spill_loads")):
            failures.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads: {what}")
        if r["ok"] and r["D"] == UNALIGNED_HEAD_DIM and async_at_bound.get(config_of(r)) \
                and not r.get("async_copies"):
            failures.append(f"no cp.async at D={r['D']} (it streams with cp.async at D={r['bound']}): {what}")
    for key, fits in groups.items():
        if not any(fits):
            failures.append(f"no config fits: {' '.join(map(str, key))}")
    return failures


def table(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# Triton AOT compile check ({meta['triton']})", "",
             f"Compiled for sm_90 and sm_80 with Triton {meta['triton']}'s compiler (`triton.compile` with a "
             "`GPUTarget`, no GPU), by `make check-aot`. Shared memory: bytes a block needs (limit 232,448 on sm_90, "
             "166,912 on sm_80). Registers and spills from ptxas -v; cp.async: asynchronous copies in the PTX (the "
             f"tiles streamed by software pipelining; D={UNALIGNED_HEAD_DIM} rows check that a head dim not a multiple "
             "of 16 keeps them).", "",
             f"- jobs: {meta['jobs']}, compiled now: {meta['compiled']}, from the cache: {meta['cached']}, "
             f"not compiled (--sample): {meta['skipped']}; {meta['seconds']} s", "",
             "| kernel | dtype | dots | mode | D | arch | config | shared B | fits | registers | spill st/ld B | "
             "stack B | cp.async | s |", "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["precision"], json.dumps(r["mode"]), r["D"],
                                         -r["arch"], r["config"])):
        mode = ",".join(f"{k}={v}" for k, v in r["mode"].items()) or "-"
        if r.get("skipped"):
            cells = ["not compiled (sample)"] + ["-"] * 6
        elif not r["ok"]:
            cells = ["-", "no: " + r["error"][:80]] + ["-"] * 5
        else:
            fits = r["shared"] <= SHARED_LIMIT[r["arch"]]
            spills = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
            cells = [str(r["shared"]), "yes" if fits else "**no**", str(r.get("registers", "?")), spills,
                     str(r.get("stack", "?")), str(r.get("async_copies", "?")), str(r.get("seconds", "cached"))]
        lines.append("| " + " | ".join([r["kernel"], r["dtype"], r["precision"], mode, str(r["D"]),
                                         f"sm_{r['arch']}", r["config"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def compile_all(all_jobs: List[Job], cache: Dict[str, Dict], sample: bool, workers: int):
    """Rows of ``all_jobs`` in order: cached ones looked up (key: the job and its sources' digest), the rest compiled
    in a process pool; with ``sample`` a float32 group stops at its first config that fits (the rest: skipped)."""
    digests = {j.module: kernels_digest(j.module) for j in all_jobs}
    key = lambda j: json.dumps(dict(dataclasses.asdict(j), sources=digests[j.module]), sort_keys=True,  # noqa
                               default=str)
    rows_by_job: Dict[int, Dict] = {}
    todo = []
    for job in all_jobs:
        if key(job) in cache:
            rows_by_job[id(job)] = dict(cache[key(job)], cached=True)
        else:
            todo.append(job)
    first = [j for j in todo if not (sample and j.dtype == "float32")]
    groups: Dict[Tuple, List[Job]] = {}
    for job in todo:
        if sample and job.dtype == "float32":
            groups.setdefault(job.group, []).append(job)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for job, row in zip(first, pool.map(compile_job, first)):
            rows_by_job[id(job)] = cache[key(job)] = row
        pending = {g: iter(js) for g, js in groups.items()}
        while pending:
            batch = {g: j for g, j in ((g, next(it, None)) for g, it in pending.items()) if j is not None}
            fitted = set()
            for (g, job), row in zip(list(batch.items()), pool.map(compile_job, batch.values())):
                rows_by_job[id(job)] = cache[key(job)] = row
                if row["ok"] and row["shared"] <= SHARED_LIMIT[job.arch]:
                    fitted.add(g)
            pending = {g: pending[g] for g in batch if g not in fitted}
    for job in all_jobs:
        rows_by_job.setdefault(id(job), dict(kernel=job.kernel, dtype=job.dtype, precision=job.precision,
                                             mode=dict(job.mode), D=job.head_dim, arch=job.arch, config=job.label(),
                                             bound=job.bound, skipped=True))
    return [rows_by_job[id(j)] for j in all_jobs]


def explore(modules, kernel: str, head_dims, workers: int, dtype: str, blocks=(16, 32, 64, 128), warps=(4, 8),
            stages=(1, 2, 3), arches=(90, 80)) -> None:
    """Prints registers, spills and shared memory of a grid of tiles for one kernel: for choosing tables."""
    spec = next(s for s in KERNELS if s.name == kernel)
    rows = [(m, n, w, st) for m in blocks for n in blocks if n <= 64 for w in warps for st in stages
            if m * n <= 64 * 64 * (w // 4)]
    tables = {kernel: {d: rows for d in head_dims}}
    grid = [j for j in jobs(modules, head_dims, arches, tables, (dtype,), unaligned=False) if j.kernel == kernel
            and j.mode == spec.modes[0] and j.precision == precisions_of(spec, dtype)[-1]]
    print("D arch config registers spill_stores shared", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for r in pool.map(compile_job, grid):
            print(r["D"], r["arch"], r["config"], r.get("registers"), r.get("spill_stores"), r.get("shared"),
                  r.get("error", ""), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot_triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", action="store_true", help="of the float32 configs of a group, only the first that fits")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    p.add_argument("--explore", metavar="KERNEL", help="print a grid of candidate tiles of KERNEL, no check")
    p.add_argument("--explore-dtype", default="float16", choices=tuple(DTYPES))
    p.add_argument("--explore-grid", default="16,32,64,128/4,8/1,2,3", help="blocks/warps/stages of --explore")
    opts = p.parse_args(argv)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # the workers print ptxas -v, which compile_job reads
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a compile served from Triton's cache prints no log
    cache_dir = os.environ.get("MEMTX_AOT_CACHE", os.path.expanduser("~/.cache/memtx-aot"))
    os.makedirs(cache_dir, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir, "triton"))
    import triton

    modules = load_kernels()
    if opts.explore:
        blocks, warps, stages = (tuple(int(v) for v in part.split(",")) for part in opts.explore_grid.split("/"))
        explore(modules, opts.explore, HEAD_DIMS, opts.jobs, opts.explore_dtype, blocks, warps, stages)
        return 0
    all_jobs = [j for j in jobs(modules) if opts.kernels is None or j.kernel in opts.kernels.split(",")]
    results_path = os.path.join(cache_dir, f"results-{triton.__version__}.json")
    cache = json.load(open(results_path)) if os.path.exists(results_path) else {}
    start = time.perf_counter()
    rows = compile_all(all_jobs, cache, opts.sample, opts.jobs)
    with open(results_path, "w") as f:
        json.dump(cache, f)
    meta = dict(triton=triton.__version__, sources={m: kernels_digest(m) for m in sorted({j.module for j in all_jobs})},
                sample=opts.sample, jobs=len(rows), compiled=sum(1 for r in rows if not r.get("cached")
                                                                      and not r.get("skipped")),
                cached=sum(1 for r in rows if r.get("cached")), skipped=sum(1 for r in rows if r.get("skipped")),
                seconds=round(time.perf_counter() - start))
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"triton-aot-{triton.__version__}")
    return write_gate(stem, table(rows, meta), meta, [{k: v for k, v in r.items() if k != "cached"} for r in rows],
                      check(rows))


if __name__ == "__main__":
    sys.exit(main())
