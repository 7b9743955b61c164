"""One prepared GPU check: ``make gpu-check`` (``python -m bench.gpu_check``), at most 9 min of steps (``BUDGET_S``).

Steps, in order of what they are owed (the issues' open GPU targets first), each with its own timeout so that one
hang cannot eat the budget (times in seconds):

1. ``build``      ``MEMTX_CUDA=1 MEMTX_CUDA_ARCHS=<this GPU> pip install --no-build-isolation --no-deps -e .`` (200);
                  passes at once when ``memtx_ops._C`` already holds CUDA kernels (a second call on a warm machine)
2. ``tests``      the CUDA and Triton GPU tests, parallel under pytest-xdist (bf16, fp16 and the fp32 cases), with
                  up to 20 failures reported (150)
3. ``short_query``  the decoding and short-segment shapes (L in {1, 16, 64}, M in {640, 1600, 3800}, bf16): Triton
                  (flash-decoding's split over keys) and CUDA against SDPA with no position term, forward (60), into
                  ``<out>/short_query/``
4. ``launch_profile``  host and device time of the Triton and CUDA short-query forwards under torch.profiler
                  (``bench/launch_profile.py``) (45)
5. ``model``        a TransformerXL training step (B = 8, L = M = 512, 8 layers, d = 512, bf16), fused and eager
                  Transformer-XL, each eager and under ``torch.compile(fullgraph=True)`` (150), into ``<out>/model/``
6. ``generation``   ``TransformerXL.generate`` and the hourglass model's, and evaluation with ``kv_caches``, against
                  a forward per token (M in {640, 3800}, bf16) (60), into ``<out>/generation/``
7. ``memcheck``   compute-sanitizer memcheck of one forward + backward per backend and dtype, with
                  ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that a stray access hits unallocated memory (60)
8. ``racecheck``  compute-sanitizer racecheck, filtered to this library's kernels (60)
9. ``bench``      rel_memory_attention against the reference, FlexAttention with a table and SDPA flash at
                  L = M in {1024, 2048, 4096}, D in {64, 128}, bf16, B = 4, H = 16, forward (inference, and training:
                  its exact P.V and float32 out), backward, TFLOP/s and peak memory, with ``--record-auto``
                  (backend="auto" choices for this GPU) (170); last: it runs on what the budget has left

``--steps`` runs some of them (in this order) and ``--budget`` sets the seconds they share, so that the check can
be split over two calls of a warm machine; each call adds its rows to the folder's ``summary.json``. A step that
runs past its timeout is interrupted first (pytest then still prints its failures), killed 15 s later.

Every log and result goes to one folder (``--out``, default ``/tmp/gpu-check-<device>``: outside the checkout, empty
on a fresh machine, shared by the calls of one warm machine): ``<step>.log``, the bench's reports, the
``--record-auto`` choices (``cuda_choices.json``) and ``summary.json`` (each step's status, seconds and exit code, and
the ratios the GPU issue asks for). After every step the summary is rewritten and, where the device tool's ``OUT`` is
set, the whole folder is packed into one file, ``$OUT/gpu-check-<device>.tgz`` (the tool brings back at most 8 files
from ``$OUT``, and nothing from the checkout): a call cut off at its limit still returns every finished step. Unpack
it into ``bench/results/`` to commit it. A bench step whose fused rows (``triton``, ``cuda``, ``auto``, compiled
or not) failed to run is ``failed``, with those rows' reasons. Without a GPU every step reports ``skipped`` with the
reason. ``--rehearse`` (no GPU; what CI runs)
replaces the steps by CPU stand-ins that show each one starts: the GPU tests are collected, the sanitizers' script
compiles, the bench runs one tiny CPU case through the same code and report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# memtx_ops.backends.CUDA_CHOICES_FILE in the editable checkout (not imported: this script leaves CUDA and the
# extension to its steps)
CUDA_CHOICES_FILE = os.path.join(ROOT, "memtx_ops", "backends", "cuda_choices.json")
BUDGET_S = 540  # under the device's 600 s per command, with the probe, a last step's grace and the packing
GRACE_S = 15  # from a step's interrupt at its timeout to its kill
MIN_STEP_S = 10  # a step with less of the budget left is not started: it is "skipped" (budget spent)
FUSED_BACKENDS = ("triton", "cuda", "auto")  # a bench row of these (compiled or not) that did not run fails its step
BUILD_STAMP = os.path.join(ROOT, "build", "gpu-check-cuda-sources.sha256")  # the sources _C was built from
STEP_NAMES = ("build", "tests", "short_query", "launch_profile", "model", "generation", "memcheck", "racecheck",
              "bench")

# A forward and backward of every backend and dtype, small enough for the sanitizers (they run ~100x slower).
SANITIZED_CALLS = """
import torch, memtx_ops
for backend in ("cuda", "triton"):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        g = torch.Generator(device="cuda").manual_seed(0)
        B, H, L, M, D = 1, 2, 70, 60, 64
        new = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g).requires_grad_()
        q, k, v = new(B, H, L, D), new(B, H, M + L, D), new(B, H, M + L, D)
        r, u, vb = new(H, M + L, D), new(H, D), new(H, D)
        out = memtx_ops.rel_memory_attention(q, k, v, r, u, vb, backend=backend)
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        print(backend, dtype, "ok")
"""
# The library's kernels: CUDA (fwd_kernel, delta_kernel, dq_kernel, dkv_kernel) and Triton (_fwd_kernel, _bwd_*).
# compute-sanitizer's filter syntax is key=value (kns=, kne=, regex=); "regex:" (Nsight Compute's) is refused.
KERNEL_FILTER = "regex=(fwd_kernel|delta_kernel|dq_kernel|dkv_kernel|_bwd_preprocess|_bwd_dkdv|_bwd_dq|_bwd_dr)"


class Step:
    """One step: ``command`` run from the checkout with ``env`` added, under ``timeout`` s; ``skip``: why it does not
    run; ``results``: the folder of a bench step's reports, whose fused rows must all have run."""

    def __init__(self, name: str, timeout: int, command: List[str], env: Optional[Dict[str, str]] = None,
                 skip: Optional[str] = None, results: Optional[str] = None):
        self.name, self.timeout, self.command, self.env, self.skip = name, timeout, command, env or {}, skip
        self.results = results

    def run(self, out: str, deadline: float) -> Dict:
        """Runs the step (its output to ``<out>/<name>.log``) -> its summary row."""
        row = dict(step=self.name, command=" ".join(self.command), timeout_s=self.timeout)
        left = int(deadline - time.monotonic()) - GRACE_S  # an interrupted step may take GRACE_S more to stop
        skip = self.skip or (None if left >= MIN_STEP_S else f"budget spent ({left + GRACE_S} s left)")
        if skip:
            print(f"[{self.name}] skipped: {skip}", flush=True)
            return dict(row, status="skipped", reason=skip)
        timeout = min(self.timeout, left)
        start = time.monotonic()
        with open(os.path.join(out, f"{self.name}.log"), "w") as log:
            proc = subprocess.Popen(self.command, cwd=ROOT, env={**os.environ, **self.env}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
                status = "passed" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                status, code = "timeout", None
                interrupt(proc)
            signal_group(proc, signal.SIGKILL)  # whatever the step left running (pytest-xdist workers, say)
        seconds = round(time.monotonic() - start, 1)
        row = dict(row, status=status, returncode=code, seconds=seconds, limit_s=timeout)
        if self.results is not None:  # a bench step: its fused rows must have run
            failed = [f"{r.get('backend')} {r.get('case')}: {r['note']}" for r in bench_rows(self.results)
                      if r.get("note") and r.get("backend", "").split(":")[0] in FUSED_BACKENDS]
            if failed:
                row.update(status="failed" if status == "passed" else status, failed_rows=failed)
        print(f"[{self.name}] {row['status']} in {seconds} s (limit {timeout} s): {out}/{self.name}.log", flush=True)
        return row


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def interrupt(proc: subprocess.Popen) -> None:
    """SIGINT to the step's process group (pytest prints the failures it has seen), SIGKILL after ``GRACE_S``."""
    signal_group(proc, signal.SIGINT)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait()


def gpu() -> Optional[str]:
    """The GPU's name, or None (from a subprocess: this script must not initialise CUDA before the build)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name() if "
                            "torch.cuda.is_available() else '')"], capture_output=True, text=True)
    return probe.stdout.strip() or None


def gpu_arch() -> str:
    probe = subprocess.run([sys.executable, "-c", "import torch; print('%d%d' % torch.cuda.get_device_capability())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() or "90"


def steps(device: Optional[str], rehearse: bool, out: str) -> List[Step]:
    """The steps on a GPU; with ``rehearse``, CPU stand-ins that show each step starts: the tests are
    collected, the sanitized script is compiled, the bench runs one tiny CPU case through the same code."""
    python = sys.executable
    if rehearse:
        return rehearsal(python, out)
    no_gpu = None if device else "no CUDA device here"
    sanitizer = shutil.which("compute-sanitizer")
    no_sanitizer = no_gpu or (None if sanitizer else "compute-sanitizer is not on PATH")
    bench_args = ["--ops", "rel_memory_attention", "--device", "cuda", "--dtypes", "bfloat16",
                  "--lengths", "1024,2048,4096", "--head-dims", "64,128", "--batch", "4", "--heads", "16",
                  "--repeats", "5", "--no-plots", "--record-auto", "--out", out]
    sanitize_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    build = [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    if device and built_with_cuda(python) and read_stamp() == sources_digest():
        build = [python, "-c", "print('memtx_ops._C already holds the CUDA kernels of these sources: no rebuild')"]
    return [
        Step("build", 200, build, env={"MEMTX_CUDA": "1", "MEMTX_CUDA_ARCHS": gpu_arch() if device else "90",
                                       "MAX_JOBS": str(os.cpu_count() or 4), "CUDA_HOME": cuda_home()}, skip=no_gpu),
        Step("tests", 150, [python, "-m", "pytest", "-q", "--maxfail=20", "-rfE", "--tb=short", "--durations=15",
                            "-n", str(min(8, os.cpu_count() or 1)), "-p", "no:randomly",
                            "tests/test_rel_memory_attention_cuda.py", "tests/test_rel_memory_attention_triton.py"],
             skip=no_gpu),
        Step("short_query", 60, [python, "-m", "bench", "--ops", "short_query", "--device", "cuda",
                                 "--backends", "triton,cuda,sdpa", "--repeats", "5", "--no-plots",
                                 "--out", os.path.join(out, "short_query")], skip=no_gpu,
             results=os.path.join(out, "short_query")),
        Step("launch_profile", 45, [python, "-m", "bench.launch_profile"], skip=no_gpu),
        Step("model", 150, [python, "-m", "bench", "--ops", "model", "--device", "cuda", "--repeats", "5",
                            "--no-plots", "--out", os.path.join(out, "model")], skip=no_gpu,
             results=os.path.join(out, "model")),
        Step("generation", 60, [python, "-m", "bench", "--ops", "generation", "--device", "cuda", "--repeats", "3",
                                "--no-plots", "--out", os.path.join(out, "generation")], skip=no_gpu,
             results=os.path.join(out, "generation")),
        Step("memcheck", 60, [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                              python, "-c", SANITIZED_CALLS], env=sanitize_env, skip=no_sanitizer),
        Step("racecheck", 60, [sanitizer or "compute-sanitizer", "--tool", "racecheck", "--racecheck-report", "hazard",
                               "--kernel-name", KERNEL_FILTER, "--error-exitcode", "1", python, "-c",
                               SANITIZED_CALLS], env=sanitize_env, skip=no_sanitizer),
        Step("bench", 170, [python, "-m", "bench", *bench_args], skip=no_gpu, results=out),
    ]


def built_with_cuda(python: str) -> bool:
    """Whether the checkout's ``memtx_ops._C`` already holds its CUDA kernels (an earlier call built it)."""
    probe = subprocess.run([python, "-c", "import sys, memtx_ops._extension as e; sys.exit(not e.has_cuda_kernels())"],
                           cwd=ROOT, capture_output=True)
    return probe.returncode == 0


def sources_digest() -> str:
    """SHA-256 of what the extension is built from (``csrc/``, ``setup.py``): a second call on a warm machine rebuilds
    when a fix changed them since."""
    digest = hashlib.sha256()
    paths = [os.path.join(ROOT, "setup.py")] + sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(ROOT, "csrc")) for name in names)
    for path in paths:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def read_stamp() -> Optional[str]:
    if not os.path.exists(BUILD_STAMP):
        return None
    with open(BUILD_STAMP) as f:
        return f.read().strip()


