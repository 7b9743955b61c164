"""Bench suite: memory replay back-propagation (MRBP) against full BPTT and per-segment activation checkpointing.

The model is a Memformer-style language model over T segments whose activations dominate its memory: the
tokens attend over [memory slots ; segment] with the fused relative attention, a gated writer rewrites the S
slots from the segment's states, and an LM head with a large vocabulary gives the segment's loss (y). The
memory path (embedding, blocks, writer) is what ``need_output=False`` runs; the head and loss are skipped.

Methods (the ``backend`` column): ``bptt`` (one graph over all segments), ``checkpoint``
(``torch.utils.checkpoint`` around each segment), ``mrbp`` (``memory_replay`` with a step that always computes
its loss) and ``mrbp_need_output`` (the step takes ``need_output``: the forward pass runs the memory path only).
Each measures one forward and ``sum(losses).backward()``; for each T the methods are timed in interleaved rounds
(a warm-up round, then ``--repeats`` rounds in shuffled order: medians and ranges). ``peak_vs_T1``: peak tensor memory
over that at T=1. Resident memory (CPU, Linux): each (method, T) runs again in a fresh process (five memory-replay
rollouts of 8 segments to warm the heap up, then two by the method over T), whose peak resident set (VmHWM) under the default allocator is ``resident MiB``; ``resident
growth`` is its rise over T=1 and ``stored MiB`` the bytes of the memories MRBP keeps (SPEC §3 lets the peak grow by
those only; heap fragmentation shows here and not in the tensor peak). Options: ``--segments`` (T values), ``--batch``, ``--heads``, ``--dtypes``, ``--backends`` (methods), and the first
of ``--lengths`` as the segment length L.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memtx_ops
from bench.harness import failure_row, peak_memory, time_interleaved

NAME = "memory_replay"
BASELINE = "bptt"
METHODS = ("bptt", "checkpoint", "mrbp", "mrbp_need_output")


def default_config(device):
    if device.type == "cuda":
        return dict(batch=4, heads=8, length=512, slots=64, d_model=512, layers=4, vocab=32000,
                    segments=[1, 4, 16, 64], dtypes=["bfloat16"])
    # 0.5 MiB of memory per segment (B x S x d float32), as in the resident-memory measurement of SPEC §3's bound
    return dict(batch=8, heads=4, length=64, slots=64, d_model=256, layers=2, vocab=1024,
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


def forward_backward_of(method, model, slots, xs):
    """One rollout by ``method`` and ``sum(losses).backward()``."""

    def forward_backward():
        model.zero_grad(set_to_none=True)
        torch.stack(rollout(method, model, slots, xs)).sum().backward()

    return forward_backward


def fresh_process_resident_mib(method, T, cfg):
    """Peak resident set (MiB) of a new process that builds the suite's model, runs five memory-replay rollouts over
    8 segments (the same warm-up for every method and T), then two rollouts by ``method`` over T segments; None off
    Linux."""
    import json
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # the default allocator
    result = subprocess.run([sys.executable, "-m", "bench.suites.memory_replay", method, str(T), json.dumps(cfg)],
                            capture_output=True, text=True, env=env, timeout=1800,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if result.returncode != 0:
        print(f"  resident {method} T={T}: failed: {result.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return int(result.stdout.split()[-1]) / 1024


def _resident_main(method, T, cfg):
    """The child of :func:`fresh_process_resident_mib`: prints VmHWM in KiB."""
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    torch.manual_seed(0)
    model = SlotLM(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"], cfg["slots"], cfg["length"])
    slots = torch.randn(cfg["batch"], cfg["slots"], cfg["d_model"])
    xs = [tuple(torch.randint(cfg["vocab"], (cfg["batch"], cfg["length"])) for _ in range(2))
          for _ in range(max(T, 8))]
    warm_up = forward_backward_of("mrbp_need_output", model, slots, xs[:8])
    for _ in range(5):  # the same for every method and T: glibc's heap reaches its steady state under replays
        warm_up()
    call = forward_backward_of(method, model, slots, xs[:T])
    for _ in range(2):
        call()
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")))


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
        methods = [m for m in METHODS if opts.backends is None or m in opts.backends]
        peak_at_one = {}
        for T in segments:
            case = f"T={T} B={B} L={L} S={S} d={d} V={V}"
            calls = {m: forward_backward_of(m, model, slots, xs[:T]) for m in methods}
            timings, failed = time_interleaved({m: {"fwd_bwd_ms": call} for m, call in calls.items()}, device,
                                               opts.repeats, seed=T)
            for method, call in calls.items():
                if method in failed:
                    rows.append(failure_row(NAME, case, method, dtype_name, failed[method]))
                    continue
                peak_mb = peak_memory(call, device) / 2**20
                model.zero_grad(set_to_none=True)
                resident = fresh_process_resident_mib(method, T, dict(cfg, batch=B, heads=H, length=L))
                if T == 1:
                    peak_at_one[method] = (peak_mb, resident)
                extra = {}
                if method in peak_at_one:
                    extra["peak_vs_T1"] = round(peak_mb / peak_at_one[method][0], 3)
                if resident is not None:
                    extra["resident MiB"] = round(resident, 1)
                    if method in peak_at_one and peak_at_one[method][1] is not None:
                        extra["resident growth"] = round(resident - peak_at_one[method][1], 1)
                    if method.startswith("mrbp"):
                        extra["stored MiB"] = round((T - 1) * slots.numel() * slots.element_size() / 2**20, 1)
                row = dict(op=NAME, case=case, backend=method, dtype=dtype_name,
                           **timings[method]["fwd_bwd_ms"].fields("fwd_bwd_ms"), peak_mb=peak_mb, extra=extra)
                rows.append(row)
                print(f"  {case} {dtype_name} {method}: fwd+bwd {row['fwd_bwd_ms']:.1f} ms "
                      f"({row['fwd_bwd_ms_range'][0]:.1f}-{row['fwd_bwd_ms_range'][1]:.1f}), peak {peak_mb:.1f} MiB",
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


if __name__ == "__main__":
    import json
    import sys

    _resident_main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
