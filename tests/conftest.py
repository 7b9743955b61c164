"""Test session set-up.

* Without a GPU, Triton kernels run in its CPU interpreter (set before triton loads).
* Under pytest-xdist (``make test`` runs a worker per core) each worker takes its share of torch's threads.
* Every test starts from a torch seed of its own, drawn from the run's seed (pytest-randomly's ``--randomly-seed``,
  0 without the plugin) and the test's node id, as pytest-randomly seeds ``random`` and numpy: a test draws the
  same inputs in any order and alone, so ``pytest -p randomly --randomly-seed=N <node id>`` reproduces a failure,
  and each run of the suite draws fresh ones.
* Every test runs inside a guard that restores torch's random-number state afterwards and fails the test if it
  left other process-wide state changed: environment variables, torch's default dtype, thread count,
  deterministic mode, grad mode, matmul precision flags, or the dynamo/inductor configs. The suite passes in
  any order (``python -m pytest -p randomly tests``).
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (``-n N``) the workers share the cores: each takes its share of torch's threads, as one process
# would have all of them. Tests of the thread-dependent work splits set their thread counts themselves.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# Set by pytest itself, or by torch once per process on first use (not by a test): inductor's first compile for a
# GPU points Triton at its cache and at torch's ptxas.
_INTERNAL_ENVIRONMENT = ("PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_", "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH")


def _environment():
    return {k: v for k, v in os.environ.items() if not k.startswith(_INTERNAL_ENVIRONMENT)}


def _global_state():
    """What a test may change only temporarily, by name."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    return {
        "os.environ": _environment(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        # torch's new precision API (reading the legacy allow_tf32 flags after it was set would raise)
        "torch.backends.cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "torch.backends.cudnn.fp32_precision": torch.backends.cudnn.fp32_precision,
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch._dynamo.config": dynamo_config.get_config_copy(),
        "torch._inductor.config": inductor_config.get_config_copy(),
    }


def _restore(state):
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for name in set(_environment()) - set(state["os.environ"]):
        del os.environ[name]
    os.environ.update(state["os.environ"])
    torch.set_default_dtype(state["torch.get_default_dtype()"])
    torch.set_num_threads(state["torch.get_num_threads()"])
    torch.use_deterministic_algorithms(state["torch.are_deterministic_algorithms_enabled()"])
    torch.set_grad_enabled(state["torch.is_grad_enabled()"])
    torch.set_float32_matmul_precision(state["torch.get_float32_matmul_precision()"])  # sets fp32_precision too
    torch.backends.cuda.matmul.fp32_precision = state["torch.backends.cuda.matmul.fp32_precision"]
    torch.backends.cudnn.fp32_precision = state["torch.backends.cudnn.fp32_precision"]
    dynamo_config.load_config(state["torch._dynamo.config"])
    inductor_config.load_config(state["torch._inductor.config"])


def _changed(before, after):
    changed = []
    for name, value in before.items():
        if isinstance(value, dict):
            keys = sorted(k for k in set(value) | set(after[name]) if value.get(k, "<unset>") != after[name].get(k, "<unset>"))
            changed += [f"{name}[{k!r}]: {value.get(k, '<unset>')!r} -> {after[name].get(k, '<unset>')!r}" for k in keys]
        elif after[name] != value:
            changed.append(f"{name}: {value!r} -> {after[name]!r}")
    return changed


def _test_seed(request) -> int:
    """The torch seed of a test: the run's seed (``--randomly-seed``; 0 without pytest-randomly) plus the crc32 of
    its node id."""
    run_seed = getattr(request.config.option, "randomly_seed", 0)
    return (int(run_seed) + zlib.crc32(request.node.nodeid.encode())) % 2**63


@pytest.fixture(autouse=True)
def no_global_state_left_behind(request):
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    before = _global_state()
    torch.manual_seed(_test_seed(request))
    yield
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    after = _global_state()
    changed = _changed(before, after)
    if changed:
        _restore(before)
        pytest.fail("the test left process-wide state changed: " + "; ".join(changed), pytrace=False)
