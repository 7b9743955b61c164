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
    """A step gets what the budget has left but the grace its interrupt may take; with less than MIN_STEP_S left it
    does not start (it used to start with a 1 s limit and report a timeout)."""
    step = gpu_check.Step("late", 100, [sys.executable, "-c", "import time; time.sleep(60)"])
    row = step.run(str(tmp_path), deadline=time.monotonic() + gpu_check.GRACE_S + gpu_check.MIN_STEP_S + 0.5)
    assert row["status"] == "timeout" and row["limit_s"] == gpu_check.MIN_STEP_S
    row = step.run(str(tmp_path), deadline=time.monotonic() + gpu_check.GRACE_S + 2)
    assert row["status"] == "skipped" and row["reason"].startswith("budget spent")


def test_a_bench_step_whose_fused_rows_did_not_run_fails(tmp_path):
    """A bench keeps a backend that could not run as a row with its reason and exits 0: for the fused backends
    (a graph break of auto:compiled, say) the step is failed, with the reasons; a baseline's failure is a row."""
    (tmp_path / "model").mkdir()
    rows = [dict(op="model", case="B=8", backend="auto:compiled", dtype="bfloat16", note="Unsupported: graph break"),
            dict(op="model", case="B=8", backend="flex_table", dtype="bfloat16", note="out of memory"),
            dict(op="model", case="B=8", backend="auto", dtype="bfloat16", fwd_bwd_ms=3.0)]
    (tmp_path / "model" / "gpu.json").write_text(json.dumps(dict(meta={}, rows=rows)))
    step = gpu_check.Step("model", 30, [sys.executable, "-c", "pass"], results=str(tmp_path / "model"))
    row = step.run(str(tmp_path), deadline=time.monotonic() + 100)
    assert row["status"] == "failed" and row["failed_rows"] == ["auto:compiled B=8: Unsupported: graph break"]


def test_every_step_leaves_the_summary_and_one_archive_in_the_tools_out(tmp_path, monkeypatch):
    """The device tool brings back at most 8 files, from $OUT only: the folder is packed into one archive there,
    after every step, so that a call cut off at its limit still returns the steps it finished."""
    import tarfile

    monkeypatch.setenv("OUT", str(tmp_path / "tool_out"))
    (tmp_path / "tool_out").mkdir()
    assert gpu_check.main(["--rehearse", "--steps", "tests,short_query", "--out", str(tmp_path / "check")]) == 0
    (archive,) = (tmp_path / "tool_out").iterdir()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    slug = archive.name[len("gpu-check-"):-len(".tgz")]
    assert f"gpu-check-{slug}/summary.json" in names and f"gpu-check-{slug}/tests.log" in names
    assert any(name.startswith(f"gpu-check-{slug}/short_query/") and name.endswith(".json") for name in names)


def test_a_warm_machine_rebuilds_when_the_sources_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "BUILD_STAMP", str(tmp_path / "stamp"))
    assert gpu_check.read_stamp() is None
    gpu_check.write_stamp()
    assert gpu_check.read_stamp() == gpu_check.sources_digest()
    (tmp_path / "stamp").write_text("sources of another build")
    assert gpu_check.read_stamp() != gpu_check.sources_digest()


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
