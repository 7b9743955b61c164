"""bench/gpu_check.py (``make gpu-check``) without a GPU: its step runner, its ratios, and the rehearsal."""

from __future__ import annotations

import json
import sys
import time

import pytest

from bench import gpu_check


def test_a_hanging_step_is_stopped_at_its_timeout(tmp_path):
    step = gpu_check.Step("hang", 1, [sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    row = step.run(str(tmp_path), deadline=time.monotonic() + 100)
    assert row["status"] == "timeout" and time.monotonic() - start < 10
    assert (tmp_path / "hang.log").exists()


def test_a_step_interrupted_at_its_timeout_reports_and_leaves_no_process(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)'])\n"  # a child that outlives the interrupt
        "print(child.pid, flush=True)\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('summary after the interrupt', flush=True)\n"
    )
    row = gpu_check.Step("interrupted", 2, [sys.executable, "-c", script]).run(str(tmp_path),
                                                                              deadline=time.monotonic() + 100)
    assert row["status"] == "timeout"
    child_pid, message = (tmp_path / "interrupted.log").read_text().split("\n")[:2]
    assert message == "summary after the interrupt"  # SIGINT first: pytest prints what it has seen
    time.sleep(0.5)
    assert not alive(int(child_pid))  # the step's own children are ended with it


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie that nobody has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_never_outlives_the_budget(tmp_path):
    step = gpu_check.Step("late", 100, [sys.executable, "-c", "import time; time.sleep(60)"])
    assert step.run(str(tmp_path), deadline=time.monotonic() + 1)["limit_s"] == 1


def test_ratios_from_bench_rows(tmp_path):
    case = "B=4 H=16 L=M=2048 D=64"
    rows = [dict(op="rel_memory_attention", case=case, backend=b, fwd_bwd_ms=ms, peak_mb=mb)
            for b, ms, mb in (("reference", 80.0, 9000.0), ("triton", 8.0, 300.0), ("cuda", 10.0, 290.0),
                              ("flex_table", 16.0, 2000.0), ("sdpa_flash", 5.0, 280.0))]
    rows.append(dict(op="rel_memory_attention", case="B=4 H=16 L=M=1024 D=64", backend="triton", fwd_bwd_ms=1.0,
                     peak_mb=1.0))
    rows[1].update(fwd_ms=2.0, train_fwd_ms=2.5)  # triton's training forward: exact P.V and a float32 out
    (tmp_path / "gpu.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    assert gpu_check.ratios(str(tmp_path)) == {
        "fused_backend": "triton", "fused_fwd_bwd_ms": 8.0, "speedup_vs_reference": 10.0,
        "speedup_vs_flex_table": 2.0, "triton_training_fwd_vs_fwd": 1.25, "time_vs_sdpa_flash": 1.6,
        "peak_vs_sdpa_flash": round(300 / 280, 3)}


def test_model_ratios_from_bench_rows(tmp_path):
    case = "B=8 L=M=512 layers=8 d=512 heads=8"
    rows = [dict(op="model", case=case, backend=b, fwd_bwd_ms=ms)
            for b, ms in (("reference", 90.0), ("reference:compiled", 60.0), ("auto", 36.0), ("auto:compiled", 24.0))]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "gpu.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    assert gpu_check.model_ratios(str(tmp_path)) == {
        "compiled_fused_step_ms": 24.0, "compiled_vs_eager_fused": 1.5, "compiled_vs_best_eager_txl": 2.5}
    assert gpu_check.model_ratios(str(tmp_path / "absent")) == {}


def test_rehearsal_starts_every_step(tmp_path):
    assert gpu_check.main(["--rehearse", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(status) == ["build", "tests", "short_query", "launch_profile", "model", "generation", "memcheck",
                            "racecheck", "bench"]
    assert all(status[step] == "passed" for step in ("tests", "memcheck", "bench", "short_query", "launch_profile",
                                                     "model")), summary
    for step in ("short_query", "model"):
        assert any(path.suffix == ".json" for path in (tmp_path / step).iterdir())


def test_a_check_split_over_calls_adds_up_in_one_summary(tmp_path):
    assert gpu_check.main(["--rehearse", "--steps", "tests,short_query", "--out", str(tmp_path)]) == 0
    assert gpu_check.main(["--rehearse", "--steps", "model,build", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["build", "tests", "short_query", "model"]
    assert summary["steps"][0]["status"] == "skipped"


def test_an_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--rehearse", "--steps", "tests,benchmark"])
    assert "unknown step(s) benchmark" in capsys.readouterr().err


def test_the_racecheck_filter_is_in_compute_sanitizers_syntax_and_names_every_kernel():
    """compute-sanitizer takes ``--kernel-name key=value`` (kns, kne or regex; on a GPU "regex:..." was refused and
    the step failed at once); the regex matches the mangled names of the CUDA kernels and the Triton kernels."""
    import re

    key, _, expr = gpu_check.KERNEL_FILTER.partition("=")
    assert key == "regex"
    kernels = ["_ZN9memtx_ops4cuda10fwd_kernelILi64EEEvNS0_10FwdParamsE", "_ZN9memtx_ops4cuda9dq_kernelILi64EEEvv",
               "_ZN9memtx_ops4cuda10dkv_kernelILi64EEEvv", "_ZN9memtx_ops4cuda12delta_kernelEv", "_fwd_kernel",
               "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_dr_kernel"]
    assert all(re.search(expr, name) for name in kernels)
    assert not re.search(expr, "void at::native::vectorized_elementwise_kernel<4>")
