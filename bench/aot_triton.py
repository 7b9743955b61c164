"""Ahead-of-time compile check of every Triton kernel, with Triton's real compiler and no GPU: ``make check-aot``.

For each kernel of ``kernels/rel_memory_attention``, every autotune config of its tables, dtype (float16, bfloat16,
float32 with 3xTF32 or TF32 dots), mode (deterministic dq/dr; split-K forward) and head-dim class (D = 64, 128,
256, the largest of each class), it compiles the kernel for sm_90 (H100/H200) and sm_80 (A100) with
``triton.compile(ASTSource(...), target=GPUTarget(...))``. Run it with the Triton of the GPU image (3.6.0) first on
the path: ``make check-aot`` installs that beside the CI's Triton and sets ``PYTHONPATH``.

The check fails when a config does not compile, when a config needs more shared memory than its target has
(232,448 bytes a block on sm_90, 166,912 on sm_80: autotune would raise OutOfResources for it on the GPU), or when a
(kernel, dtype, mode, D) group has no config that fits. It also fails on register spills in the 16-bit configs that
autotune can pick (the float32 ones are recorded). Every config's registers, spill stores/loads, stack and shared
memory go into ``bench/results/triton-aot-<version>.{md,json}``.

Speed: ptxas dominates. Compiles run in a process pool and are cached (Triton's own cache plus this check's
results, keyed by Triton's hash of the source, config and target, in ``$MEMTX_AOT_CACHE``, default
``~/.cache/memtx-aot``): an unchanged kernel costs a cache lookup. ``--sample`` (what CI runs) compiles every 16-bit
config but, of the float32 configs of a group, only the first that fits (the rest are listed as not compiled).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = {90: 232448, 80: 166912}  # dynamic shared memory a block may use, bytes
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
HEAD_DIMS = (64, 128, 256)  # one per class of the config tables (their bounds)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its pointer arguments' element types ("in": the inputs' dtype), float
    arguments, the config table and the modes (extra constexprs) it is launched with."""

    name: str  # attribute of its module
    module: str  # under kernels.rel_memory_attention
    pointers: Dict[str, str]
    floats: Tuple[str, ...]
    table: Optional[str]  # attribute holding {dtype kind: {bound: rows}}; None: one fixed launch
    make_config: str = "tile_config"
    modes: Tuple[Tuple[Tuple[str, object], ...], ...] = ((),)
    fixed: Tuple[Tuple[str, object], ...] = ()  # constexprs of a kernel without a table


