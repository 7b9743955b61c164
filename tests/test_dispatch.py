"""Dispatch: the CUDA choice recorded by the bench is what backend="auto" resolves to; inference calls skip the
custom op."""

import json

import torch

import pytest

import memtx_ops.backends as backends
import memtx_ops.backends.cuda as cuda_backend
from bench.suites import rel_memory_attention as suite


def pretend_gpu(monkeypatch, major=9, shared_memory_optin=232448, kernel_shared_memory=111104):
    """The device queries of the CUDA backend answer as a GPU of compute capability ``major`` would, for kernels that
    need ``kernel_shared_memory`` bytes (an H100 and bf16 at D=128 by default; no GPU or CUDA build needed)."""
    monkeypatch.setattr(cuda_backend, "_compute_capability_major", lambda index: major)
    monkeypatch.setattr(cuda_backend, "_shared_memory_optin", lambda index: shared_memory_optin)
    monkeypatch.setattr(cuda_backend, "_kernel_shared_memory", lambda head_dim, dtype: kernel_shared_memory)


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
    """backend="auto" on CUDA tensors reads the recorded choice and asks whether the CUDA kernels are built and fit
    the GPU: under torch.compile(fullgraph=True) none may break the graph (a file read and the dispatcher query once
    did, in every model's compile on a GPU). The GPU's name and properties come from torch functions dynamo cannot
    trace, as on a GPU."""
    monkeypatch.setattr(backends, "_CUDA_CHOICES", {"Test GPU": {"bfloat16": {"64": "cuda"}}})

    def gpu_name(device=None):
        traced_would_break = torch._C._dispatch_has_kernel_for_dispatch_key("aten::add.Tensor", "CPU")
        return "Test GPU" if traced_would_break else "other"

    monkeypatch.setattr(torch.cuda, "get_device_name", gpu_name)

    class Properties:  # what the CUDA backend asks of the GPU, through a torch function dynamo cannot trace either
        major, shared_memory_per_block_optin = 8, 101376

    def gpu_properties(device=None):
        return Properties if torch._C._dispatch_has_kernel_for_dispatch_key("aten::add.Tensor", "CPU") else None

    monkeypatch.setattr(torch.cuda, "get_device_properties", gpu_properties)
    monkeypatch.setattr(torch.ops.memtx_C, "cuda_shared_memory_bytes", lambda head_dim, dtype: 111104,
                        raising=False)
    monkeypatch.setattr(cuda_backend, "_KERNEL_SHARED_MEMORY", {})  # to hold the stand-in's answers
    device = torch.device("cuda", 0)

    def resolved(x):
        cuda_reason = backends.BACKENDS["cuda"].unavailable_reason(device)
        cuda_unfit = backends.BACKENDS["cuda"].unfit_reason(device, torch.bfloat16, 64)
        choice = backends.measured_cuda_choice(device, torch.bfloat16, 64)
        return x + len(backends.resolve_backend("auto", device, torch.bfloat16, 64)) + len(cuda_reason or "") + len(
            choice) + len(cuda_unfit)

    torch._dynamo.reset()
    try:
        assert torch.equal(torch.compile(resolved, fullgraph=True, backend="eager")(torch.zeros(1)),
                           resolved(torch.zeros(1)))
    finally:
        torch._dynamo.reset()


def test_auto_without_a_recorded_choice_prefers_the_cuda_kernels_then_triton(monkeypatch):
    pretend_gpu(monkeypatch)
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
    pretend_gpu(monkeypatch)
    cuda = backends.BACKENDS["cuda"]
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None)
    with pytest.raises(ValueError, match=r"backend 'cuda' supports head dims D <= 128; got D=192"):
        backends.get_backend("cuda", torch.device("cuda"), torch.float16, 192)
    assert backends.get_backend("cuda", torch.device("cuda"), torch.float16, 128) is cuda
    monkeypatch.setattr(backends.BACKENDS["triton"], "unavailable_reason", lambda device: "no triton here")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    assert backends.resolve_backend("auto", torch.device("cuda"), torch.float16, 192) == "reference"


@pytest.mark.parametrize("gpu,major,optin,need", [("Tesla T4", 7, 65536, 97536), ("NVIDIA L4", 8, 101376, 111104)],
                         ids=["sm_75", "99 KiB of shared memory"])
