"""The trade-off the hourglass papers report, measured here: train the char-LM example with the flat Transformer-XL and
with the hourglass for the same steps and characters, and compare validation bpc with peak memory and tokens/s.

    python examples/hourglass_tradeoff.py --steps 2000 --eval-every 200 --threads 1 --out /tmp/tradeoff  # README's run
    python examples/hourglass_tradeoff.py --steps 4 --tiny --out /tmp/tradeoff            # a smoke test

Each model trains in its own process (``examples/train_char_lm.py``, same data, batch, segment and memory lengths,
seed and schedule; the flat model has as many layers as the hourglass). Collected per model: validation bpc (final
and curve), test bpc, training tokens/s (steps only, evaluation excluded), the peak tensor memory of one training
step (``bench.harness.peak_memory``, above the model, its optimiser state and the memory carried in) and the training
process's peak resident set, and the other processes' CPU use during the run (tokens/s on a busy machine is not
comparable; bpc and memory are). Writes ``<out>/tradeoff.json``, ``<out>/tradeoff.md`` (the table) and
``<out>/tradeoff.png`` (the plot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench.harness, when run from anywhere

from bench.harness import MachineLoad, peak_memory  # noqa: E402
from memtx_ops.nn import HourglassTransformerXL, TransformerXL  # noqa: E402

TRAIN = os.path.join(ROOT, "examples", "train_char_lm.py")
# Runs the training script in this child process and then prints its peak resident set (Linux: KiB).
CHILD = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
         "print('max_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
TINY = dict(batch_size=2, tgt_len=96, mem_len=96, n_head=2, d_model=16, d_inner=32, eval_chars=300)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--layout", default="2@1 4@3 2@1", help="the hourglass; the flat model gets as many layers")
    p.add_argument("--more-layouts", nargs="*", default=[],
                   help='further hourglasses, e.g. "2@1 8@3 2@1" (deeper, about the flat model\'s memory)')
    p.add_argument("--reuse", action="store_true",
                   help="keep the result of a model whose run folder holds one of exactly the same command")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tgt-len", type=int, default=120, help="segment length (a multiple of the largest factor)")
    p.add_argument("--mem-len", type=int, default=120)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-inner", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-chars", type=int, default=20000)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each training process (OMP_NUM_THREADS; default: torch's). On a shared "
                        "machine 1 thread avoids the OpenMP barriers' waits for a busy core")
    p.add_argument("--tiny", action="store_true", help="a tiny model and data (smoke test)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "hourglass_tradeoff"))
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.eval_every = max(1, args.steps // 2)
    return args


def depth(layout: str) -> int:
    return sum(int(group.split("@")[0]) for group in layout.split())


def candidates(args):
    """{name: extra arguments of train_char_lm}: the flat model and the hourglass of the same depth, then the
    further hourglasses."""
    n = depth(args.layout)
    return {f"flat {n}@1": ["--n-layer", str(n)],
            **{f"hourglass {layout}": ["--layout", layout] for layout in [args.layout, *args.more_layouts]}}


def common_arguments(args):
    return ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--tgt-len", str(args.tgt_len),
            "--mem-len", str(args.mem_len), "--n-head", str(args.n_head), "--d-model", str(args.d_model),
            "--d-inner", str(args.d_inner), "--eval-every", str(args.eval_every), "--eval-chars", str(args.eval_chars),
            "--device", "cpu"]


def step_peak_bytes(args, extra) -> int:
    """Peak tensor bytes of one training step (forward, backward, Adam) with a full memory, above the model, its
    optimiser state and the memory: the bench's measure (``bench.harness.peak_memory``), vocabulary of 256."""
    torch.manual_seed(0)
    shape = dict(n_head=args.n_head, d_model=args.d_model, d_head=args.d_model // args.n_head, d_inner=args.d_inner,
                 dropout=0.1, mem_len=args.mem_len)
    model = (HourglassTransformerXL(256, layout=extra[1], **shape) if extra[0] == "--layout"
             else TransformerXL(256, n_layer=int(extra[1]), **shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (args.batch_size, args.tgt_len + 1))
    with torch.no_grad():
        _, memory = model(tokens[:, :-1])

    def step():
        loss, _ = model(tokens[:, :-1], memory, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # the optimiser state
    return peak_memory(step, torch.device("cpu"))


def train(args, name, extra):
    """Trains one model (or, with --reuse, reads its row back) -> its row of the table."""
    out = os.path.join(args.out, name.replace(" ", "_"))
    cmd = [sys.executable, "-c", CHILD, TRAIN, *common_arguments(args), *extra, "--out", out]
    row_path = os.path.join(out, "row.json")
    if args.reuse and os.path.isfile(row_path):
        saved = json.load(open(row_path))
        if saved["command"] == cmd[3:] and saved["threads"] == args.threads:
            print(f"[{name}] reused {row_path}", flush=True)
            return saved["row"]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    with MachineLoad() as load:
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.load(open(os.path.join(out, "result.json")))
    history = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["history"]
    rss_kib = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("max_rss_kib"))
    row = dict(model=name, valid_bpc=summary["valid_bpc"], test_bpc=summary["test_bpc"],
               tokens_per_s=summary["train_tokens_per_s"], parameters=summary["parameters"],
               step_peak_mib=step_peak_bytes(args, extra) / 2**20, max_rss_mib=rss_kib / 1024,
               valid_curve=history["valid"], load=load.summary())
    with open(row_path, "w") as f:
        json.dump(dict(command=cmd[3:], threads=args.threads, row=row), f, indent=1)
    return row


def table(rows, args) -> str:
    base = rows[0]
    threads = f"{args.threads} thread(s)" if args.threads else f"torch's default threads ({torch.get_num_threads()})"
    lines = [f"Char-LM (`examples/train_char_lm.py`), {args.steps} steps of batch {args.batch_size} x segment "
             f"{args.tgt_len} (memory {args.mem_len}, d_model {args.d_model}, {args.n_head} heads, d_inner "
             f"{args.d_inner}): {args.steps * args.batch_size * args.tgt_len} training characters for each model, "
             f"{threads} per training process.", "",
             "| model | parameters | valid bpc | test bpc | tokens/s (training) | peak tensor MiB per step | "
             "peak resident MiB | other processes (cores) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        busy = " (busy machine)" if r["load"]["busy"] else ""
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['valid_bpc']:.3f} | {r['test_bpc']:.3f} | "
            f"{r['tokens_per_s']:.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x){busy} | "
            f"{r['step_peak_mib']:.1f} ({r['step_peak_mib'] / base['step_peak_mib']:.2f}x) | "
            f"{r['max_rss_mib']:.0f} | {r['load']['foreign_cores']} |")
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, trade) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        steps, bpc = zip(*r["valid_curve"])
        curves.plot(steps, bpc, marker="o", label=r["model"])
        trade.scatter(r["step_peak_mib"], r["valid_bpc"], s=60)
        trade.annotate(f"{r['model']}\n{r['tokens_per_s']:.0f} tokens/s", (r["step_peak_mib"], r["valid_bpc"]),
                       textcoords="offset points", xytext=(6, 4), fontsize=8)
    curves.set(xlabel="step", ylabel="validation bits per character", title="validation bpc, same steps and data")
    curves.grid(alpha=0.3)
    curves.legend()
    trade.set(xlabel="peak tensor memory of a training step (MiB)", ylabel="final validation bpc",
              title="bpc against memory (and tokens/s)")
    trade.grid(alpha=0.3)
    trade.margins(0.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = [train(args, name, extra) for name, extra in candidates(args).items()]
    with open(os.path.join(args.out, "tradeoff.json"), "w") as f:
        json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    text = table(rows, args)
    with open(os.path.join(args.out, "tradeoff.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.out, "tradeoff.png"))
    print(text)


if __name__ == "__main__":
    main()