def write_stamp() -> None:
    os.makedirs(os.path.dirname(BUILD_STAMP), exist_ok=True)
    with open(BUILD_STAMP, "w") as f:
        f.write(sources_digest())


def cuda_home() -> str:
    """CUDA_HOME for the build: the environment's, else the toolkit above the ``nvcc`` on PATH (resolving links, so
    that a link in /usr/local/bin does not make torch guess /usr/local), else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else "/usr/local/cuda"


def rehearsal(python: str, out: str) -> List[Step]:
    bench_args = ["--ops", "rel_memory_attention", "--device", "cpu", "--dtypes", "float32", "--lengths", "64",
                  "--head-dims", "16", "--batch", "1", "--heads", "2", "--repeats", "1", "--no-plots",
                  "--backends", "reference,cpu", "--out", out]
    return [
        Step("build", 1, [], skip="rehearsal: the build needs a CUDA torch (make check-cuda-build does it here)"),
        Step("tests", 120, [python, "-m", "pytest", "-q", "--collect-only", "-p", "no:randomly",
                            "tests/test_rel_memory_attention_cuda.py", "tests/test_rel_memory_attention_triton.py"]),
        Step("short_query", 120, [python, "-m", "bench", "--ops", "short_query", "--device", "cpu", "--lengths", "1",
                                  "--memories", "64", "--backends", "cpu,sdpa", "--repeats", "1", "--no-plots",
                                  "--out", os.path.join(out, "short_query")]),
        Step("launch_profile", 60, [python, "-m", "bench.launch_profile", "--device", "cpu", "--backends", "cpu",
                                    "--calls", "2"]),
        Step("model", 120, [python, "-m", "bench", "--ops", "model", "--device", "cpu", "--lengths", "16", "--batch",
                            "1", "--backends", "reference,cpu", "--repeats", "1", "--no-plots",
                            "--out", os.path.join(out, "model")]),
        Step("generation", 1, [], skip="rehearsal: tests/test_hourglass_bench.py runs the generation suite small"),
        Step("memcheck", 30, [python, "-c", f"compile({SANITIZED_CALLS!r}, 'sanitized', 'exec')"]),
        Step("racecheck", 1, [], skip="rehearsal: compute-sanitizer needs a GPU"),
        Step("bench", 120, [python, "-m", "bench", *bench_args], results=out),
    ]


def bench_rows(folder: str, op: Optional[str] = None) -> List[Dict]:
    """The rows of ``op`` (None: of every op) in the bench reports (``*.json``) of ``folder``; none when it is
    absent."""
    rows = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != "summary.json":
            with open(os.path.join(folder, name)) as f:
                rows += [r for r in json.load(f).get("rows", []) if op is None or r.get("op") == op]
    return rows


def ratios(out: str) -> Dict[str, object]:
    """The ratios the GPU issue quotes, at L = M = 2048, D = 64, bf16, fwd+bwd, from the bench's rows (the faster
    of the triton and cuda backends), and what each fused backend's training forward costs over inference."""
    rows = bench_rows(out, "rel_memory_attention")
    pick = {r["backend"]: r for r in rows if r.get("case", "").endswith("L=M=2048 D=64") and r.get("fwd_bwd_ms")}
    fused = [pick[b] for b in ("triton", "cuda") if b in pick]
    if not fused:
        return {}
    best = min(fused, key=lambda r: r["fwd_bwd_ms"])
    result = {"fused_backend": best["backend"], "fused_fwd_bwd_ms": round(best["fwd_bwd_ms"], 3)}
    for name in ("reference", "flex_table"):
        if name in pick:
            result[f"speedup_vs_{name}"] = round(pick[name]["fwd_bwd_ms"] / best["fwd_bwd_ms"], 2)
    for backend in ("triton", "cuda"):  # the training forward's extra work for the backward (exact P.V, float32 out)
        row = pick.get(backend, {})
        if row.get("train_fwd_ms") and row.get("fwd_ms"):
            result[f"{backend}_training_fwd_vs_fwd"] = round(row["train_fwd_ms"] / row["fwd_ms"], 2)
    if "sdpa_flash" in pick:
        result["time_vs_sdpa_flash"] = round(best["fwd_bwd_ms"] / pick["sdpa_flash"]["fwd_bwd_ms"], 2)
        result["peak_vs_sdpa_flash"] = round(best["peak_mb"] / pick["sdpa_flash"]["peak_mb"], 3)
    return result


