"""Sampling the next token from a language model's logits: temperature, top-k and nucleus (top-p) filtering.

``sample_next_token(logits [B, V], ...) -> [B]`` int64. All of it runs on the logits' device; the only random draw is
one ``torch.multinomial`` from the caller's generator (or torch's default one), so a seeded generator reproduces
the tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def check_sampling(temperature, top_k, top_p) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument unless the sampling options are well formed."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0 \
            or temperature != temperature:
        raise ValueError(f"temperature must be a float >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row of ``logits [B, V]`` -> int64 ``[B]``.

    ``temperature`` 0 takes the most likely token; otherwise the logits are divided by it, restricted to the
    ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p`` (the most likely
    token always stays), and one token is drawn with ``generator``.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs  # the probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # keeps the first token (before = 0) and stops once top_p is reached
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
