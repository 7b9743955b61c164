"""A detector of host synchronisation: the ops that make the host wait for device data.

On a GPU, an op whose result the host must know before it can go on (a value read by ``.item()``, ``bool()``,
``float()``; an output whose size depends on the data, as of ``nonzero`` or a boolean mask index) stalls the host
until the device has caught up, and a training loop then runs one kernel queue at a time. On the CPU the same ops
cost nothing extra, so a test there cannot time them; it can see them. :class:`HostSyncDetector` is a
``TorchDispatchMode`` (a context manager: nothing global is patched, and it is gone on exit) that sees every op
reaching torch's dispatcher and records, or raises on, those that need the host to read device data:

* ``aten::_local_scalar_dense`` (what ``.item()``, ``bool()``, ``int()``, ``float()`` and ``if tensor:`` call),
  ``aten::is_nonzero``, ``aten::equal`` (returns a Python bool);
* data-dependent output sizes: ``nonzero``, ``argwhere``, ``masked_select``, ``unique`` in every form,
  ``repeat_interleave`` without ``output_size``, ``bincount`` (its length is the largest value), ``histc``,
  ``index`` / ``index_put`` with a boolean mask;
* copies from a device to the host (``_to_copy`` / ``copy_`` from a non-CPU tensor into a CPU one; on a CPU-only
  machine there is none to see).

Not seen, because they read a CPU tensor's memory without an op: ``.tolist()``, ``.numpy()``, ``__array__``; code
under test must be read for those. ``aten::_assert_async`` is not a sync (on CUDA a device-side assertion, which
fails the next synchronising call; on the CPU it raises at once) and is allowed.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose every call needs the host to read device data.
SYNCING_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::nonzero_numpy",
    "aten::argwhere", "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::unique_dim_consecutive", "aten::bincount", "aten::histc",
})


class HostSyncError(RuntimeError):
    """Raised by :class:`HostSyncDetector` (``raise_on_sync=True``) at the first op that needs a host sync."""


def host_sync_reason(func, args, kwargs) -> Optional[str]:
    """Why the dispatcher op ``func`` called with ``args``/``kwargs`` needs the host to read device data, or None."""
    name = func._schema.name
    if name in SYNCING_OPS:
        return name
    if name == "aten::repeat_interleave" and func._schema.overload_name in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None:
        return f"{name} without output_size"
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{name} with a boolean mask"
    if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
        source = args[1] if name == "aten::copy_" else args[0]
        target = args[0].device if name == "aten::copy_" else kwargs.get("device")
        if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None \
                and torch.device(target).type == "cpu":
            return f"{name} from {source.device} to the host"
    return None


class HostSyncDetector(TorchDispatchMode):
    """``with HostSyncDetector() as detector: ...`` -> ``detector.syncs``: the reasons of every host-syncing op
    that ran inside (see the module's list). ``raise_on_sync=True`` raises :class:`HostSyncError` at the first."""

    def __init__(self, raise_on_sync: bool = False):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = host_sync_reason(func, args, kwargs)
        if reason is not None:
            self.syncs.append(reason)
            if self.raise_on_sync:
                raise HostSyncError(f"host synchronisation: {reason}")
        return func(*args, **kwargs)
