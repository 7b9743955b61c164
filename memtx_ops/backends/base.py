"""What every fused backend of ``rel_memory_attention`` provides."""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch

Tensor = torch.Tensor


def check_usable(backend, op: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises a clear error naming ``op`` unless ``backend`` (anything with ``name``, ``dtypes`` and
    ``unavailable_reason``) runs on ``device`` and ``dtype``: RuntimeError (not available here, with the reason) or
    TypeError (dtype)."""
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend.name!r} is not available: {reason}")
    if dtype not in backend.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(
            f"{op}: backend {backend.name!r} supports dtypes {supported}; got {str(dtype).replace('torch.', '')}"
        )


def warn_unavailable_extension(op: str) -> None:
    """Warns that ``op``'s ``backend="auto"`` runs the eager reference when the compiled extension did not load (its
    C++ kernels would have run on the CPU): a broken build is not silently slow. Python shows it once per process;
    not under torch.compile, where a warning would break the graph."""
    from memtx_ops._extension import extension_error

    error = extension_error()
    if error is not None and not torch.compiler.is_compiling():
        warnings.warn(f"{op}: backend='auto' runs the eager reference: {error}", RuntimeWarning, stacklevel=3)


class Backend:
    """A fused implementation of ``rel_memory_attention``.

    ``forward`` returns ``(out [B, H, L, D], lse [B, H, L])``, lse in :meth:`lse_dtype`, out in float32 for 16-bit
    inputs when ``float32_out`` (the custom op's call, whose out the backward reads) and else in the inputs' dtype;
    ``backward`` takes that float32 out and that lse (with grad_out in the inputs' dtype) and returns the gradients
    of ``(q, k, v, r, u, vb)``.
    Arguments arrive validated: ``kv_head_index`` is a contiguous int64 ``[H]`` tensor on the inputs' device,
    ``window`` is 0 for "no window", ``scale`` a finite float > 0, u and vb are contiguous, and q, k, v, r have a
    contiguous last dimension (other strides are arbitrary, stride 0 included). Under ``torch.compile`` the values
    of ``kv_head_index`` are not checked: a backend must never read or write outside its tensors for an index
    outside ``[0, Hk)``.
    """

    name: str = ""
    dtypes: Tuple[torch.dtype, ...] = ()
    max_head_dim: int = 256
    # Dtypes of ``dtypes`` that the kernels compute in another one: the public function hands the inputs over
    # converted, differentiably, and rounds the output back (``memtx_ops.ops.rel_memory_attention``); a call that
    # needs no gradient, outside torch.compile, hands k and v over as they are, for ``forward`` to read widened.
    compute_dtypes: Dict[torch.dtype, torch.dtype] = {}

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run on ``device``, else a sentence saying why not and what to do."""
        raise NotImplementedError

    def unfit_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        """None when this backend, available on ``device`` (:meth:`unavailable_reason`) and supporting ``dtype`` and
        ``head_dim``, can run them on that device, else a sentence saying what the device lacks. The default needs
        nothing more."""
        return None

    def lse_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the saved log-sum-exp for inputs computed in ``dtype``: float64 for float64, else float32."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def arrange_keys(self, k: Tensor, v: Tensor, query_len: int, needs_grad: bool) -> Tuple[Tensor, Tensor]:
        """k and v ``[B, Hk, K, D]`` in the layout this backend reads fastest for a call with ``query_len`` queries
        (``needs_grad``: the backward will read them again). Called before the op, so that a copy made here is the
        one the backward reads. The default keeps the tensors as they are."""
        return k, v

    def forward(self, q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, *,
                float32_out: bool) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(
        self, grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError


class ExtensionBackend(Backend):
    """The C++ operators of ``memtx_ops._C`` (``torch.ops.memtx_C``) for one device type."""

    def __init__(self, name: str, device_type: str, dtypes: Tuple[torch.dtype, ...], max_head_dim: int = 256,
                 compute_dtypes: Optional[Dict[torch.dtype, torch.dtype]] = None):
        self.name = name
        self.device_type = device_type
        self.dtypes = dtypes
        self.max_head_dim = max_head_dim
        self.compute_dtypes = dict(compute_dtypes or {})

    def unavailable_reason(self, device):
        from memtx_ops._extension import extension_error, has_cuda_kernels

        if device.type != self.device_type:
            return f"backend {self.name!r} runs on {self.device_type} tensors, got tensors on {device}"
        error = extension_error()
        if error is not None:
            return error
        if self.device_type == "cuda" and not has_cuda_kernels():
            return (
                "memtx_ops._C was built without its CUDA kernels; rebuild with a CUDA build of torch and "
                "nvcc on the PATH (or MEMTX_CUDA=1): `pip install --no-build-isolation .`"
            )
        return None

    def forward(self, q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, *, float32_out):
        return torch.ops.memtx_C.rel_memory_attention_fwd(
            q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, float32_out
        )

    def backward(self, grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale):
        return torch.ops.memtx_C.rel_memory_attention_bwd(
            grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale
        )
