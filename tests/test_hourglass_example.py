"""The char-LM example trains the hourglass with a flag (checkpoint, exact resume), and the trade-off script runs end to
end on a tiny setting: flat and hourglass, same steps and characters, a table and a plot."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "2", "--tgt-len", "96", "--mem-len", "96", "--n-head", "2", "--d-model", "16",
        "--d-inner", "32", "--eval-every", "2", "--eval-chars", "300", "--device", "cpu", "--dropout", "0.3",
        "--layout", "1@1 1@3 1@1", "--upsample", "linear", "--downsample", "weighted"]


def run(script, *args):
    """Runs an example with one torch thread (on a shared CI machine, two threads mostly wait for each other)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                            text=True, timeout=600, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_train_char_lm_trains_the_hourglass_and_resumes_exactly(tmp_path):
    plan = ["train_char_lm.py", *TINY, "--steps", "4"]
    run(*plan, "--out", str(tmp_path / "whole"))
    out = run(*plan, "--out", str(tmp_path / "parts"), "--stop-at", "2")
    assert "stopped at step 2 of 4" in out
    assert "resumed from" in run(*plan, "--out", str(tmp_path / "parts"), "--resume")
    whole, parts = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("whole", "parts"))
    assert whole["history"] == parts["history"] and whole["step"] == 4
    assert list(whole["model"]) == list(parts["model"]) and "downsample_weights.0" in whole["model"]
    assert all(torch.equal(whole["model"][k], parts["model"][k]) for k in whole["model"])
    assert [m["hidden"].shape[1] for m in whole["memory"]] == [96, 32, 96, 2, 1]  # levels, shifted-in rows, ramp
    assert all(torch.equal(a["hidden"], b["hidden"]) for a, b in zip(whole["memory"], parts["memory"]))
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert result["args"]["layout"] == "1@1 1@3 1@1" and result["test_bpc"] > 0 and result["train_tokens_per_s"] > 0


def test_hourglass_checkpoint_evaluates_with_a_long_memory_and_samples(tmp_path):
    """--eval-only scores a hourglass checkpoint with the evaluation settings too (memory 4 x 96: a multiple of the
    factor, which every level then divides) and --sample decodes through the shortening from a prompt that is not a
    multiple of the factor, reproducibly from the seed."""
    run("train_char_lm.py", *TINY, "--steps", "2", "--out", str(tmp_path))
    out = run("train_char_lm.py", *TINY, "--out", str(tmp_path), "--eval-only", "--eval-chars", "600")
    assert "with evaluation settings (segment 96, memory 384," in out
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["evaluation"]["test_bpc"] > 0 and results["evaluation"]["tokens_per_s"] > 0
    sample = [run("train_char_lm.py", *TINY, "--out", str(tmp_path), "--sample", "25", "--prompt", "The ", "--seed",
                  "3") for _ in range(2)]
    assert sample[0].startswith("The ") and len(sample[0].rstrip("\n")) == 29 and sample[0] == sample[1]


def test_tradeoff_script_compares_flat_and_hourglass(tmp_path):
    out = run("hourglass_tradeoff.py", "--tiny", "--steps", "2", "--threads", "1", "--layout", "1@1 1@3 1@1",
              "--out", str(tmp_path))
    assert "| flat 3@1 |" in out and "| hourglass 1@1 1@3 1@1 |" in out
    rows = json.loads((tmp_path / "tradeoff.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["flat 3@1", "hourglass 1@1 1@3 1@1"]
    assert all(r["valid_bpc"] > 0 and r["step_peak_mib"] > 0 and r["tokens_per_s"] > 0 and r["valid_curve"]
               for r in rows)
    assert rows[0]["parameters"] == rows[1]["parameters"]  # same depth and widths: the same parameters
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and (tmp_path / "tradeoff.md").is_file()
    again = run("hourglass_tradeoff.py", "--tiny", "--steps", "2", "--threads", "1", "--layout", "1@1 1@3 1@1",
                "--more-layouts", "1@1 2@3 1@1", "--reuse", "--out", str(tmp_path))
    assert again.count("reused") == 2 and "| hourglass 1@1 2@3 1@1 |" in again  # only the new layout trained
    assert json.loads((tmp_path / "tradeoff.json").read_text())["rows"][:2] == rows
