"""Skip-retain (SPEC §2): the skip schedule, the memory ages and offsets across segments, and a skipped layer of
a small Transformer-XL stack behaving as the identity. (Rank consistency of the schedule's draws is tested with
the cross-head draws, which share the mechanism, in test_cross_head.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtx_ops
from memtx_ops.nn import LayerMemory, SkipRetainSchedule


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# --- schedule ----------------------------------------------------------------------------------------------

def test_probabilities():
    assert SkipRetainSchedule(5, p=0.2, schedule="uniform").probabilities == [0.2] * 4 + [0.0]
    assert SkipRetainSchedule(4).probabilities == [0.125, 0.25, 0.375, 0.0]  # the paper's 0.5 * l / n_layer
    assert SkipRetainSchedule(1, p=1.0, schedule="uniform").probabilities == [0.0]


@pytest.mark.parametrize("schedule,p", [("uniform", 0.3), ("linear", 0.5), ("uniform", 1.0)])
def test_skip_frequencies(schedule, p):
    sched = SkipRetainSchedule(6, p=p, schedule=schedule, generator=seeded(0))
    n = 4000
    freq = torch.tensor([sched.decide(True) for _ in range(n)], dtype=torch.float64).mean(0)
    probs = torch.tensor(sched.probabilities, dtype=torch.float64)
    # Within 5 standard deviations of each layer's Binomial(n, p_l) mean; exact where p_l is 0 or 1.
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt()).all(), (freq, probs)
    assert freq[-1] == 0  # the last layer is never skipped


def test_eval_and_finetune_never_skip():
    sched = SkipRetainSchedule(4, p=1.0, schedule="uniform")
    assert sched.decide(True) == [True, True, True, False]
    assert sched.decide(False) == [False] * 4
    sched.phase = "finetune"
    assert sched.decide(True) == [False] * 4
    sched.phase = "pretrain"
    assert sched.decide(True) == [True, True, True, False]


def test_decisions_reproducible():
    def run(sched):
        return [sched.decide(True) for _ in range(50)]

    sched = SkipRetainSchedule(8, p=0.4, schedule="uniform", generator=seeded(1))
    first = run(sched)
    assert run(SkipRetainSchedule(8, p=0.4, schedule="uniform", generator=seeded(1))) == first
    sched.generator = seeded(1)
    assert run(sched) == first
    sched.generator = seeded(2)
    assert run(sched) != first


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_layer=0), "n_layer"),
    (dict(n_layer=4, p=1.5), "probability"),
    (dict(n_layer=4, schedule="cosine"), "schedule"),
    (dict(n_layer=4, phase="train"), "phase"),
])
def test_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SkipRetainSchedule(**kwargs)


def test_memory_bad_mem_len():
    with pytest.raises(ValueError, match="mem_len"):
        LayerMemory(torch.zeros(1, 0)).update(False, torch.zeros(1, 4), -1)


# --- memory ages and offsets -------------------------------------------------------------------------------

def test_memory_ages_and_offsets():
    L, memory = 4, LayerMemory(torch.zeros(1, 0))
    seen = []
    for skipped in (False, True, True, False, True, False, False):
        seen.append((memory.age, memory.mem_offset))
        memory = memory.update(skipped, torch.zeros(1, L), mem_len=4)
    assert seen == [(1, 0), (1, 0), (2, 4), (3, 8), (1, 0), (2, 4), (1, 0)]


@pytest.mark.parametrize("lengths", [(8,), (8, 8, 5)], ids=["L=8", "L=8,8,5"])
@pytest.mark.parametrize("mem_len", [5, 8, 19])
def test_memory_holds_positions_at_its_offset(mem_len, lengths):
    """Hidden states stand in for their tokens' absolute positions. Before every segment, each layer's memory must
    hold consecutive positions such that SPEC §1's distance of query i to memory key j, ``M + i - j + mem_offset``,
    is the true distance; and its age must count the segments since the layer was last kept."""
    n_layer = 4
    sched = SkipRetainSchedule(n_layer, p=0.5, schedule="uniform", generator=seeded(mem_len))
    memories = [LayerMemory(torch.zeros(1, 0, dtype=torch.float64))] * n_layer
    last_kept, expected_len, ages = [-1] * n_layer, [0] * n_layer, set()
    start = 0
    for t in range(60):
        L = lengths[t % len(lengths)]
        skip = sched.decide(True)
        for l, (memory, skipped) in enumerate(zip(memories, skip)):
            M = memory.hidden.shape[1]
            true_positions = start - memory.mem_offset - M + torch.arange(M, dtype=torch.float64)
            assert torch.equal(memory.hidden[0], true_positions), (t, l, memory)
            assert M == expected_len[l] and memory.age == t - last_kept[l], (t, l, memory)
            if len(lengths) == 1:
                assert memory.mem_offset == (memory.age - 1) * L
            if not skipped:
                last_kept[l] = t
                expected_len[l] = min(mem_len, (M if memory.age == 1 else 0) + L)
            ages.add(memory.age)
        x = torch.arange(start, start + L, dtype=torch.float64)[None]  # [1, L]: every layer's input
        memories = [memory.update(skipped, x, mem_len) for memory, skipped in zip(memories, skip)]
        start += L
    assert max(ages) >= 4 and last_kept[-1] == 59  # memories aged several segments; the last layer always ran


# --- a small Transformer-XL stack --------------------------------------------------------------------------

def sinusoid(rows: int, dim: int) -> torch.Tensor:
    """Transformer-XL's position embedding of distances 0 .. rows-1, ``[rows, dim]``."""
    inv_freq = 1 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TinyXLLayer(nn.Module):
    """A batch-first Transformer-XL layer: relative attention over ``[memory ; segment]``, then a feed-forward block."""

    def __init__(self, d_model=32, n_head=4):
        super().__init__()
        self.n_head, self.d_head = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.r_net = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(0.3 * torch.randn(n_head, self.d_head))
        self.vb = nn.Parameter(0.3 * torch.randn(n_head, self.d_head))
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x, memory, mem_offset):  # x [B, L, d], memory [B, M, d]
        B, L, d = x.shape
        cat = torch.cat([memory, x], dim=1)
        q, k, v = self.qkv(cat).view(B, cat.shape[1], 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        rows = cat.shape[1] + mem_offset
        r = self.r_net(sinusoid(rows, d)).view(rows, self.n_head, self.d_head).transpose(0, 1)
        att = memtx_ops.rel_memory_attention(q[:, :, -L:], k, v, r, self.u, self.vb, mem_offset=mem_offset, backend="cpu")
        h = self.norm1(x + self.out(att.transpose(1, 2).reshape(B, L, d)))
        return self.norm2(h + self.ff(h))


def run_segment(layers, memories, x, skip, mem_len):
    """One segment through the stack -> (output, the input of every layer, the memories for the next segment)."""
    h, inputs, new_memories = x, [], []
    for layer, memory, skipped in zip(layers, memories, skip):
        inputs.append(h)
        new_memories.append(memory.update(skipped, h.detach(), mem_len))
        if not skipped:
            h = layer(h, memory.hidden, memory.mem_offset)
    return h, inputs, new_memories


def test_skipped_layer_is_identity():
    torch.manual_seed(0)
    layers = [TinyXLLayer() for _ in range(3)]
    L, mem_len = 8, 12
    segments = [torch.randn(2, L, 32) for _ in range(4)]
    memories = [LayerMemory.empty(segments[0])] * 3
    for x in segments[:2]:
        _, _, memories = run_segment(layers, memories, x, [False] * 3, mem_len)
    assert all(m.hidden.shape[1] == mem_len and m.age == 1 for m in memories)

    out, inputs, after = run_segment(layers, memories, segments[2], [False, True, False], mem_len)
    assert torch.equal(inputs[2], inputs[1])  # the skipped layer's output is its input
    assert after[1].hidden is memories[1].hidden and (after[1].age, after[1].mem_offset) == (2, L)  # kept, aged
    without, _, _ = run_segment([layers[0], layers[2]], [memories[0], memories[2]], segments[2], [False] * 2, mem_len)
    assert torch.equal(out, without)  # the stack is the stack without that layer
    for kept in (0, 2):
        assert after[kept].age == 1 and torch.equal(after[kept].hidden[:, -L:], inputs[kept])

    # Next segment, all kept: layer 1 reads its aged memory at mem_offset = L, and the offset matters.
    _, inputs, final = run_segment(layers, after, segments[3], [False] * 3, mem_len)
    assert torch.equal(inputs[2], layers[1](inputs[1], after[1].hidden, L))
    assert not torch.allclose(inputs[2], layers[1](inputs[1], after[1].hidden, 0), rtol=0, atol=1e-4)
    assert final[1].age == 1 and torch.equal(final[1].hidden, inputs[1])  # refreshed; the aged part is dropped