def test_auto_passes_over_a_gpu_the_cuda_kernels_cannot_run_on(monkeypatch, gpu, major, optin, need):
    """The C++ check refuses compute capability 7.x and a GPU with less opt-in shared memory than the kernels of the
    dtype and head dim need: "auto" takes Triton there instead of raising at the first call (it took the CUDA
    kernels on any GPU), and naming "cuda" raises before the launch, saying what the GPU lacks."""
    pretend_gpu(monkeypatch, major, optin, need)
    monkeypatch.setattr(backends, "_CUDA_CHOICES", {gpu: {"bfloat16": {"128": "cuda"}}})  # even a recorded choice
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(backends.BACKENDS["triton"], "unavailable_reason", lambda device: None)
    monkeypatch.setattr(backends.BACKENDS["cuda"], "unavailable_reason", lambda device: None)
    device = torch.device("cuda", 0)
    assert backends.resolve_backend("auto", device, torch.bfloat16, 128) == "triton"
    lacks = "need compute capability 8.0 or newer .* this GPU has 7.x" if major < 8 else (
        f"for D=128 in bfloat16 need {need} bytes of shared memory per block, this GPU allows {optin}")
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run on cuda:0: its kernels {lacks}"):
        backends.get_backend("cuda", device, torch.bfloat16, 128)
    pretend_gpu(monkeypatch, 8, optin, optin)  # what fits runs
    assert backends.resolve_backend("auto", device, torch.bfloat16, 128) == "cuda"


def test_triton_refuses_bfloat16_in_its_cpu_interpreter(monkeypatch):
    """Triton's interpreter computes bfloat16 wrong (outputs ~1e9 off, silently): CPU tensors of that dtype are refused
    before any kernel runs, for attention and resampling, while float16 goes on (to the interpreter, stubbed here)."""
    import memtx_ops
    from memtx_ops.backends.causal_resample import RESAMPLE_BACKENDS

    monkeypatch.setattr(backends.BACKENDS["triton"], "unavailable_reason", lambda device: None)
    ran = []
    def attention(q, *args, **kwargs):
        ran.append("attention")
        return torch.zeros_like(q), torch.zeros(q.shape[:3])

    monkeypatch.setattr(backends.BACKENDS["triton"], "forward", attention)
    monkeypatch.setattr(RESAMPLE_BACKENDS["triton"], "causal_downsample", lambda *args: ran.append("resample"))
    q = torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)
    r = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    u = torch.zeros(2, 16, dtype=torch.bfloat16)
    x = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    lacks = "backend 'triton' cannot run on cpu: Triton's CPU interpreter computes bfloat16 wrong"
    with pytest.raises(RuntimeError, match=f"rel_memory_attention: {lacks}"):
        memtx_ops.rel_memory_attention(q, q, q, r, u, u, backend="triton")
    with pytest.raises(RuntimeError, match=f"causal_downsample: {lacks}"):
        memtx_ops.causal_downsample(x, 3, backend="triton")
    assert ran == []
    memtx_ops.rel_memory_attention(q.half(), q.half(), q.half(), r.half(), u.half(), u.half(), backend="triton")
    memtx_ops.causal_downsample(x.half(), 3, backend="triton")
    assert ran == ["attention", "resample"]


def test_auto_warns_when_it_falls_back_because_the_extension_did_not_load(monkeypatch):
    """A broken build is not silently slow: without memtx_ops._C, "auto" on CPU tensors runs the eager reference
    (attention and resampling) and says why; with it, no warning."""
    import warnings

    import memtx_ops._extension as extension
    from memtx_ops.backends.causal_resample import resolve_resample_backend

    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", cpu, torch.float32, 64) == "cpu"
    monkeypatch.setattr(extension, "_load_error", ImportError("undefined symbol: stand-in"))
    with pytest.warns(RuntimeWarning, match=r"rel_memory_attention: backend='auto' runs the eager reference: the "
                                            r"compiled extension memtx_ops._C could not be imported \(undefined symbol"):
        assert backends.resolve_backend("auto", cpu, torch.float32, 64) == "reference"
    with pytest.warns(RuntimeWarning, match="causal resampling: backend='auto' runs the eager reference"):
        assert resolve_resample_backend("auto", cpu, torch.float32) == "reference"


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
