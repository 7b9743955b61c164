"""Resource gate of the CUDA kernels, with nvcc and no GPU: ``make check-cuda-resources``.

Every ``csrc/cuda/*.cu`` is compiled with ``-Xptxas -v`` for sm_80 and sm_90 (the flags of ``setup.py``); ptxas
reports, per kernel instantiation, its registers, stack frame, spill stores/loads and static shared memory. A small
host program, built from the same headers and run on the CPU, prints the dynamic shared memory each launcher
requests (``SmemLayout<Elem, Cfg>::{fwd,dq,dkv}_bytes`` of the configuration ``dispatch`` picks per dtype and head
dim). The gate fails when a kernel spills, when its static plus requested dynamic shared memory exceeds what a
block may use on the target (232,448 bytes on sm_90, 166,912 on sm_80), when it needs more registers than its
launch bounds allow (65,536 per block), or when a kernel that ptxas compiled has no launcher entry. The table goes
to ``bench/results/cuda-resources.{md,json}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from bench.aot_triton import SHARED_LIMIT  # shared memory a block may use (static + dynamic), bytes
from bench.report import write_gate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
REGISTERS_PER_BLOCK = 65536
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", f"-I{CUDA_DIR}"]  # as setup.py (less -lineinfo)

# The launcher requests: dtype, padded head dim -> BN, NW and the dynamic bytes of the three attention kernels.
PROBE = r"""
#include <cstdio>
#include "rel_memory_attention_dispatch.cuh"
using namespace memtx::cuda::kernels;
template <class P, int DP>
void row(const char* dtype) {
  using Cfg = typename ConfigFor<P, DP>::type;
  using Lay = SmemLayout<typename P::Elem, Cfg>;
  std::printf("%s %d %d %d %zu %zu %zu\n", dtype, Cfg::DP, Cfg::BN, Cfg::NW, Lay::fwd_bytes, Lay::dq_bytes,
              Lay::dkv_bytes);
}
template <class P>
void rows(const char* dtype) { row<P, 32>(dtype); row<P, 64>(dtype); row<P, 128>(dtype); }
int main() {
  rows<Policy16<__half>>("float16");
  rows<Policy16<__nv_bfloat16>>("bfloat16");
  rows<PolicyTF32x3>("float32");
  return 0;
}
"""

ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
KERNEL = re.compile(r"kernels::(\w+)_kernel<(.*)>\(")
POLICY = {"Policy16<__half>": "float16", "Policy16<__nv_bfloat16>": "bfloat16", "PolicyTF32x3": "float32",
          "__half": "float16", "__nv_bfloat16": "bfloat16", "float": "float32"}
TILE = re.compile(r"TileConfig<(\d+), (\d+), (\d+)>")


def nvcc() -> str:
    path = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(path):
        raise SystemExit("nvcc not found: put the CUDA toolkit's bin on PATH or set CUDA_HOME")
    return path


def launcher_requests(workdir: str) -> Dict[Tuple[str, int, int, int], Dict[str, int]]:
    """{(dtype, DP, BN, NW): {"fwd": bytes, "dq": bytes, "dkv": bytes}} from the host probe."""
    source = os.path.join(workdir, "probe.cu")
    with open(source, "w") as f:
        f.write(PROBE)
    binary = os.path.join(workdir, "probe")
    subprocess.run([nvcc(), *NVCC_FLAGS, source, "-o", binary], check=True, capture_output=True, text=True)
    out = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    requests = {}
    for line in out.splitlines():
        dtype, dp, bn, nw, fwd, dq, dkv = line.split()
        requests[(dtype, int(dp), int(bn), int(nw))] = dict(fwd=int(fwd), dq=int(dq), dkv=int(dkv))
    return requests


def compile_unit(path: str, arch: int) -> Tuple[str, int, str, float]:
    """ptxas -v log of one .cu for one target -> (file, arch, log, seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([nvcc(), "-c", *NVCC_FLAGS, "-Xptxas", "-v",
                                 f"-gencode=arch=compute_{arch},code=sm_{arch}", path, "-o",
                                 os.path.join(tmp, "unit.o")], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"nvcc failed on {path} for sm_{arch}:\n{result.stderr[-3000:]}")
    return os.path.basename(path), arch, result.stdout + result.stderr, time.perf_counter() - start


def demangle(names: List[str]) -> Dict[str, str]:
    filt = os.path.join(os.path.dirname(os.path.realpath(nvcc())), "cu++filt")
    filt = filt if os.path.exists(filt) else "c++filt"
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def parse(unit: str, arch: int, log: str) -> List[Dict]:
    """One row per kernel of a ptxas -v log."""
    rows = []
    entries = list(ENTRY.finditer(log))
    for index, entry in enumerate(entries):
        block = log[entry.end(): entries[index + 1].start() if index + 1 < len(entries) else len(log)]
        frame, used = FRAME.search(block), USED.search(block)
        rows.append(dict(unit=unit, arch=arch, symbol=entry.group(1), registers=int(used.group(1)),
                         static_shared=int(used.group(2) or 0), stack=int(frame.group(1)),
                         spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3))))
    return rows


