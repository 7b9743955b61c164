"""Compile checks of the CUDA backend that need no GPU (and no CUDA build of torch).

* nvcc compiles every ``.cu`` under ``csrc/`` for sm_80 and sm_90 with the flags of ``setup.py`` (warnings are
  errors);
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
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DMEMTX_WITH_CUDA=1", "-Werror", "all-warnings"]


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
