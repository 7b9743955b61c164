"""The training example runs end to end on a tiny configuration: train, evaluate, checkpoint, resume, plot."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "2", "--tgt-len", "16", "--mem-len", "16", "--n-layer", "2", "--n-head", "2",
        "--d-model", "16", "--d-inner", "32", "--eval-every", "2", "--eval-chars", "400", "--device", "cpu"]


def train(out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_char_lm.py"), *TINY, "--out", str(out), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


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
