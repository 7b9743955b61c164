"""Builds memtx_ops and its extension memtx_ops._C (C++ CPU kernels always, CUDA kernels where possible).

Switches (environment variables):
  MEMTX_CUDA=0|1        force the CUDA kernels off / on (default: on where torch has CUDA and nvcc exists)
  MEMTX_CUDA_ARCHS      CUDA architectures, e.g. "80;90" (default)
  MEMTX_CPU_ARCH        value of -march for the CPU kernels (default: native)
  MAX_JOBS              parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted() -> bool:
    flag = os.environ.get("MEMTX_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError(
            "MEMTX_CUDA=1 but the CUDA kernels cannot be built here: "
            f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME is {CUDA_HOME}"
        )
    return available if flag is None else flag == "1"


def cxx_standard() -> str:
    """The C++ standard torch's headers need: C++20 where ATen.h says so (torch 2.14), else C++17."""
    from torch.utils.cpp_extension import include_paths

    for directory in include_paths():
        header = os.path.join(directory, "ATen", "ATen.h")
        if os.path.exists(header):
            with open(header) as f:
                return "c++20" if "C++20 or later" in f.read() else "c++17"
    return "c++17"


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    std = f"-std={cxx_standard()}"
    cxx = ["-O3", std, f"-march={os.environ.get('MEMTX_CPU_ARCH', 'native')}", "-fopenmp"]
    if not cuda_wanted():
        return CppExtension("memtx_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = [a for a in os.environ.get("MEMTX_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
    # Machine code per arch, plus PTX of the newest one so that later GPUs can JIT it; nvcc builds the
    # targets of one file in parallel (--threads), ninja runs the files in parallel (MAX_JOBS).
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"] if archs else []
    nvcc = ["-O3", std, "--use_fast_math", "-lineinfo", f"--threads={max(1, len(gencode))}", *gencode]
    return CUDAExtension(
        "memtx_ops._C",
        sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
        define_macros=[("MEMTX_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="memtx_ops",
    version="0.1.0",
    description="Fused kernels for memory-based transformers: Transformer-XL attention, skip cross-head, MRBP",
    packages=find_packages(include=["memtx_ops", "memtx_ops.*"])
    + ["memtx_ops.kernels"] + [f"memtx_ops.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"memtx_ops.kernels": "kernels"},
    package_data={"memtx_ops.backends": ["cuda_choices.json"]},  # backend="auto" per GPU (bench --record-auto)
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest"], "bench": ["pytest-benchmark", "matplotlib"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
