"""``Dropout``: ``torch.nn.Dropout`` running :func:`memtx_ops.dropout` (Philox mask, recomputed in backward)."""

from __future__ import annotations

from torch import nn

from memtx_ops.ops.dropout import check_backend, dropout


class Dropout(nn.Dropout):
    """Drop-in ``nn.Dropout(p)``: x any shape -> same shape. ``backend`` as in :func:`memtx_ops.dropout`
    ("auto": the C++ kernel on the CPU, torch's dropout on CUDA; "torch": always torch's)."""

    def __init__(self, p: float = 0.5, *, backend: str = "auto"):
        super().__init__(p)
        check_backend(backend)
        self.backend = backend

    def forward(self, x):
        return dropout(x, self.p, self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, backend={self.backend!r}"
