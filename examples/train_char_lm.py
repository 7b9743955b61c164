"""Train a character-level Transformer-XL on the fused memtx_ops kernels.

Corpus: the Python documentation topics that ship with every CPython (``pydoc_data.topics``: the language
reference and library topics, about 465k characters of English prose and code), licensed under the
Python Software Foundation License Version 2. No download is needed.

    python examples/train_char_lm.py --steps 600                 # CPU by default, a GPU when present
    python examples/train_char_lm.py --resume --steps 1200       # continue from the checkpoint
    python examples/train_char_lm.py --cross-head-p 0.1 --skip-retain-p 0.5 --finetune-at 400
    python examples/train_char_lm.py --replay-segments 4         # gradient through 4 segments of memory
    python examples/train_char_lm.py --layout "2@1 4@3 2@1" --tgt-len 120 --mem-len 120   # hourglass model

Prints a progress bar, evaluates bits per character on the validation split every ``--eval-every`` steps,
saves a checkpoint there and at ``--stop-at`` (model, optimiser, schedule, step, data position, memory, every
random-number state, loss history) and, at the end, the test bpc and a plot of the loss curve. ``--resume``
continues exactly where the checkpoint stopped: the same data, dropout masks, cross-head and skip-retain draws,
so the loss curve is that of a run that was never stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

from memtx_ops.nn import HourglassTransformerXL, LayerMemory, TransformerXL


def load_corpus():
    """The text and its character vocabulary: (train, valid, test) int64 tensors and the vocabulary."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = data.numel()
    return data[: int(0.9 * n)], data[int(0.9 * n): int(0.95 * n)], data[int(0.95 * n):], vocab


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cuts ``data`` into ``batch_size`` contiguous streams: ``[batch_size, n // batch_size]``."""
    n = data.numel() // batch_size
    return data[: n * batch_size].view(batch_size, n)


def segments(streams: torch.Tensor, length: int):
    """Yields (inputs, targets) ``[B, length]`` pairs walking the streams in order."""
    for index in range(segment_count(streams, length)):
        yield segment(streams, length, index)


def segment_count(streams: torch.Tensor, length: int) -> int:
    """How many whole segments (inputs and their next-character targets) the streams hold."""
    return (streams.shape[1] - 1) // length


def segment(streams: torch.Tensor, length: int, index: int):
    """Segment ``index`` of the streams: (inputs, targets) ``[B, length]``."""
    start = index * length
    return streams[:, start: start + length], streams[:, start + 1: start + 1 + length]


@torch.no_grad()
def evaluate(model: TransformerXL, streams: torch.Tensor, length: int) -> float:
    """Bits per character over the streams, memory carried across segments."""
    model.eval()
    memory, total, count = None, 0.0, 0
    for inputs, targets in segments(streams, length):
        loss, memory = model(inputs, memory, targets)
        total += loss.item() * targets.numel()
        count += targets.numel()
    model.train()
    return total / count / math.log(2)


def progress(step: int, total: int, loss: float, rate: float) -> None:
    width = 30
    done = int(width * step / total)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
                     f"({loss / math.log(2):.3f} bpc) {rate:.0f} tok/s")
    sys.stdout.flush()


def plot_history(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history["train"])
    ax.plot(steps, [l / math.log(2) for l in losses], label="train (running mean)", alpha=0.8)
    if history["valid"]:
        vs, vb = zip(*history["valid"])
        ax.plot(vs, vb, marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tgt-len", type=int, default=128, help="segment length L")
    p.add_argument("--mem-len", type=int, default=128, help="memory length M")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-inner", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cross-head-p", type=float, default=0.0, help="cross-head permutation probability")
    p.add_argument("--skip-retain-p", type=float, default=0.0, help="skip-retain slope (0: off)")
    p.add_argument("--finetune-at", type=int, default=None, help="step at which skip-retain stops (phase 2)")
    p.add_argument("--replay-segments", type=int, default=0,
                   help="T > 0: each step back-propagates through T segments of memory (memory replay)")
    p.add_argument("--layout", default=None,
                   help='hourglass layout, e.g. "2@1 4@3 2@1" (HourglassTransformerXL; replaces --n-layer; segment and '
                        'memory lengths must be multiples of the largest factor)')
    p.add_argument("--upsample", choices=("repeat", "linear"), default=None, help="hourglass upsampling (repeat)")
    p.add_argument("--downsample", choices=("mean", "weighted"), default=None, help="hourglass shortening (mean)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-chars", type=int, default=20000, help="validation characters per evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="examples/runs/char_lm")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step with a checkpoint (the schedule still plans --steps); --resume goes on")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# Arguments that define the run: a resumed run must have the checkpoint's.
RUN_ARGS = ("batch_size", "tgt_len", "mem_len", "n_layer", "n_head", "d_model", "d_inner", "dropout", "lr",
            "cross_head_p", "skip_retain_p", "finetune_at", "replay_segments", "seed", "layout", "upsample",
            "downsample")


