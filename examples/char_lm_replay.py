"""Prioritized segment replay for the character-level Transformer-XL example (Transformer with Memory Replay,
Liu & Mozafari 2022, in the memory-transformer setting).

Each training step's batch of B segments holds ``R = floor(rho * B + 1/2)`` segments replayed from a
:class:`memtx_ops.replay.PrioritizedReplay` beside ``B - R`` fresh ones (the training text runs in ``B - R``
streams, so a run with replay sees exactly the fresh characters of a run without it at batch ``B - R``). Replay
adds no pass over the data:

* the replayed segments ride in the same forward as the fresh ones;
* that forward gives every segment's own loss (the mean over its tokens) first, then the loss to back-propagate,
  ``mean_b(w_b * loss_b)`` with the importance weights ``w`` (1 for fresh segments);
* the replayed segments' priorities are updated from those same losses (rule ``loss`` / ``loss_difference``) or
  from the ghost norm of their output-layer gradient, computed in closed form from the same logits
  (``grad_norm``); the fresh segments enter the buffer with the largest priority and their loss (the last visit).

A replayed segment needs its memory context. ``context="window"`` (the default) stores with each segment the
``mem_len`` tokens that precede it in its stream and rebuilds its memory by a no-grad forward over that window
(from an empty memory, with the current weights, the last layer skipped: it feeds no memory). ``context="memory"``
stores the memory itself (``n_layer x mem_len x d_model`` floats per segment, as it was when the segment was
trained). Per stored segment: window ``(mem_len + L + 1)`` token ids (2 KB at L = M = 128), memory about
``4 * n_layer * mem_len * d_model`` bytes more (256 KB for the example's defaults: 128x the bytes); per step the
window costs a no-grad forward of ``R x mem_len`` tokens through ``n_layer - 1`` layers. ``bench/suites/replay.py``
measures both; the window is the default because the memory's bytes would limit the buffer to a few thousand
segments per GB while the rebuild costs a fraction of one forward (docs/replay.md).

Segments are stored (and replayed) once the fresh memory is full (every entry as long as the model keeps it:
``mem_len`` positions, or per level for an hourglass model): so every replayed segment has a full window and its
rebuilt memory has the fresh rows' shape. ``context="memory"`` needs one ``mem_len`` entry per layer (no hourglass). Not combined with skip-retain (its aged memories
are per layer, not per row) or with memory replay back-propagation over several segments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from memtx_ops.nn import LayerMemory, TransformerXL
from memtx_ops.replay import LinearSchedule, PrioritizedReplay, cross_entropy_logit_grads, output_layer_grad_norms

CONTEXTS = ("window", "memory")


def replayed_count(fraction: float, batch_size: int) -> int:
    """How many of ``batch_size`` segments are replayed: ``floor(fraction * batch_size + 1/2)``; raises unless
    0 <= fraction < 1 and, for fraction > 0, the count is in [1, batch_size - 1]."""
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    count = int(fraction * batch_size + 0.5)
    if fraction > 0 and not 1 <= count <= batch_size - 1:
        raise ValueError(f"replay fraction {fraction} of a batch of {batch_size} gives {count} replayed segments; "
                         f"need between 1 and batch_size - 1 (a larger batch or another fraction)")
    return count


class SegmentReplay:
    """Replay of training segments for :class:`TransformerXL` (see the module's text).

    ``batch_size``: B, the segments of a step; ``fraction``: rho; ``capacity``: segments the buffer keeps;
    ``rule``: ``"loss"``, ``"loss_difference"`` or ``"grad_norm"``; ``tgt_len``, ``mem_len``: L and M;
    ``context``: ``"window"`` or ``"memory"``; ``alpha``, ``beta``: of the buffer (default beta annealed linearly
    from 0.4 to 1 over ``steps`` samples); ``seed``: of the buffer's generator.
    """

    def __init__(self, *, batch_size: int, fraction: float, capacity: int, rule: str, tgt_len: int, mem_len: int,
                 device, steps: int, context: str = "window", alpha: float = 0.6, beta=None,
                 seed: Optional[int] = None):
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.replayed = replayed_count(fraction, batch_size)
        self.fresh = batch_size - self.replayed
        self.tgt_len, self.mem_len, self.context = tgt_len, mem_len, context
        self.buffer = PrioritizedReplay(capacity, alpha=alpha, beta=LinearSchedule(0.4, 1.0, steps)
                                        if beta is None else beta, device=device, rule=rule, seed=seed)

    def fresh_span(self, streams: torch.Tensor, index: int) -> Optional[torch.Tensor]:
        """The tokens of segment ``index`` of every stream with the ``mem_len`` before it and its last target:
        ``[B - R, mem_len + L + 1]``, or None when the segment starts within the first ``mem_len`` tokens."""
        start = index * self.tgt_len
        if start < self.mem_len:
            return None
        return streams[:, start - self.mem_len: start + self.tgt_len + 1]

    def rebuild_memory(self, model: TransformerXL, context: torch.Tensor) -> List[LayerMemory]:
        """The memory of replayed segments from their stored context: a window ``[R, mem_len]`` (no-grad forward,
        the model's mode as it is) or stored memories ``[R, n_layer, mem_len, d_model]``."""
        if self.context == "memory":
            return [LayerMemory(context[:, layer]) for layer in range(model.n_layer)]
        empty = model.empty_memory(context.shape[0], context.device)
        if self.mem_len == 0:
            return empty
        with torch.no_grad():
            _, memory = model.hidden_states(context, empty, top_layer=False)
        return memory

    def train_loss(self, model: TransformerXL, streams: torch.Tensor, index: int,
                   memory: Optional[List[LayerMemory]]) -> Tuple[torch.Tensor, torch.Tensor, List[LayerMemory]]:
        """One step on segment ``index`` of the ``B - R`` fresh ``streams`` (``[B - R, n]``) with their memory
        (None: empty) -> (the loss to back-propagate, the fresh segments' mean loss (detached, for the log), the
        fresh segments' next memory). Samples R segments when the fresh memory is full and the buffer holds any,
        updates their priorities, and stores the fresh segments once the memory is full."""
        if streams.dim() != 2 or streams.shape[0] != self.fresh:
            raise ValueError(f"streams must be [B - R = {self.fresh}, n] (the fresh streams), got {tuple(streams.shape)}")
        start, L, M = index * self.tgt_len, self.tgt_len, self.mem_len
        inputs, targets = streams[:, start: start + L], streams[:, start + 1: start + 1 + L]
        lengths = model.memory_lengths()  # an hourglass's levels and resampling states keep other lengths than M
        if self.context == "memory" and lengths != [M] * model.n_layer:
            raise ValueError(f"context='memory' stores one [n_layer, mem_len, d_model] memory per segment, which needs "
                             f"one entry of mem_len={M} rows per layer; this model's memory entries keep {lengths} "
                             f"rows: use context='window'")
        full = memory is not None and [m.hidden.shape[1] for m in memory] == lengths
        if memory is None:
            memory = model.empty_memory(inputs.shape[0], inputs.device)
        replaying = full and len(self.buffer) > 0 and self.replayed > 0
        if replaying:
            drawn = self.buffer.sample(self.replayed)
            span, context = drawn.examples if self.context == "memory" else (drawn.examples, drawn.examples[:, :M])
            span = span[:, -(L + 1):]
            rebuilt = self.rebuild_memory(model, context)
            inputs = torch.cat([inputs, span[:, :L]])
            targets = torch.cat([targets, span[:, 1:]])
            memory = [LayerMemory(torch.cat([m.hidden, r.hidden])) for m, r in zip(memory, rebuilt)]
        hidden, next_memory = model.hidden_states(inputs, memory)
        logits = model.logits(hidden)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none").view(targets.shape).mean(1)   # [B]: each segment's own loss
        n_fresh = streams.shape[0]
        if replaying:
            weights = torch.cat([losses.new_ones(n_fresh), drawn.weights.to(losses.dtype)])
            loss = (weights * losses).mean()
            if self.buffer.rule == "grad_norm":
                values = output_layer_grad_norms(hidden[n_fresh:], cross_entropy_logit_grads(logits[n_fresh:],
                                                                                             targets[n_fresh:]))
            else:
                values = losses[n_fresh:].detach()
            self.buffer.update(drawn.indices, values)
        else:
            loss = losses.mean()
        span = self.fresh_span(streams, index) if full else None
        if span is not None:
            if self.context == "memory":
                stored = torch.stack([m.hidden.detach()[:n_fresh] for m in memory], dim=1)
                self.buffer.add((span[:, -(L + 1):], stored), losses=losses[:n_fresh].detach())
            else:
                self.buffer.add(span, losses=losses[:n_fresh].detach())
        fresh_memory = [dataclasses.replace(m, hidden=m.hidden[:n_fresh]) for m in next_memory]
        return loss, losses[:n_fresh].detach().mean(), fresh_memory

    def state_dict(self):
        return self.buffer.state_dict()

    def load_state_dict(self, state) -> None:
        self.buffer.load_state_dict(state)


def replay_from_args(args, device) -> Optional[SegmentReplay]:
    """The example's :class:`SegmentReplay` from its flags (None without ``--replay-fraction``); raises
    ``SystemExit`` for flags replay does not combine with."""
    if not args.replay_fraction:
        return None
    if args.replay_segments or args.skip_retain_p:
        raise SystemExit("--replay-fraction does not combine with --replay-segments or --skip-retain-p")
    try:
        return SegmentReplay(batch_size=args.batch_size, fraction=args.replay_fraction,
                             capacity=args.replay_capacity, rule=args.priority, tgt_len=args.tgt_len,
                             mem_len=args.mem_len, device=device, steps=args.steps, alpha=args.replay_alpha,
                             seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"--replay-fraction: {exc}")


# -- the sample-efficiency comparison: python examples/char_lm_replay.py --help --------------------------------------

ARMS = {  # name: flags of train_char_lm.py; every arm trains on the same B - R = 6 fresh streams
    "no replay": ["--batch-size", "6"],
    "replay, loss": ["--batch-size", "8", "--replay-fraction", "0.25", "--priority", "loss"],
    "replay, loss difference": ["--batch-size", "8", "--replay-fraction", "0.25", "--priority", "loss_difference"],
    "replay, grad norm": ["--batch-size", "8", "--replay-fraction", "0.25", "--priority", "grad_norm"],
    "replay, uniform": ["--batch-size", "8", "--replay-fraction", "0.25", "--replay-alpha", "0"],
}


def compare(argv=None) -> None:
    """Trains every arm of ``ARMS`` for each seed (subprocesses, ``--jobs`` at a time, one thread each; a run whose
    folder holds a result is kept), then writes ``<out>/summary.json`` (validation bpc against fresh characters, test
    bpc) and the plot ``--plot``."""
    import argparse
    import json
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(description=compare.__doc__)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", default="examples/runs/replay_compare")
    p.add_argument("--plot", default="docs/replay_sample_efficiency.png")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for train_char_lm.py")
    opts = p.parse_args(argv)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_char_lm.py")
    runs = [(arm, seed) for seed in opts.seeds for arm in opts.arms]

    def folder(arm, seed):
        return os.path.join(opts.out, f"{arm.replace(', ', '-').replace(' ', '_')}-seed{seed}")

    def train(run):
        arm, seed = run
        if os.path.exists(os.path.join(folder(arm, seed), "result.json")):
            print(f"{arm} seed {seed}: done before, kept", flush=True)
            return
        cmd = [sys.executable, script, *ARMS[arm], "--steps", str(opts.steps), "--seed", str(seed),
               "--eval-every", str(opts.eval_every), "--out", folder(arm, seed), *opts.extra]
        env = dict(os.environ, OMP_NUM_THREADS="1") if opts.jobs > 1 else None
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print(f"{arm} seed {seed}: exit {result.returncode}", flush=True)
        if result.returncode:
            print(result.stdout[-2000:] + result.stderr[-2000:], flush=True)

    with ThreadPoolExecutor(opts.jobs) as pool:
        list(pool.map(train, runs))
    summary = []
    for arm, seed in runs:
        ckpt = torch.load(os.path.join(folder(arm, seed), "checkpoint.pt"), weights_only=False)
        with open(os.path.join(folder(arm, seed), "result.json")) as f:
            result = json.load(f)
        fresh = 6 * ckpt["args"]["tgt_len"]  # fresh characters per step
        summary.append(dict(arm=arm, seed=seed, valid=[(step * fresh, bpc) for step, bpc in ckpt["history"]["valid"]],
                            valid_bpc=result["valid_bpc"], test_bpc=result["test_bpc"]))
    with open(os.path.join(opts.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_comparison(summary, opts.plot)
    print(comparison_table(summary))


def comparison_table(summary) -> str:
    """Markdown: per arm, the final validation and test bpc of each seed and their mean."""
    lines = ["| arm | validation bpc per seed | mean | test bpc per seed | mean |", "|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in summary):
        rows = [r for r in summary if r["arm"] == arm]
        valid, test = [r["valid_bpc"] for r in rows], [r["test_bpc"] for r in rows]
        lines.append(f"| {arm} | {', '.join(f'{v:.3f}' for v in valid)} | {sum(valid) / len(valid):.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in test)} | {sum(test) / len(test):.3f} |")
    return "\n".join(lines)


def plot_comparison(summary, path: str) -> None:
    """Validation bpc against fresh training characters: one line per run, a colour per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for colour, arm in enumerate(dict.fromkeys(r["arm"] for r in summary)):
        runs = [dict(r["valid"]) for r in summary if r["arm"] == arm]
        chars = sorted(set.intersection(*(set(run) for run in runs)))
        values = [[run[c] for run in runs] for c in chars]
        x = [c / 1e3 for c in chars]
        ax.plot(x, [sum(v) / len(v) for v in values], color=f"C{colour}", marker=".",
                label=f"{arm} (mean of {len(runs)} seeds)")
        ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=f"C{colour}", alpha=0.15)
    ax.set_xlabel("fresh training characters (thousands)")
    ax.set_ylabel("validation bits per character")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("char-LM Transformer-XL, same fresh characters: replay (rho = 0.25) vs none\n"
                 "(band: min-max over the seeds)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    compare()