def describe(row: Dict, name: str, requests) -> None:
    """Adds kernel, dtype, tile, threads and the launcher's dynamic shared memory to ``row``."""
    match = KERNEL.search(name)
    kind, args = match.group(1), match.group(2)
    policy = args.split(",")[0].replace("memtx::cuda::kernels::", "").strip()
    row.update(kernel=kind, dtype=POLICY[policy])
    tile = TILE.search(args)
    if tile is None:  # delta_kernel, merge_key_splits_kernel<Elem>: 256 threads, no dynamic shared memory
        row.update(tile="-", threads=256, dynamic_shared=0)
        return
    dp, bn, nw = map(int, tile.groups())
    row.update(tile=f"DP{dp} BN{bn} NW{nw}", threads=32 * nw,
               dynamic_shared=requests.get((row["dtype"], dp, bn, nw), {}).get(kind))


def resource_rows(logs: List[Tuple[str, int, str]], workdir: str) -> List[Dict]:
    """Rows of every kernel in the ptxas -v ``logs`` [(file, arch, log)], with what its launcher requests."""
    rows = [row for unit, arch, log in logs for row in parse(unit, arch, log)]
    if rows:
        requests, names = launcher_requests(workdir), demangle([r["symbol"] for r in rows])
        for r in rows:
            describe(r, names[r["symbol"]], requests)
    return rows


def check(rows: List[Dict]) -> List[str]:
    failures = []
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} {r['tile']} sm_{r['arch']} ({r['unit']})"
        if r["dynamic_shared"] is None:
            failures.append(f"no launcher requests shared memory for {what}")
            continue
        shared = r["static_shared"] + r["dynamic_shared"]
        if shared > SHARED_LIMIT[r["arch"]]:
            failures.append(f"shared memory {shared} > {SHARED_LIMIT[r['arch']]}: {what}")
        if r["spill_stores"] or r["spill_loads"]:
            failures.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads: {what}")
        if r["registers"] * r["threads"] > REGISTERS_PER_BLOCK:
            failures.append(f"{r['registers']} registers x {r['threads']} threads > {REGISTERS_PER_BLOCK}: {what}")
    return failures


def table(rows: List[Dict], meta: Dict) -> str:
    lines = ["# CUDA kernel resources", "",
             f"nvcc {meta['nvcc']} with `-Xptxas -v`, by `make check-cuda-resources` ({meta['seconds']} s). "
             "Shared memory: static (ptxas) + dynamic (what the launcher requests); limit 232,448 B a block on "
             "sm_90, 166,912 on sm_80.", "",
             "| kernel | dtype | tile | arch | registers | threads | spill st/ld B | stack B | static + dynamic shared B |",
             "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["tile"], -r["arch"])):
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['tile']} | sm_{r['arch']} | {r['registers']} | "
                     f"{r['threads']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | "
                     f"{r['static_shared']} + {r['dynamic_shared']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_resources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    opts = p.parse_args(argv)
    start = time.perf_counter()
    units = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        logs = list(pool.map(lambda job: compile_unit(*job), [(u, a) for u in units for a in (90, 80)]))
        rows = resource_rows([log[:3] for log in logs], tmp)
    version = re.search(r"release ([\d.]+)", subprocess.run([nvcc(), "--version"], capture_output=True,
                                                             text=True).stdout)
    meta = dict(nvcc=version.group(1) if version else "?", kernels=len(rows), seconds=round(time.perf_counter() - start))
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, "cuda-resources")
    failures = check(rows) + ([] if rows else ["ptxas reported no kernels"])
    return write_gate(stem, table(rows, meta), meta, rows, failures)


if __name__ == "__main__":
    sys.exit(main())