def model_ratios(out: str) -> Dict[str, object]:
    """The training-step speedups issue 14 asks of the compiled fused model (the ``auto:compiled`` row of the model
    suite): over the eager fused model, and over the faster of the eager Transformer-XL rows, eager or compiled."""
    step_ms = {r["backend"]: r["fwd_bwd_ms"] for r in bench_rows(os.path.join(out, "model"), "model")
               if r.get("fwd_bwd_ms")}
    if "auto:compiled" not in step_ms:
        return {}
    compiled = step_ms["auto:compiled"]
    result = {"compiled_fused_step_ms": round(compiled, 3)}
    if "auto" in step_ms:
        result["compiled_vs_eager_fused"] = round(step_ms["auto"] / compiled, 2)
    eager_txl = [step_ms[b] for b in ("reference", "reference:compiled") if b in step_ms]
    if eager_txl:
        result["compiled_vs_best_eager_txl"] = round(min(eager_txl) / compiled, 2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for every log and result (default /tmp/gpu-check-<device>)")
    p.add_argument("--rehearse", action="store_true",
                   help="CPU stand-ins of every step (no GPU needed): shows the check starts")
    p.add_argument("--steps", help=f"comma-separated steps to run, of {','.join(STEP_NAMES)} (default: all)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds the steps share (default {BUDGET_S})")
    opts = p.parse_args(argv)
    wanted = opts.steps.split(",") if opts.steps else list(STEP_NAMES)
    unknown = sorted(set(wanted) - set(STEP_NAMES))
    if unknown:
        p.error(f"--steps: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}")
    device = gpu()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device or "no-gpu").strip("-")
    out = opts.out or os.path.join("/tmp", f"gpu-check-{slug}")
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + opts.budget
    start = time.monotonic()
    rows = []
    for step in steps(device, opts.rehearse, out):
        if step.name not in wanted:
            continue
        row = step.run(out, deadline)
        rows.append(row)
        if step.name == "build" and row["status"] == "passed" and device:
            write_stamp()
        if step.name == "bench" and device and os.path.exists(CUDA_CHOICES_FILE):  # --record-auto's choices
            shutil.copy(CUDA_CHOICES_FILE, os.path.join(out, "cuda_choices.json"))
        summary = write_summary(out, device, rows)
        pack(out, slug)
        if step.name == "build" and row["status"] in ("failed", "timeout"):
            break  # nothing after it can run
    print(json.dumps(summary["ratios_L2048_D64_bf16"]), json.dumps(summary["model_ratios_B8_L512_bf16"]),
          f"{round(time.monotonic() - start, 1)} s in this call: {out}/summary.json")
    return 0 if all(s["status"] in ("passed", "skipped") for s in rows) else 1


