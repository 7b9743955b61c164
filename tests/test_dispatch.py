"""Dispatch: the CUDA choice recorded by the bench is what backend="auto" resolves to; inference calls skip the
custom op."""

import json

import torch

import memtx_ops.backends as backends
from bench.suites import rel_memory_attention as suite


def test_recorded_choice_is_used_and_written(monkeypatch, tmp_path):
    path = tmp_path / "cuda_choices.json"
    monkeypatch.setattr(backends, "CUDA_CHOICES_FILE", str(path))
    monkeypatch.setattr(backends, "_CUDA_CHOICES", {})  # restored, with what the module read, after the test
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    rows = [dict(op="rel_memory_attention", case=f"B=1 H=1 L=M={L} D={D}", backend=b, dtype="bfloat16",
                 fwd_bwd_ms=ms) for L, D, b, ms in [(512, 64, "triton", 1.0), (512, 64, "cuda", 2.0),
                                                     (512, 128, "triton", 3.0), (512, 128, "cuda", 2.5)]]
    suite.record_auto(rows, torch.device("cuda"))
    assert json.loads(path.read_text()) == {"Test GPU": {"bfloat16": {"64": "triton", "128": "cuda"}}}
    device = torch.device("cuda")
    assert backends.measured_cuda_choice(device, torch.bfloat16, 128) == "cuda"
    assert backends.measured_cuda_choice(device, torch.bfloat16, 32) is None


def test_auto_resolves_on_cuda_inside_one_compiled_graph(monkeypatch):
    """backend="auto" on CUDA tensors reads the recorded choice and asks whether the CUDA kernels are built: under
    torch.compile(fullgraph=True) neither may break the graph (a file read and the dispatcher query once did, in
    every model's compile on a GPU). The GPU's name comes from a torch function dynamo cannot trace, as on a GPU."""
    monkeypatch.setattr(backends, "_CUDA_CHOICES", {"Test GPU": {"bfloat16": {"64": "cuda"}}})

    def gpu_name(device=None):
        traced_would_break = torch._C._dispatch_has_kernel_for_dispatch_key("aten::add.Tensor", "CPU")
        return "Test GPU" if traced_would_break else "other"

    monkeypatch.setattr(torch.cuda, "get_device_name", gpu_name)
    device = torch.device("cuda", 0)

    def resolved(x):
        cuda_reason = backends.BACKENDS["cuda"].unavailable_reason(device)
        choice = backends.measured_cuda_choice(device, torch.bfloat16, 64)
        return x + len(backends.resolve_backend("auto", device, torch.bfloat16, 64)) + len(cuda_reason or "") + len(
            choice)

    torch._dynamo.reset()
    try:
        assert torch.equal(torch.compile(resolved, fullgraph=True, backend="eager")(torch.zeros(1)),
                           resolved(torch.zeros(1)))
    finally:
        torch._dynamo.reset()


def test_auto_without_a_recorded_choice_prefers_the_cuda_kernels_then_triton(monkeypatch):
    monkeypatch.setattr(backends, "_CUDA_CHOICES", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(backends.BACKENDS["triton"], "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backends.BACKENDS["cuda"], "unavailable_reason", lambda device: None)
    device = torch.device("cuda")
    assert backends.resolve_backend("auto", device, torch.float16, 64) == "cuda"
    assert backends.resolve_backend("auto", device, torch.float16, 192) == "triton"  # over the CUDA kernels' 128
    monkeypatch.setattr(backends.BACKENDS["cuda"], "unavailable_reason", lambda device: "built without CUDA")
    assert backends.resolve_backend("auto", device, torch.float16, 64) == "triton"


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


def test_inference_calls_the_kernel_directly_and_training_the_custom_op(monkeypatch):
    """Under no_grad (or with no input that requires grad) the public op calls the backend's kernel without the
    custom op's dispatch; with grad it goes through the custom op, so autograd and torch.compile see one op."""
    import importlib

    import pytest

    import memtx_ops
    from helpers import Case, make_inputs

    op_module = importlib.import_module("memtx_ops.ops.rel_memory_attention")

    inputs = [t.detach() for t in make_inputs(Case(B=2, H=2, L=3, M=20, D=16), torch.float32)]
    with_grad = [t.clone().requires_grad_() for t in inputs]
    trained = memtx_ops.rel_memory_attention(*with_grad, backend="cpu")
    assert trained.grad_fn is not None

    def custom_op_called(*args):
        raise AssertionError("the custom op ran for an inference call")

    monkeypatch.setattr(op_module, "_rel_memory_attention_op", custom_op_called)
    with torch.no_grad():
        inferred = memtx_ops.rel_memory_attention(*with_grad, backend="cpu")
    plain = memtx_ops.rel_memory_attention(*inputs, backend="cpu")  # grad enabled, nothing requires it
    assert torch.equal(inferred, trained.detach()) and torch.equal(plain, inferred)
    with pytest.raises(AssertionError, match="custom op ran"):
        memtx_ops.rel_memory_attention(*with_grad, backend="cpu")
