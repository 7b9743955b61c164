"""Compile checks of the CUDA backend that need no GPU (and no CUDA build of torch).

* nvcc compiles every ``.cu`` under ``csrc/`` for sm_80 and sm_90 with the flags of ``setup.py`` (warnings are
  errors);
* the resource gate of ``bench/cuda_resources.py`` on ptxas's report: no kernel spills, none needs more shared
  memory (static + what its launcher requests) than its target has or more registers than its launch bounds allow;
* g++ checks the syntax of the ATen wrapper ``csrc/cuda/*.cpp`` against torch's headers and the CUDA headers
  (warnings in our files are errors), where torch ships its ``c10/cuda`` headers.

All compilations run in parallel, one process per (file, arch): about 65 s of CPU, 35 s on two cores. Skipped, with
the reason, only where nvcc (or, for the wrapper, a C++ compiler or the c10/cuda headers) is missing.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted(ROOT.glob("csrc/**/*.cu"))
WRAPPER_FILES = sorted(ROOT.glob("csrc/cuda/*.cpp"))
ARCHS = ("80", "90")
# The nvcc flags of setup.py's extension() (the gencode list is per arch here), plus: any warning fails.
# ptxas -v: the resources of every kernel, for the gate below.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DMEMTX_WITH_CUDA=1", "-Werror", "all-warnings",
              "-Xptxas", "-v"]


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (put it on PATH or set CUDA_HOME): the CUDA sources were NOT compile-checked")


def cuda_include_dirs() -> List[str]:
    """The include directories nvcc itself uses (read off `nvcc --dryrun`; works through wrapper scripts)."""
    probe = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
    dirs = []
    for line in (probe.stdout + probe.stderr).splitlines():
        m = re.match(r'#\$ INCLUDES="(.*)"', line.strip())
        if m:
            dirs += [flag[2:] for flag in m.group(1).split() if flag.startswith("-I")]
    return [d for d in dirs if (Path(d) / "cuda_runtime_api.h").exists()]


@functools.lru_cache(maxsize=None)
def supported_archs() -> str:
    return subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout


def nvcc_job(source: Path, arch: str, out_dir: Path) -> List[str]:
    obj = out_dir / f"{source.stem}.sm{arch}.o"
    return [NVCC, "-c", str(source), "-o", str(obj), *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def wrapper_job(source: Path, stub_dir: Path) -> Optional[List[str]]:
    """g++ -fsyntax-only of one wrapper file, or None when torch lacks its c10/cuda headers."""
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    if not any((Path(d) / "c10" / "cuda" / "CUDAStream.h").exists() for d in torch_includes):
        return None
    # The CPU wheel ships c10/cuda but not this header, which CMake generates in CUDA builds.
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for d in torch_includes):
        stub = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        torch_includes = torch_includes + [str(stub_dir)]
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    system = [*torch_includes, sysconfig.get_paths()["include"], *cuda_include_dirs()]
    return [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DMEMTX_WITH_CUDA=1",
            *[f for d in system for f in ("-isystem", d)], str(source)]


def run(cmd: List[str]) -> Dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {"cmd": cmd, "rc": proc.returncode, "log": proc.stdout + proc.stderr,
            "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Runs every compilation at once (one process per core). -> {job name: result}, plus "_wall" seconds."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = {f"{src.relative_to(ROOT)} sm_{arch}": nvcc_job(src, arch, out_dir) for src in CU_FILES for arch in ARCHS
            if f"compute_{arch}" in supported_archs()}
    for src in WRAPPER_FILES:
        cmd = wrapper_job(src, tmp_path_factory.mktemp("stub"))
        if cmd is not None:
            jobs[f"{src.relative_to(ROOT)} syntax"] = cmd
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["_wall"] = time.perf_counter() - start
    return results


def failures(results: Dict, suffix: str) -> str:
    bad = [f"== {name} (exit {r['rc']}):\n{' '.join(r['cmd'])}\n{r['log']}" for name, r in results.items()
           if name.endswith(suffix) and r["rc"] != 0]
    return "\n".join(bad)


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu file under csrc/"
    assert WRAPPER_FILES, "no ATen wrapper under csrc/cuda/"


@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_every_cu(builds, arch):
    if f"compute_{arch}" not in supported_archs():
        pytest.skip(f"this nvcc cannot build sm_{arch}: {supported_archs().split()}")
    compiled = [name for name in builds if name.endswith(f"sm_{arch}")]
    assert len(compiled) == len(CU_FILES)
    message = failures(builds, f"sm_{arch}")
    assert not message, f"nvcc failed for sm_{arch}:\n{message}"


def test_wrapper_syntax(builds):
    checked = [name for name in builds if name.endswith(" syntax")]
    if not checked:
        pytest.skip("torch has no c10/cuda headers here (or no C++ compiler): the ATen wrapper was NOT syntax-checked")
    assert len(checked) == len(WRAPPER_FILES)
    message = failures(builds, " syntax")
    assert not message, f"the ATen wrapper does not compile:\n{message}"


def test_compile_time_budget(builds):
    """All compilations together stay within a few minutes (CI has two cores)."""
    assert builds["_wall"] < 600, f"compiling the CUDA sources took {builds['_wall']:.0f} s"


def test_kernel_resources(builds, tmp_path):
    """No spills, shared memory within sm_80's and sm_90's limits, registers within the launch bounds
    (``make check-cuda-resources`` writes the same table under bench/results/)."""
    from bench import cuda_resources

    logs = [(name.split()[0], int(name.rsplit("_", 1)[1]), r["log"]) for name, r in builds.items()
            if " sm_" in name and r["rc"] == 0]
    if not logs:
        pytest.skip("no .cu file compiled here")
    rows = cuda_resources.resource_rows(logs, str(tmp_path))
    assert {r["kernel"] for r in rows} >= {"fwd", "delta", "dq", "dkv"}, rows
    failures = cuda_resources.check(rows)
    assert not failures, "\n".join(failures)


def test_resource_gate_reports_spills_and_shared_memory():
    """The gate itself: a synthetic ptxas log with a spill, too much shared memory and no launcher entry."""
    from bench import cuda_resources

    log = ("ptxas info    : Compiling entry function '_Z1fv' for 'sm_80'\n"
           "ptxas info    : Function properties for _Z1fv\n"
           "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    (row,) = cuda_resources.parse("x.cu", 80, log)
    assert (row["registers"], row["static_shared"], row["spill_stores"], row["spill_loads"]) == (255, 1024, 8, 4)
    row.update(kernel="fwd", dtype="float16", tile="DP64 BN64 NW4", threads=128, dynamic_shared=166912)
    failures = cuda_resources.check([row])
    assert any("spills" in f for f in failures) and any("shared memory 167936 > 166912" in f for f in failures)
    assert cuda_resources.check([dict(row, dynamic_shared=None)])[0].startswith("no launcher requests")