def write_summary(out: str, device: Optional[str], rows: List[Dict]) -> Dict:
    """``<out>/summary.json`` with this call's rows so far (merged into the folder's) and the ratios -> it."""
    summary = merged_summary(os.path.join(out, "summary.json"), device or "none", rows)
    summary["seconds"] = round(sum(s.get("seconds", 0) for s in summary["steps"]), 1)
    summary["ratios_L2048_D64_bf16"] = ratios(out) if device else {}
    summary["model_ratios_B8_L512_bf16"] = model_ratios(out) if device else {}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def pack(out: str, slug: str) -> None:
    """``out`` as one archive in the device tool's ``$OUT`` (when set), rewritten after every step."""
    target = os.environ.get("OUT")
    if not target:
        return
    archive = os.path.join(target, f"gpu-check-{slug}.tgz")
    with tarfile.open(archive + ".part", "w:gz") as tar:
        tar.add(out, arcname=f"gpu-check-{slug}")
    os.replace(archive + ".part", archive)


def merged_summary(path: str, device: str, rows: List[Dict]) -> Dict:
    """The folder's summary with this call's step rows in place of earlier rows of the same steps (a check split
    over calls adds up in one summary), in step order."""
    summary = dict(device=device, steps=[])  # budgets differ per call: each row has its limit_s
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("device") == device:
            summary["steps"] = earlier.get("steps", [])
    by_step = {row["step"]: row for row in summary["steps"]}
    by_step.update({row["step"]: row for row in rows})
    summary["steps"] = [by_step[name] for name in STEP_NAMES if name in by_step]
    return summary


if __name__ == "__main__":
    sys.exit(main())
