"""The eager reference (Transformer-XL code path) against an independent float64 loop over (i, j)."""

import pytest
import torch

from helpers import Case, make_inputs
from memtx_ops import reference


def spec_loop(q, k, v, r, u, vb, kv_head_index=None, window=None, mem_offset=0, scale=None):
    """SPEC §1 written out one (batch, head, query, key) at a time."""
    B, H, L, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    M, R = K - L, r.shape[1]
    scale = D ** -0.5 if scale is None else scale
    g_of = [h * Hk // H for h in range(H)] if kv_head_index is None else kv_head_index.tolist()
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = g_of[h]
            for i in range(L):
                keys, scores = [], []
                for j in range(K):
                    if j <= M + i and (window is None or j > M + i - window):
                        dist = M + i - j + (mem_offset if j < M else 0)
                        s = (q[b, h, i] + u[h]) @ k[b, g, j] + (q[b, h, i] + vb[h]) @ r[g, min(dist, R - 1)]
                        keys.append(j)
                        scores.append(scale * s)
                p = torch.softmax(torch.stack(scores), 0)
                out[b, h, i] = sum(p[t] * v[b, g, j] for t, j in enumerate(keys))
    return out


LOOP_CASES = [
    Case(B=2, H=2, L=4, M=3, D=8),
    Case(B=1, H=2, L=5, M=0, D=4),
    Case(B=1, H=4, Hk=2, L=4, M=5, D=4, R=3),
    Case(B=1, H=3, L=6, M=4, D=4, window=3, mem_offset=5, kv_head_index=(2, 0, 1)),
    Case(B=1, H=2, L=3, M=6, D=4, window=7, mem_offset=2, R=40, scale=0.7),
    # offsets from just below r's rows to far past them (the reference bounds its table at R), windows past 2**31
    *(Case(B=1, H=2, L=4, M=5, D=4, R=6, mem_offset=offset, window=window)
      for offset, window in ((3, None), (4, 9), (5, 2**31), (40, 3), (10**12, 10**12))),
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=str)
def test_reference_matches_spec_loop(case):
    inputs = [t.detach() for t in make_inputs(case, torch.float64)]
    kwargs = case.kwargs()
    expected = spec_loop(*inputs, **kwargs)
    actual = reference.rel_memory_attention(*inputs, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_rel_shift_is_transformer_xl_shift():
    """Row i of the shifted matrix is row i of the input moved left by L - 1 - i."""
    L, T = 4, 7
    x = torch.arange(L * T, dtype=torch.float64).view(L, T)
    shifted = reference.rel_shift(x)
    for i in range(L):
        valid = T - (L - 1 - i)
        torch.testing.assert_close(shifted[i, :valid], x[i, L - 1 - i:])


def test_low_precision_softmax_runs_in_float32():
    case = Case(B=1, H=2, L=8, M=8, D=16)
    inputs = [t.detach() for t in make_inputs(case, torch.bfloat16)]
    out = reference.rel_memory_attention(*inputs)
    expected = reference.rel_memory_attention(*[t.double() for t in inputs])
    assert out.dtype == torch.bfloat16
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-2
