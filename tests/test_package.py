"""Packaging: the import survives a missing extension, and a missing backend says why and how to get it."""

import os
import subprocess
import sys
import textwrap


def run_python(code, cwd=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_import_without_extension_falls_back_and_explains():
    result = run_python("""
        import sys
        sys.modules["memtx_ops._C"] = None  # as if the build had failed
        import torch, memtx_ops
        q = torch.randn(1, 2, 4, 8); k = torch.randn(1, 2, 6, 8); r = torch.randn(2, 6, 8); u = torch.randn(2, 8)
        out = memtx_ops.rel_memory_attention(q, k, k, r, u, u)  # auto -> reference
        print("auto ok", tuple(out.shape))
        try:
            memtx_ops.rel_memory_attention(q, k, k, r, u, u, backend="cpu")
        except RuntimeError as exc:
            print("error:", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "auto ok (1, 2, 4, 8)" in result.stdout
    assert "backend 'cpu' is not available" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout


def test_kernels_install_as_memtx_ops_kernels_only(tmp_path):
    """The Triton kernels import as memtx_ops.kernels; no top-level `kernels` package is installed."""
    result = run_python("""
        import importlib.util, memtx_ops.kernels
        print(memtx_ops.kernels.__name__, importlib.util.find_spec("kernels"))
    """, cwd=tmp_path)  # away from the checkout, so only what is installed is importable
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["memtx_ops.kernels", "None"]


def test_regular_install_ships_every_kernel_subpackage(tmp_path):
    """A non-editable build copies kernels/ (and its subpackages) under memtx_ops/kernels only."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "MEMTX_CUDA": "0"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "memtx_ops" / "kernels" / "rel_memory_attention" / "fwd.py").is_file()
    assert not (tmp_path / "kernels").exists()


def test_kernels_are_leaves():
    """kernels/ imports triton, torch and itself only, never the rest of memtx_ops (the backends import it)."""
    import ast

    kernels = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    for folder, _, files in os.walk(kernels):
        for name in (f for f in files if f.endswith(".py")):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                assert not any(m == "memtx_ops" or m.startswith("memtx_ops.") for m in modules), (name, modules)