IN, F32, I64 = "in", "fp32", "i64"
ATTN = dict(Q=IN, K=IN, V=IN, R_=IN, U=IN, VB=IN, KV_HEAD=I64)
KERNELS = [
    KernelSpec("_fwd_kernel", "fwd", dict(ATTN, O=IN, LSE=F32, PART_O=F32, PART_ML=F32), ("qk_scale",),
               "FWD_CONFIGS", modes=((("PARTIAL", False),), (("PARTIAL", True),))),
    KernelSpec("_bwd_preprocess", "bwd", dict(O=IN, DO=IN, DELTA=F32), (), None, fixed=(("BLOCK_M", 64),)),
    KernelSpec("_bwd_dkdv_kernel", "bwd", dict(ATTN, DO=IN, LSE=F32, DELTA=F32, DK=IN, DV=IN), ("scale", "qk_scale"),
               "BWD_CONFIGS"),
    KernelSpec("_bwd_dq_kernel", "bwd", dict(ATTN, DO=IN, LSE=F32, DELTA=F32, DQ=IN, DU=F32, DVB=F32, DR=F32, CQ=F32),
               ("scale", "qk_scale"), "BWD_CONFIGS",
               modes=((("DETERMINISTIC", False),), (("DETERMINISTIC", True),))),
    KernelSpec("_bwd_dr_kernel", "bwd", dict(ATTN, DO=IN, LSE=F32, DELTA=F32, CQ=F32, DR=IN), ("scale", "qk_scale"),
               "DR_CONFIGS", make_config="band_config"),
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
    """The kernels package as a plain import from the repository (a leaf: no memtx_ops, no torch device)."""
    sys.path.insert(0, ROOT)
    import importlib

    return {m: importlib.import_module(f"kernels.rel_memory_attention.{m}") for m in ("fwd", "bwd")}


def jobs(modules, head_dims=HEAD_DIMS, arches=(90, 80)) -> List[Job]:
    from kernels import utils

    out = []
    for spec in KERNELS:
        module = modules[spec.module]
        for dtype in DTYPES:
            precisions = ("tf32x3", "tf32") if dtype == "float32" else ("tf32",)
            kind = "fp32" if dtype == "float32" else "16bit"
            for precision, mode, head_dim, arch in ((p, m, d, a) for p in precisions for m in spec.modes
                                                    for d in head_dims for a in arches):
                if spec.table is None:
                    out.append(Job(spec.name, spec.module, dtype, precision, mode, head_dim, arch, dict(spec.fixed),
                                   4, 3, head_dim))
                    continue
                table = getattr(module, spec.table)[kind]
                bound = next(b for b in sorted(table) if b >= head_dim)
                make = getattr(module, spec.make_config, None) or getattr(utils, spec.make_config)
                for row in table[bound]:
                    config = make(*row)
                    out.append(Job(spec.name, spec.module, dtype, precision, mode, head_dim, arch,
                                   dict(config.kwargs), config.num_warps, config.num_stages, bound))
    return out


PTXAS = re.compile(r"Used (\d+) registers")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


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
    block_d = max(16, triton.next_power_of_2(job.head_dim))
    constexprs = dict(job.config, D=job.head_dim, BLOCK_D=block_d, **dict(job.mode))
    if "PRECISION" in fn.arg_names:
        constexprs["PRECISION"] = job.precision
    signature, attrs = {}, {}
    element = DTYPES[job.dtype]
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            role = spec.pointers[name]
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
               hash=compiled.hash)
    text = log.getvalue()
    regs, spills = PTXAS.search(text), SPILLS.search(text)
    if regs and spills:
        row.update(registers=int(regs.group(1)), stack=int(spills.group(1)), spill_stores=int(spills.group(2)),
                   spill_loads=int(spills.group(3)))
    return row


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


def cached_compile(job: Job, cache: Dict[str, Dict]) -> Dict[str, object]:
    key = json.dumps(dataclasses.asdict(job), sort_keys=True, default=str)
    return cache.get(key) or compile_job(job)


def check(rows: List[Dict]) -> List[str]:
    """The failures: compile errors, shared memory over the target's limit, groups with no fitting config, spills in
    16-bit configs that autotune can pick."""
    failures, groups = [], {}
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
    for key, fits in groups.items():
        if not any(fits):
            failures.append(f"no config fits: {' '.join(map(str, key))}")
    return failures


