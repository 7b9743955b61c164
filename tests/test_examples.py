"""The training example runs end to end on a tiny configuration: train, evaluate, checkpoint, resume, plot."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "2", "--tgt-len", "16", "--mem-len", "16", "--n-layer", "2", "--n-head", "2",
        "--d-model", "16", "--d-inner", "32", "--eval-every", "2", "--eval-chars", "400", "--device", "cpu"]


def run(*args, env=None, timeout_s=600):
    """``python *args`` in its own session -> the completed process (asserted to succeed). On the timeout its whole
    process group is killed: torchrun's ranks, which would otherwise keep the output pipes open and the wait going."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{args} did not finish in {timeout_s} s\n{stdout}{stderr}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train(out, *extra):
    return run(os.path.join(ROOT, "examples", "train_char_lm.py"), *TINY, "--out", str(out), *extra).stdout


@pytest.mark.parametrize("extra", [["--skip-retain-p", "0.5", "--finetune-at", "3"],
                                   ["--replay-segments", "3", "--cross-head-p", "0.5"]],
                         ids=["skip_retain_then_finetune", "replay+cross_head"])
def test_train_evaluate_checkpoint_resume(tmp_path, extra):
    out = train(tmp_path, "--steps", "2", *extra)
    assert "step 2: validation" in out and "test " in out
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "loss.png").is_file()
    out = train(tmp_path, "--steps", "4", "--resume", *extra)
    assert "resumed from" in out and "at step 2" in out and "step 4: validation" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 4 and result["test_bpc"] > 0


@pytest.mark.parametrize("extra", [["--cross-head-p", "0.5", "--skip-retain-p", "0.5", "--finetune-at", "4"],
                                   ["--replay-segments", "2", "--cross-head-p", "0.5"],
                                   ["--replay-fraction", "0.5", "--priority", "loss_difference", "--cross-head-p", "0.5"]],
                         ids=["cross_head+skip_retain", "replay+cross_head", "prioritized_replay+cross_head"])
def test_resume_continues_exactly(tmp_path, extra):
    """Two runs (stopped at step 3, then resumed) give the loss curve, the parameters and the memory of one run that
    was never stopped: same data position, dropout masks, cross-head and skip-retain draws, schedule."""
    import torch

    plan = ["--steps", "6", "--eval-every", "2", "--dropout", "0.3", *extra]
    train(tmp_path / "whole", *plan)
    out = train(tmp_path / "parts", *plan, "--stop-at", "3")
    assert "stopped at step 3 of 6" in out and not (tmp_path / "parts" / "result.json").exists()
    assert "resumed from" in train(tmp_path / "parts", *plan, "--resume")
    whole, parts = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("whole", "parts"))
    assert whole["step"] == parts["step"] == 6 and whole["position"] == parts["position"]
    assert whole["history"] == parts["history"]
    for name, value in whole["model"].items():
        assert torch.equal(value, parts["model"][name]), name
    for a, b in zip(whole["memory"], parts["memory"]):
        assert torch.equal(a["hidden"], b["hidden"]) and a["age"] == b["age"]
    if whole["replay"] is not None:  # the prioritized replay buffer went on exactly too
        a, b = whole["replay"], parts["replay"]
        assert a["samples_drawn"] == b["samples_drawn"] > 0 and a["filled"] == b["filled"]
        assert torch.equal(a["priorities"], b["priorities"]) and torch.equal(a["generator"], b["generator"])
        torch.testing.assert_close(a["last_losses"], b["last_losses"], rtol=0, atol=0, equal_nan=True)
        assert all(torch.equal(x, y) for x, y in zip(a["storage"], b["storage"]))
    assert json.loads((tmp_path / "whole" / "result.json").read_text())["test_bpc"] == \
        json.loads((tmp_path / "parts" / "result.json").read_text())["test_bpc"]


def test_resume_refuses_other_settings(tmp_path):
    train(tmp_path, "--steps", "2")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_char_lm.py"), *TINY, "--out", str(tmp_path),
           "--steps", "4", "--resume", "--lr", "0.01"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0 and "was written with other settings" in result.stderr + result.stdout


