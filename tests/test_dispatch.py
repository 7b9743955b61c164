"""backend='auto': the CUDA choice recorded by the bench is what auto resolves to."""

import json

import torch

import memtx_ops.backends as backends
from bench.suites import rel_memory_attention as suite


def test_recorded_choice_is_used_and_written(monkeypatch, tmp_path):
    path = tmp_path / "cuda_choices.json"
    monkeypatch.setattr(backends, "CUDA_CHOICES_FILE", str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    backends._cuda_choices.cache_clear()
    rows = [dict(op="rel_memory_attention", case=f"B=1 H=1 L=M={L} D={D}", backend=b, dtype="bfloat16",
                 fwd_bwd_ms=ms) for L, D, b, ms in [(512, 64, "triton", 1.0), (512, 64, "cuda", 2.0),
                                                     (512, 128, "triton", 3.0), (512, 128, "cuda", 2.5)]]
    suite.record_auto(rows, torch.device("cuda"))
    assert json.loads(path.read_text()) == {"Test GPU": {"bfloat16": {"64": "triton", "128": "cuda"}}}
    device = torch.device("cuda")
    assert backends.measured_cuda_choice(device, torch.bfloat16, 128) == "cuda"
    assert backends.measured_cuda_choice(device, torch.bfloat16, 32) is None
    backends._cuda_choices.cache_clear()


def test_cuda_backend_head_dim_limit_is_checked_before_launch(monkeypatch):
    import pytest

    cuda = backends.BACKENDS["cuda"]
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)
    with pytest.raises(ValueError, match=r"backend 'cuda' supports head dims D <= 128; got D=192"):
        backends.get_backend("cuda", torch.device("cuda"), torch.float16, 192)
    assert backends.get_backend("cuda", torch.device("cuda"), torch.float16, 128) is cuda
    monkeypatch.setattr(backends.BACKENDS["triton"], "unavailable_reason", lambda device: "no triton here")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    assert backends.resolve_backend("auto", torch.device("cuda"), torch.float16, 192) == "reference"
