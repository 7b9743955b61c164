#!/usr/bin/env bash
# `make check-cuda-build`: builds memtx_ops with its CUDA kernels (MEMTX_CUDA=1, sm_80 and sm_90) against a CUDA
# build of torch, in a virtual environment of its own, from a copy of the working tree (the checkout's editable
# CPU build stays untouched), then runs tests/test_cuda_build.py there: memtx_ops._C imports and its CUDA kernels
# are registered. No GPU is needed. Environment: CUDA_VENV (default .venv-cuda), CUDA_TORCH_VERSION (2.14.1, a
# CUDA 13 wheel on disk, several GB), MEMTX_CUDA_ARCHS ("80;90"), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="${CUDA_VENV:-.venv-cuda}"
start=$(date +%s)
# nvcc on PATH may be a link in /usr/local/bin, which would make torch guess CUDA_HOME=/usr/local.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  "$venv/bin/pip" install -q "torch==${CUDA_TORCH_VERSION:-2.14.1}"
fi
"$venv/bin/pip" install -q numpy setuptools wheel ninja "$(grep -E '^pytest[<>=]' requirements-dev.txt)"
echo "torch: $("$venv/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$src"
(cd "$src" && MEMTX_CUDA=1 MEMTX_CUDA_ARCHS="${MEMTX_CUDA_ARCHS:-80;90}" \
  "$root/$venv/bin/pip" install -q --no-build-isolation --no-deps .)
built=$(date +%s)
echo "built in $((built - start)) s"
# From a directory without the checkout on sys.path, so that the installed package is the one imported.
cd "$src/tests" && MEMTX_EXPECT_CUDA_BUILD=1 "$root/$venv/bin/python" -m pytest -q -p no:randomly -p no:cacheprovider \
  test_cuda_build.py
echo "check-cuda-build: $(( $(date +%s) - start )) s in all"
