"""Reference of ``dropout``: inverted dropout whose mask is Philox4x32-10 of (seed, element index).

The mask is a pure function of the seed and the element's index in the contiguous layout, so the
backward pass recomputes it instead of storing it. Layout: the counters are taken in batches of 16; element
``i`` uses the 64-bit counter ``(i // 64) * 16 + i % 16`` (as two 32-bit words, the other two zero) and
its random word ``(i // 16) % 4``; it is kept when that word is ``>= floor(p * 2**32)``. Everything here is
int64 arithmetic on tensors, bit-exact with the C++ kernel.
"""

from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

_MASK32 = 0xFFFFFFFF
_LANES = 16


def _mul_hi_lo(a: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * m`` for uint32 values ``a`` (int64 tensor) and constant ``m``,
    in int64 arithmetic that cannot overflow."""
    t_lo = (a & 0xFFFF) * m  # < 2**48
    t_hi = (a >> 16) * m
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def philox4x32_10(counter: Tuple[Tensor, Tensor, Tensor, Tensor], key: Tuple[int, int]) -> Tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words: 4 counter words, 2 key words -> 4 random words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, 0xD2511F53)
        hi1, lo1 = _mul_hi_lo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(numel: int, p: float, seed: int, device=None) -> Tensor:
    """Bool ``[numel]``: which elements (contiguous order) the dropout of probability ``p`` keeps."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    counter = (i // (4 * _LANES)) * _LANES + i % _LANES
    zero = torch.zeros_like(counter)
    words = torch.stack(philox4x32_10((counter & _MASK32, counter >> 32, zero, zero),
                                      (seed & _MASK32, (seed >> 32) & _MASK32)))
    word = words.gather(0, ((i // _LANES) % 4)[None]).squeeze(0)
    return word >= int(p * 2**32)


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """``x * keep / (1 - p)`` with the Philox mask of ``seed``: x any shape, p in [0, 1) -> same shape."""
    keep = dropout_keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
