"""Bench suite: prioritized example replay (SPEC §5) -- the buffer's sample + update, and replay's cost in a training
step of the char-LM Transformer-XL.

1. ``sample+update``: one step of a full buffer of capacity N (1e4, 1e5, 3e5, 1e6): ``sample(n)`` then
   ``update(indices, losses)`` of the n = 256 drawn slots, by ``sum_tree`` (branching 16), ``sum_tree_b2`` (the
   binary tree), ``cumsum`` (cumsum + searchsorted; the baseline of the speedup column) and ``torchrl`` (its
   ``PrioritizedReplayBuffer`` over a ``LazyTensorStorage``, C++ sum tree; a row with the reason where it does not
   install or load). The ``fwd+bwd ms`` column is the whole step; ``sample ms`` and ``update ms`` its parts. The
   suite prints the crossover: the smallest capacity from which the sum tree is faster than cumsum
   (``memtx_ops.replay.structures.SUM_TREE_FROM`` is set from it).
2. ``train step``: forward, backward and Adam of the example's model (4 layers, d_model 128, 4 heads, L = M = 128,
   vocabulary 96, full memory) on a batch of B = 8 segments: ``no_replay`` (8 fresh), ``replay_window`` (6 fresh +
   2 replayed, memory rebuilt from the stored window), ``replay_memory`` (6 + 2, the memory stored), each through
   ``examples/char_lm_replay.py``'s ``SegmentReplay.train_loss`` as the example runs it. ``overhead`` is the step's
   time over ``no_replay``'s, less 1: every row computes 8 segments, so it is replay's cost beyond the examples'
   own forward and backward -- the buffer's operations plus the rebuild of the replayed segments' memory.
   ``bytes/segment`` is what the buffer stores per segment.
3. the parts of that overhead, timed alone in the same rounds: ``buffer ops`` (sample 2, update 2, add 6 on the
   buffer of the window row) and ``memory rebuild`` (the no-grad forward over 2 windows of M tokens), with their
   share of the no-replay step.

Options: ``--batch`` (B of the train step), the first of ``--lengths`` (L = M), ``--backends`` (which candidates);
``opts.capacities`` and ``opts.draws`` (n) when set by a caller (the tests' smoke run).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from bench.harness import BENCH_ERRORS, describe_error, failure_row, time_interleaved
from memtx_ops.nn import TransformerXL
from memtx_ops.replay import PrioritizedReplay

NAME = "replay"
BASELINE = "cumsum"
SAMPLERS = ("sum_tree", "sum_tree_b2", "cumsum", "torchrl")
STEPS = ("no_replay", "replay_window", "replay_memory")


def default_config(device):
    return dict(capacities=[10**4, 10**5, 3 * 10**5, 10**6], draws=256, batch=8, fraction=0.25, length=128,
                n_layer=4, n_head=4, d_model=128, d_inner=512, vocab=96, replay_capacity=1024)


def example_module():
    """examples/char_lm_replay.py (the example's replay, measured as it runs), loaded from its file."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                        "char_lm_replay.py")
    spec = importlib.util.spec_from_file_location("char_lm_replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_buffer(structure, capacity, device, branching=16):
    """A buffer of ``capacity`` one-token examples, every slot filled and given a random priority."""
    buffer = PrioritizedReplay(capacity, structure=structure, branching=branching, device=device, seed=0)
    buffer.add(torch.zeros(capacity, 1, dtype=torch.long, device=device))
    buffer.update(torch.arange(capacity, device=device), torch.rand(capacity, device=device) * 5)
    return buffer


def buffer_measures(buffer, n, device):
    """Measures of one step of ``buffer``: the whole step, the sample alone, the update after an untimed sample."""
    losses = torch.rand(n, device=device) * 5

    def step():
        draw = buffer.sample(n)
        buffer.update(draw.indices, losses)

    def update(draw):
        buffer.update(draw.indices, losses)

    return {"fwd_bwd_ms": step, "sample_ms": lambda: buffer.sample(n), "update_ms": (lambda: buffer.sample(n), update)}


def torchrl_measures(capacity, n, device):
    """The same step by torchrl's PrioritizedReplayBuffer -> (measures, None) or (None, why it cannot run)."""
    try:
        import torchrl
        from torchrl.data import LazyTensorStorage, PrioritizedReplayBuffer
    except ImportError as exc:
        return None, (f"torchrl is not importable here ({describe_error(exc)}); pip install --no-deps torchrl "
                      "tensordict (and their pure-Python needs) matching the installed torch")
    try:
        rb = PrioritizedReplayBuffer(alpha=0.6, beta=0.4, storage=LazyTensorStorage(capacity, device=device))
        rb.extend(torch.zeros(capacity, 1, device=device))
        rb.update_priority(torch.arange(capacity), torch.rand(capacity) * 5)
    except BENCH_ERRORS as exc:
        return None, f"torchrl {torchrl.__version__}: {describe_error(exc)}"
    losses = torch.rand(n, device=device) * 5

    def step():
        _, info = rb.sample(n, return_info=True)
        rb.update_priority(info["index"], losses)

    return {"fwd_bwd_ms": step, "sample_ms": lambda: rb.sample(n, return_info=True),
            "update_ms": (lambda: rb.sample(n, return_info=True)[1]["index"],
                          lambda index: rb.update_priority(index, losses))}, None


def sampler_rows(opts, cfg, device):
    rows, crossover = [], None
    n = getattr(opts, "draws", None) or cfg["draws"]
    labels = [s for s in SAMPLERS if opts.backends is None or s in opts.backends]
    for capacity in getattr(opts, "capacities", None) or cfg["capacities"]:
        case = f"sample+update N={capacity:.0e} n={n}"
        candidates, reasons = {}, {}
        for label in labels:
            if label == "torchrl":
                measures, reason = torchrl_measures(capacity, n, device)
                if measures is None:
                    reasons[label] = reason
                else:
                    candidates[label] = measures
            else:
                structure, branching = ("cumsum", 16) if label == "cumsum" else ("sum_tree", 2 if label.endswith("b2")
                                                                                 else 16)
                candidates[label] = buffer_measures(full_buffer(structure, capacity, device, branching), n, device)
        timings, failed = time_interleaved(candidates, device, opts.repeats, seed=capacity % 1000)
        reasons.update(failed)
        for label in labels:
            if label not in timings:
                rows.append(failure_row(NAME, case, label, "float64", reasons.get(label, "not available")))
                continue
            t = timings[label]
            row = dict(op=NAME, case=case, backend=label, dtype="float64", **t["fwd_bwd_ms"].fields("fwd_bwd_ms"))
            row["extra"] = {"sample ms": _ms(t["sample_ms"]), "update ms": _ms(t["update_ms"])}
            rows.append(row)
            print(f"  {case} {label}: {row['fwd_bwd_ms']:.3f} ms per step", flush=True)
        if crossover is None and {"sum_tree", "cumsum"} <= set(timings) and \
                timings["sum_tree"]["fwd_bwd_ms"].median < timings["cumsum"]["fwd_bwd_ms"].median:
            crossover = capacity
        del candidates
    print(f"  crossover: the sum tree is faster than cumsum from capacity {crossover} on "
          f"(memtx_ops.replay.structures.SUM_TREE_FROM[{device.type!r}])" if crossover else
          "  crossover: cumsum was faster at every capacity measured", flush=True)
    return rows


def _ms(timing) -> str:
    return f"{1e3 * timing.median:.3f} ({1e3 * timing.low:.3f}-{1e3 * timing.high:.3f})"


def fill_buffer(replay, cfg, L, device):
    """Fills the replay buffer with random segments (and memories), priorities spread as training leaves them."""
    capacity = replay.buffer.capacity
    if replay.context == "memory":
        examples = (torch.randint(0, cfg["vocab"], (capacity, L + 1), device=device),
                    torch.randn(capacity, cfg["n_layer"], L, cfg["d_model"], device=device))
    else:
        examples = torch.randint(0, cfg["vocab"], (capacity, 2 * L + 1), device=device)
    replay.buffer.add(examples)
    replay.buffer.update(torch.arange(capacity, device=device), torch.rand(capacity, device=device) * 5)


def train_step_rows(opts, cfg, device):
    """Rows 2 and 3 of the module's text."""
    module = example_module()
    B = opts.batch or cfg["batch"]
    L = (opts.lengths or [cfg["length"]])[0]
    R = module.replayed_count(cfg["fraction"], B)
    fresh = B - R
    streams = torch.randint(0, cfg["vocab"], (B, 4 * L + 1), device=device)  # the first B - R rows are the fresh ones

    def model_and_optimizer():
        torch.manual_seed(0)
        model = TransformerXL(cfg["vocab"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], d_model=cfg["d_model"],
                              d_head=cfg["d_model"] // cfg["n_head"], d_inner=cfg["d_inner"], dropout=0.1,
                              mem_len=L).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-4)

    def full_memory(model, rows):
        with torch.no_grad():
            return model(streams[:rows, :L], None)[1]  # the memory after segment 0

    steps, replays = {}, {}
    for label in [s for s in STEPS if opts.backends is None or s in opts.backends]:
        model, optimizer = model_and_optimizer()
        if label == "no_replay":
            memory = full_memory(model, B)

            def loss_of(model=model, memory=memory):
                return model(streams[:, L:2 * L], memory, streams[:, L + 1:2 * L + 1])[0]
        else:
            replay = module.SegmentReplay(batch_size=B, fraction=cfg["fraction"], capacity=cfg["replay_capacity"],
                                          rule="loss", tgt_len=L, mem_len=L, device=device, steps=10**6,
                                          context=label[len("replay_"):], seed=0)
            memory = full_memory(model, fresh)
            fill_buffer(replay, cfg, L, device)
            replays[label] = (replay, model)

            def loss_of(model=model, memory=memory, replay=replay):
                return replay.train_loss(model, streams[:fresh], 1, memory)[0]

        def step(model=model, optimizer=optimizer, loss_of=loss_of):
            optimizer.zero_grad(set_to_none=True)
            loss_of().backward()
            optimizer.step()

        step()  # the optimiser's state
        steps[label] = {"fwd_bwd_ms": step}
    parts = {}
    if "replay_window" in replays:
        replay, model = replays["replay_window"]
        values = torch.rand(R, device=device)
        spans = torch.randint(0, cfg["vocab"], (fresh, 2 * L + 1), device=device)

        def buffer_ops():
            draw = replay.buffer.sample(R)
            replay.buffer.update(draw.indices, values)
            replay.buffer.add(spans, losses=values[:1].expand(fresh))

        windows = streams[:R, :L]
        parts = {"buffer ops": {"fwd_bwd_ms": buffer_ops},
                 "memory rebuild": {"fwd_bwd_ms": lambda: replay.rebuild_memory(model, windows)}}
    timings, failed = time_interleaved({**steps, **parts}, device, opts.repeats, seed=1)
    case = (f"train step B={B} ({fresh} fresh + {R} replayed) L=M={L} layers={cfg['n_layer']} d={cfg['d_model']} "
            f"V={cfg['vocab']}")
    stored = {"no_replay": "-", "replay_window": f"{(2 * L + 1) * 8}",
              "replay_memory": f"{(L + 1) * 8 + cfg['n_layer'] * L * cfg['d_model'] * 4}"}
    base = timings.get("no_replay", {}).get("fwd_bwd_ms")
    rows = []
    for label in list(steps) + list(parts):
        row_case = case if label in steps else f"{label} of the replay_window step ({R} replayed)"
        backend = label if label in steps else "replay_window"
        if label not in timings:
            rows.append(failure_row(NAME, row_case, backend, "float32", failed.get(label, "not available")))
            continue
        t = timings[label]["fwd_bwd_ms"]
        row = dict(op=NAME, case=row_case, backend=backend, dtype="float32", **t.fields("fwd_bwd_ms"), extra={})
        if base is not None:
            share = t.median / base.median - (1 if label in steps else 0)
            row["extra"]["overhead vs no_replay" if label in steps else "share of the no_replay step"] = \
                f"{100 * share:+.1f}%" if label in steps else f"{100 * share:.1f}%"
        if label in stored:
            row["extra"]["bytes/segment"] = stored[label]
        rows.append(row)
        print(f"  {row_case} {backend}: {row['fwd_bwd_ms']:.1f} ms {row['extra']}", flush=True)
    return rows


def run(opts):
    device = opts.device
    cfg = default_config(device)
    return sampler_rows(opts, cfg, device) + train_step_rows(opts, cfg, device)