def table(rows: List[Dict], meta: Dict) -> str:
    lines = [f"# Triton AOT compile check ({meta['triton']})", "",
             f"Compiled for sm_90 and sm_80 with Triton {meta['triton']}'s compiler (`triton.compile` with a "
             "`GPUTarget`, no GPU), by `make check-aot`. Shared memory: bytes a block needs (limit 232,448 on sm_90, "
             "166,912 on sm_80). Registers and spills from ptxas -v.", "",
             f"- jobs: {meta['jobs']}, compiled now: {meta['compiled']}, from the cache: {meta['cached']}, "
             f"not compiled (--sample): {meta['skipped']}; {meta['seconds']} s", "",
             "| kernel | dtype | dots | mode | D | arch | config | shared B | fits | registers | spill st/ld B | "
             "stack B | s |", "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["precision"], json.dumps(r["mode"]), r["D"],
                                         -r["arch"], r["config"])):
        mode = ",".join(f"{k}={v}" for k, v in r["mode"].items()) or "-"
        if r.get("skipped"):
            cells = ["not compiled (sample)"] + ["-"] * 5
        elif not r["ok"]:
            cells = ["-", "no: " + r["error"][:80]] + ["-"] * 4
        else:
            fits = r["shared"] <= SHARED_LIMIT[r["arch"]]
            spills = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
            cells = [str(r["shared"]), "yes" if fits else "**no**", str(r.get("registers", "?")), spills,
                     str(r.get("stack", "?")), str(r.get("seconds", "cached"))]
        lines.append("| " + " | ".join([r["kernel"], r["dtype"], r["precision"], mode, str(r["D"]),
                                         f"sm_{r['arch']}", r["config"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aot_triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", action="store_true", help="of the float32 configs of a group, only the first that fits")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at a time")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    opts = p.parse_args(argv)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # the workers print ptxas -v, which compile_job reads
    cache_dir = os.environ.get("MEMTX_AOT_CACHE", os.path.expanduser("~/.cache/memtx-aot"))
    os.makedirs(cache_dir, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir, "triton"))
    import triton

    modules = load_kernels()
    all_jobs = [j for j in jobs(modules) if opts.kernels is None or j.kernel in opts.kernels.split(",")]
    results_path = os.path.join(cache_dir, f"results-{triton.__version__}.json")
    cache = json.load(open(results_path)) if os.path.exists(results_path) else {}
    keys = {id(j): json.dumps(dataclasses.asdict(j), sort_keys=True, default=str) for j in all_jobs}
    start = time.perf_counter()
    rows_by_job: Dict[int, Dict] = {}
    todo = []
    for job in all_jobs:
        if keys[id(job)] in cache and cache[keys[id(job)]].get("ok") is not None:
            rows_by_job[id(job)] = dict(cache[keys[id(job)]], cached=True)
        else:
            todo.append(job)
    first = [j for j in todo if not (opts.sample and j.dtype == "float32")]
    sampled = [j for j in todo if opts.sample and j.dtype == "float32"]
    with concurrent.futures.ProcessPoolExecutor(max_workers=opts.jobs) as pool:
        for job, row in zip(first, pool.map(compile_job, first)):
            rows_by_job[id(job)] = row
        # --sample: float32 groups in config order, stopping at the first config that fits
        groups: Dict[Tuple, List[Job]] = {}
        for job in sampled:
            groups.setdefault(job.group, []).append(job)
        pending = {g: iter(js) for g, js in groups.items()}
        while pending:
            batch = {g: next(it, None) for g, it in pending.items()}
            batch = {g: j for g, j in batch.items() if j is not None}
            if not batch:
                break
            for (g, job), row in zip(batch.items(), pool.map(compile_job, batch.values())):
                rows_by_job[id(job)] = row
                if row["ok"] and row["shared"] <= SHARED_LIMIT[job.arch]:
                    del pending[g]
            pending = {g: it for g, it in pending.items() if g in batch}
    for job in all_jobs:
        if id(job) not in rows_by_job:
            rows_by_job[id(job)] = dict(kernel=job.kernel, dtype=job.dtype, precision=job.precision,
                                        mode=dict(job.mode), D=job.head_dim, arch=job.arch, config=job.label(),
                                        bound=job.bound, skipped=True)
    for job in all_jobs:
        row = rows_by_job[id(job)]
        if not row.get("skipped") and not row.get("cached"):
            cache[keys[id(job)]] = row
    with open(results_path, "w") as f:
        json.dump(cache, f)
    rows = [rows_by_job[id(j)] for j in all_jobs]
    meta = dict(triton=triton.__version__, jobs=len(rows), compiled=sum(1 for r in rows if not r.get("cached")
                                                                      and not r.get("skipped")),
                cached=sum(1 for r in rows if r.get("cached")), skipped=sum(1 for r in rows if r.get("skipped")),
                seconds=round(time.perf_counter() - start))
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"triton-aot-{triton.__version__}")
    with open(stem + ".md", "w") as f:
        f.write(table(rows, meta))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    failures = check(rows)
    print(f"{meta}: {stem}.md")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