def random_states(model: TransformerXL) -> dict:
    """Every random-number state the run draws from: torch's CPU and CUDA generators and the model's own."""
    return {"cpu": torch.get_rng_state(), "model": model.random_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_random_states(model: TransformerXL, states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    model.set_random_state(states["model"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, schedule, state, args) -> None:
    """Writes everything the run needs to go on exactly: a temporary file first, then renamed."""
    payload = dict(state, model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                   rng=random_states(model), args=vars(args))
    payload["memory"] = None if state["memory"] is None else [
        dict(hidden=m.hidden, age=m.age, mem_offset=m.mem_offset) for m in state["memory"]]
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model, optimizer, schedule, args, device):
    """Restores a checkpoint of save_checkpoint -> (the training state: step, data position, memory, history...;
    the learning-rate schedule)."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    changed = {k: (ckpt["args"].get(k), getattr(args, k)) for k in RUN_ARGS if ckpt["args"].get(k) != getattr(args, k)}
    if changed:
        raise SystemExit(f"--resume: {path} was written with other settings (checkpoint, now): {changed}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["args"]["steps"] == args.steps:
        schedule.load_state_dict(ckpt["schedule"])
    else:  # a longer (or shorter) run: the schedule is planned anew from here
        print(f"--resume: the learning-rate schedule is re-planned for --steps {args.steps} (the checkpoint planned "
              f"{ckpt['args']['steps']}), so the run differs from one that planned {args.steps} from the start")
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05,
                                                       last_epoch=ckpt["step"] - 1)
    set_random_states(model, ckpt["rng"])
    memory = None if ckpt["memory"] is None else [LayerMemory(**m) for m in ckpt["memory"]]
    return dict(step=ckpt["step"], position=ckpt["position"], memory=memory, running=ckpt["running"],
                history=ckpt["history"]), schedule


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, valid, test, vocab = load_corpus()
    train_streams = batchify(train, args.batch_size).to(device)
    valid_streams = batchify(valid[: args.eval_chars], 1).to(device)
    test_streams = batchify(test, 1).to(device)
    shape = dict(n_head=args.n_head, d_model=args.d_model, d_head=args.d_model // args.n_head, d_inner=args.d_inner,
                 dropout=args.dropout, mem_len=args.mem_len, cross_head_p=args.cross_head_p,
                 skip_retain_p=args.skip_retain_p)
    if args.layout:
        model = HourglassTransformerXL(len(vocab), layout=args.layout, downsample=args.downsample or "mean",
                                       upsample=args.upsample or "repeat", **shape).to(device)
    else:
        model = TransformerXL(len(vocab), n_layer=args.n_layer, **shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = dict(step=0, position=0, memory=None, running=None, history={"train": [], "valid": []})
    if args.resume:
        state, schedule = load_checkpoint(ckpt_path, model, optimizer, schedule, args, device)
        print(f"resumed from {ckpt_path} at step {state['step']}")
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.2f}M parameters, vocab {len(vocab)}, "
          f"{train.numel()} training characters, device {device}")

    per_step = max(args.replay_segments, 1)
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    history, tokens, start, train_seconds = state["history"], 0, time.perf_counter(), 0.0
    while state["step"] < stop:
        if state["position"] + per_step > segment_count(train_streams, args.tgt_len):
            state.update(position=0, memory=None)  # next epoch: the streams again, from an empty memory
        chunk = [segment(train_streams, args.tgt_len, state["position"] + i) for i in range(per_step)]
        step_start = time.perf_counter()
        state["position"] += per_step
        step = state["step"]
        if args.finetune_at is not None and step >= args.finetune_at:
            model.set_phase("finetune")
        optimizer.zero_grad(set_to_none=True)
        if args.replay_segments:
            losses, memory = model.replay_segments([c[0] for c in chunk], [c[1] for c in chunk], state["memory"])
            loss = sum(losses) / len(losses)
            memory = [dataclasses.replace(m, hidden=m.hidden.detach()) for m in memory]  # truncate here
        else:
            loss, memory = model(chunk[0][0], state["memory"], chunk[0][1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - step_start
        step = state["step"] = step + 1
        state["memory"] = memory
        tokens += sum(c[1].numel() for c in chunk)
        running = state["running"]
        state["running"] = running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        history["train"].append((step, running))
        progress(step, args.steps, running, tokens / (time.perf_counter() - start))
        if step % args.eval_every == 0 or step == args.steps:
            bpc = evaluate(model, valid_streams, args.tgt_len)
            history["valid"].append((step, bpc))
            print(f"\nstep {step}: validation {bpc:.3f} bpc")
        if step % args.eval_every == 0 or step == stop:
            save_checkpoint(ckpt_path, model, optimizer, schedule, state, args)
    if state["step"] < args.steps:
        print(f"\nstopped at step {state['step']} of {args.steps}: {ckpt_path}; go on with --resume")
        return

    test_bpc = evaluate(model, test_streams, args.tgt_len)
    print(f"test {test_bpc:.3f} bpc")
    plot_history(history, os.path.join(args.out, "loss.png"))
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"steps": state["step"], "valid_bpc": history["valid"][-1][1], "test_bpc": test_bpc,
                   "train_tokens_per_s": tokens / max(train_seconds, 1e-9), "parameters": parameters,
                   "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
