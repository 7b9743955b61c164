"""Bench suite: memory replay back-propagation (MRBP) against full BPTT and per-segment activation checkpointing.

The model is a Memformer-style language model over T segments whose activations dominate its memory: the
tokens attend over [memory slots ; segment] with the fused relative attention, a gated writer rewrites the S
slots from the segment's states, and an LM head with a large vocabulary gives the segment's loss (y). The
memory path (embedding, blocks, writer) is what ``need_output=False`` runs; the head and loss are skipped.

Methods (the ``backend`` column): ``bptt`` (one graph over all segments), ``checkpoint``
(``torch.utils.checkpoint`` around each segment), ``mrbp`` (``memory_replay`` with a step that always computes
its loss) and ``mrbp_need_output`` (the step takes ``need_output``: the forward pass runs the memory path only).
Each measures one forward and ``sum(losses).backward()``. ``peak_vs_T1``: peak memory over that at T=1.
Options: ``--segments`` (T values), ``--batch``, ``--heads``, ``--dtypes``, ``--backends`` (methods), and the first
of ``--lengths`` as the segment length L.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memtx_ops
from bench.harness import median_time, peak_memory

NAME = "memory_replay"
BASELINE = "bptt"
METHODS = ("bptt", "checkpoint", "mrbp", "mrbp_need_output")


def default_config(device):
    if device.type == "cuda":
        return dict(batch=4, heads=8, length=512, slots=64, d_model=512, layers=4, vocab=32000,
                    segments=[1, 4, 16, 64], dtypes=["bfloat16"])
    return dict(batch=4, heads=4, length=64, slots=16, d_model=32, layers=2, vocab=8192,
                segments=[1, 4, 16, 64], dtypes=["float32"])


class Block(nn.Module):
    """Pre-norm block: relative attention of the segment over [slots ; segment], then a feed-forward layer."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.r_net = nn.Linear(d, d, bias=False)
        self.u = nn.Parameter(torch.zeros(heads, d // heads))
        self.vb = nn.Parameter(torch.zeros(heads, d // heads))
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, slots, pos):
        """h [B, L, d], slots [B, S, d], pos [R, d] -> [B, L, d]."""
        b, length, d = h.shape
        qkv = self.qkv(self.norm1(torch.cat([slots, h], 1))).view(b, -1, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, S + L, d_head]
        r = self.r_net(pos).view(-1, self.heads, d // self.heads).transpose(0, 1)
        a = memtx_ops.rel_memory_attention(q[:, :, -length:], k, v, r, self.u, self.vb)
        h = h + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return h + self.drop(self.ff(self.norm2(h)))


class SlotLM(nn.Module):
    """``forward(slots [B, S, d], (tokens [B, L], targets [B, L]), need_output) -> (loss or None, slots)``."""

    def __init__(self, vocab, d, heads, layers, slots, length, dropout=0.1):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(slots + length, d))
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.write_norm = nn.LayerNorm(d)
        self.write_q, self.write_kv, self.write_out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.embed.weight  # tied, as in most language models
        self.drop = nn.Dropout(dropout)

    def write(self, slots, h):
        """Slots attend over [slots ; h] and move towards what they read through a gate -> [B, S, d]."""
        (b, s, d), heads = slots.shape, self.heads
        q = self.write_q(self.write_norm(slots)).view(b, s, heads, -1).transpose(1, 2)
        kv = self.write_kv(self.write_norm(torch.cat([slots, h], 1))).view(b, -1, 2, heads, d // heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        read = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        candidate = torch.tanh(self.write_out(read))
        gate = torch.sigmoid(self.gate(torch.cat([slots, candidate], -1)))
        return gate * slots + (1 - gate) * candidate

    def forward(self, slots, x, need_output=True):
        tokens, targets = x
        h = self.drop(self.embed(tokens))
        for block in self.blocks:
            h = block(h, slots, self.pos)
        slots_next = self.write(slots, h)
        if not need_output:
            return None, slots_next
        logits = self.head(self.drop(h))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), slots_next


def rollout(method, model, slots, xs):
    """The T losses of one forward pass by ``method`` -> list of 0-dim tensors."""
    if method == "mrbp_need_output":
        return memtx_ops.memory_replay(model, slots, xs)[0]
    if method == "mrbp":
        return memtx_ops.memory_replay(lambda m, x: model(m, x), slots, xs, params=model.parameters())[0]
    losses = []
    for x in xs:
        loss, slots = checkpoint(model, slots, x, use_reentrant=False) if method == "checkpoint" else model(slots, x)
        losses.append(loss)
    return losses


def measure(method, model, slots, xs, device, repeats):
    """Median fwd+bwd seconds and peak bytes of one rollout by ``method`` plus ``sum(losses).backward()``."""

    def forward_backward():
        model.zero_grad(set_to_none=True)
        torch.stack(rollout(method, model, slots, xs)).sum().backward()

    # Long rollouts: one timed run (the shorter ones warmed everything up) keeps the suite short.
    long_rollout = len(xs) > 16
    t_fb = median_time(forward_backward, device, warmup=0 if long_rollout else 1,
                       repeats=1 if long_rollout else repeats)
    model.zero_grad(set_to_none=True)
    peak = peak_memory(forward_backward, device)
    model.zero_grad(set_to_none=True)
    return t_fb, peak


def segments_of(row) -> int:
    """T of a row, from its case "T=16 B=... ..."."""
    return int(row["case"].split()[0][len("T="):])


def run(opts):
    device = opts.device
    cfg = default_config(device)
    B, H, L = opts.batch or cfg["batch"], opts.heads or cfg["heads"], (opts.lengths or [cfg["length"]])[0]
    S, d, V = cfg["slots"], cfg["d_model"], cfg["vocab"]
    segments = sorted(opts.segments or cfg["segments"])
    rows = []
    for dtype_name in opts.dtypes or cfg["dtypes"]:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = SlotLM(V, d, H, cfg["layers"], S, L).to(device=device, dtype=dtype)
        slots = torch.randn(B, S, d, device=device, dtype=dtype)
        xs = [tuple(torch.randint(V, (B, L), device=device) for _ in range(2)) for _ in range(segments[-1])]
        for method in (m for m in METHODS if opts.backends is None or m in opts.backends):
            peak_at_one = None
            for T in segments:
                case = f"T={T} B={B} L={L} S={S} d={d} V={V}"
                t_fb, peak = measure(method, model, slots, xs[:T], device, opts.repeats)
                peak_mb = peak / 2**20
                if T == 1:
                    peak_at_one = peak_mb
                extra = {"peak_vs_T1": round(peak_mb / peak_at_one, 3)} if peak_at_one else {}
                rows.append(dict(op=NAME, case=case, backend=method, dtype=dtype_name, fwd_bwd_ms=1e3 * t_fb,
                                 peak_mb=peak_mb, extra=extra))
                print(f"  {case} {dtype_name} {method}: fwd+bwd {1e3 * t_fb:.1f} ms, peak {peak_mb:.1f} MiB",
                      flush=True)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["dtype"], segments_of(r), order[r["backend"]]))
    return rows


def plot(rows, out_dir, stem):
    """fwd+bwd time and peak memory against the number of segments T, one line per method."""
    from bench.report import plot_against

    path = plot_against(rows, NAME, segments_of, f"{out_dir}/{stem}-{NAME}.png",
                        "segments T", f"{NAME}: MRBP vs BPTT vs checkpointing")
    return [path] if path else []