def test_eval_only_and_sample_from_the_checkpoint(tmp_path):
    train(tmp_path, "--steps", "2")
    script = os.path.join(ROOT, "examples", "train_char_lm.py")
    out = run(script, "--out", str(tmp_path), "--eval-only", "--eval-chars", "600").stdout
    assert "with training settings (segment 16, memory 16, clamp_len -1, same_length False)" in out
    assert "with evaluation settings (segment 16, memory 64, clamp_len 31, same_length True)" in out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["training"]["test_bpc"] > 0 and results["evaluation"]["tokens_per_s"] > 0
    text = run(script, "--out", str(tmp_path), "--sample", "40", "--prompt", "The ", "--seed", "3").stdout
    assert text.startswith("The ") and len(text.rstrip("\n")) == 44
    again = run(script, "--out", str(tmp_path), "--sample", "40", "--prompt", "The ", "--seed", "3").stdout
    assert again == text  # the generator's seed reproduces the sample
    both = run(script, "--out", str(tmp_path), "--eval-only", "--eval-chars", "600", "--eval-clamp-len", "0",
               "--sample", "40", "--prompt", "The ", "--seed", "3").stdout
    assert "evaluation settings (segment 16, memory 64, clamp_len 0, same_length True)" in both  # 0 is a value
    assert both.endswith(text)  # --eval-only and --sample both run
    result = (tmp_path / "result.json").read_text()
    finished = train(tmp_path, "--steps", "2", "--resume")
    assert "is at step 2 of 2 already: nothing to train" in finished and "test " not in finished
    assert (tmp_path / "result.json").read_text() == result


def test_bad_flags_exit_with_a_message_naming_them():
    """Out-of-range flags end in argparse's usage error naming the flag (exit 2), before anything is built; the
    one-cycle schedule takes every --steps (5% of 20 steps made a warm-up of length 0, a division by zero)."""
    cases = {"--steps 0": "--steps must be >= 1", "--eval-every 0": "--eval-every must be >= 1",
             "--batch-size 0": "--batch-size must be >= 1", "--top-p 1.5": r"--top-p must lie in (0, 1]",
             "--top-p 0": r"--top-p must lie in (0, 1]", "--temperature -1": "--temperature must be a finite number >= 0",
             "--temperature inf": "--temperature must be a finite number >= 0", "--lr nan": "--lr must be a finite",
             "--stop-at 0": "--stop-at must be >= 1", "--eval-chars 10": "--eval-chars must be 0 (the whole split) or",
             "--cross-head-p 1.5": "--cross-head-p must lie in [0, 1]", "--sample -5": "--sample must be >= 0",
             "--replay-segments 2 --skip-retain-p 0.5": "--replay-segments does not combine with --skip-retain-p"}
    program = f"""
import contextlib, io, sys, torch
sys.path.insert(0, {os.path.join(ROOT, "examples")!r})
import train_char_lm as example
for flags in {list(cases)!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            example.parse_args(flags.split())
        except SystemExit as exc:
            print(exc.code, err.getvalue().strip().splitlines()[-1])
for steps in range(1, 121):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = example.learning_rate_schedule(optimizer, example.parse_args(["--steps", str(steps)]))
    for _ in range(steps):
        optimizer.step()
        schedule.step()
print("schedules ok")
"""
    lines = run("-c", program).stdout.splitlines()
    assert len(lines) == len(cases) + 1 and lines[-1] == "schedules ok"
    for line, message in zip(lines, cases.values()):
        assert line.startswith("2 ") and message in line, line


def test_training_without_matplotlib_writes_its_results(tmp_path):
    """matplotlib is a development dependency: without it the run says there is no plot, after writing its
    results."""
    program = (f"import runpy, sys; sys.modules['matplotlib'] = None; "
               f"sys.argv = ['train_char_lm.py'] + {[*TINY, '--out', str(tmp_path), '--steps', '2']!r}; "
               f"runpy.run_path({os.path.join(ROOT, 'examples', 'train_char_lm.py')!r}, run_name='__main__')")
    out = run("-c", program).stdout
    assert "matplotlib is not installed: no plot" in out
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 2 and not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("kind", ["plain", "tqdm"])
def test_progress_bar(tmp_path, kind):
    result = run(os.path.join(ROOT, "examples", "train_char_lm.py"), *TINY, "--out", str(tmp_path), "--steps", "2",
                 "--progress", kind)
    if kind == "plain":
        assert "] 2/2 loss" in result.stdout
    else:
        assert "2/2" in result.stderr and "] 2/2 loss" not in result.stdout
    assert "step 2: validation" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--replay-segments", "2"]], ids=["segments", "replay"])
def test_torchrun_two_processes(tmp_path, extra):
    """The example under torchrun: 2 CPU processes (gloo) share the batch; rank 0 evaluates and writes."""
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 os.path.join(ROOT, "examples", "train_char_lm.py"), *TINY, "--out", str(tmp_path), "--steps", "2",
                 *extra)
    assert "2 process(es)" in result.stdout and "step 2: validation" in result.stdout
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 2
    ckpt = __import__("torch").load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["world"] == 2 and len(ckpt["ranks"]) == 2
