"""Train a character-level Transformer-XL on the fused memtx_ops kernels.

Corpus: the Python documentation topics that ship with every CPython (``pydoc_data.topics``: the language
reference and library topics, about 465k characters of English prose and code), licensed under the
Python Software Foundation License Version 2. No download is needed.

    python examples/train_char_lm.py --steps 600                 # CPU by default, a GPU when present
    python examples/train_char_lm.py --resume --steps 1200       # continue from the checkpoint
    python examples/train_char_lm.py --cross-head-p 0.1 --skip-retain-p 0.5 --finetune-at 400
    python examples/train_char_lm.py --replay-segments 4         # gradient through 4 segments of memory

Prints a progress bar, evaluates bits per character on the validation split every ``--eval-every`` steps,
saves a checkpoint there (model, optimiser, step, RNG states, loss history) and, at the end, the test bpc
and a plot of the loss curve.
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

from memtx_ops.nn import TransformerXL


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
    for start in range(0, streams.shape[1] - 1 - length + 1, length):
        yield streams[:, start: start + length], streams[:, start + 1: start + 1 + length]


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
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-chars", type=int, default=20000, help="validation characters per evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="examples/runs/char_lm")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, valid, test, vocab = load_corpus()
    train_streams = batchify(train, args.batch_size).to(device)
    valid_streams = batchify(valid[: args.eval_chars], 1).to(device)
    test_streams = batchify(test, 1).to(device)
    model = TransformerXL(len(vocab), n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                          d_head=args.d_model // args.n_head, d_inner=args.d_inner, dropout=args.dropout,
                          mem_len=args.mem_len, cross_head_p=args.cross_head_p,
                          skip_retain_p=args.skip_retain_p).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    history = {"train": [], "valid": []}
    step = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05,
                                                       last_epoch=ckpt["step"] - 1)
        step, history = ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path} at step {step}")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(vocab)}, "
          f"{train.numel()} training characters, device {device}")

    batches = segments(train_streams, args.tgt_len)
    per_step = max(args.replay_segments, 1)
    memory, running, tokens, start = None, None, 0, time.perf_counter()
    while step < args.steps:
        chunk = [pair for _, pair in zip(range(per_step), batches)]
        if len(chunk) < per_step:  # next epoch: restart the streams with an empty memory
            batches, memory = segments(train_streams, args.tgt_len), None
            continue
        if args.finetune_at is not None and step == args.finetune_at:
            model.set_phase("finetune")
        optimizer.zero_grad(set_to_none=True)
        if args.replay_segments:
            losses, memory = model.replay_segments([c[0] for c in chunk], [c[1] for c in chunk], memory)
            loss = sum(losses) / len(losses)
            memory = [dataclasses.replace(m, hidden=m.hidden.detach()) for m in memory]  # truncate here
        else:
            loss, memory = model(chunk[0][0], memory, chunk[0][1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        schedule.step()
        step += 1
        tokens += sum(c[1].numel() for c in chunk)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        history["train"].append((step, running))
        progress(step, args.steps, running, tokens / (time.perf_counter() - start))
        if step % args.eval_every == 0 or step == args.steps:
            bpc = evaluate(model, valid_streams, args.tgt_len)
            history["valid"].append((step, bpc))
            print(f"\nstep {step}: validation {bpc:.3f} bpc")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "history": history, "rng": torch.get_rng_state(), "args": vars(args)}, ckpt_path)

    test_bpc = evaluate(model, test_streams, args.tgt_len)
    print(f"test {test_bpc:.3f} bpc")
    plot_history(history, os.path.join(args.out, "loss.png"))
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"steps": step, "valid_bpc": history["valid"][-1][1], "test_bpc": test_bpc, "args": vars(args)},
                  f, indent=1)


if __name__ == "__main__":
    main()
