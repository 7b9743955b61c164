"""Train a character-level Transformer-XL on the fused memtx_ops kernels.

Corpus: the Python documentation topics that ship with every CPython (``pydoc_data.topics``: the language
reference and library topics, about 465k characters of English prose and code), licensed under the
Python Software Foundation License Version 2. No download is needed.

    python examples/train_char_lm.py --steps 600                 # CPU by default, a GPU when present
    python examples/train_char_lm.py --resume --steps 1200       # continue from the checkpoint
    python examples/train_char_lm.py --cross-head-p 0.1 --skip-retain-p 0.5 --finetune-at 400
    python examples/train_char_lm.py --replay-segments 4         # gradient through 4 segments of memory
    python examples/train_char_lm.py --replay-fraction 0.25      # a quarter of each batch replayed by priority
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

from memtx_ops.nn import HourglassTransformerXL, LayerMemory, SegmentRollout, TransformerXL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from char_lm_replay import replay_from_args  # noqa: E402  (prioritized segment replay, beside this file)


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
    """Bits per character over the streams, memory carried across segments (with the model's attention span);
    every layer keeps its memory's projected keys and values across the segments (``kv_caches``)."""
    was_training = model.training
    model.eval()
    memory, total, count, caches = None, 0.0, 0, model.new_kv_caches()
    for inputs, targets in segments(streams, length):
        loss, memory = model(inputs, memory, targets, kv_caches=caches)
        total += loss.item() * targets.numel()
        count += targets.numel()
    model.train(was_training)
    if not count:
        raise SystemExit(f"evaluation needs more characters than one segment ({length}), got {streams.shape[1]}")
    return total / count / math.log(2)


class Progress:
    """The training progress bar: tqdm when it is installed (an optional dependency of the examples) and
    ``kind`` is "auto" or "tqdm", else one plain line rewritten in place."""

    def __init__(self, total: int, initial: int, kind: str = "auto"):
        self.total, self.bar, self.silent = total, None, kind == "off"  # "off": ranks other than 0
        if kind not in ("plain", "off"):
            try:
                from tqdm import tqdm
            except ImportError:
                if kind == "tqdm":
                    raise SystemExit("--progress tqdm: tqdm is not installed (`pip install tqdm`)")
            else:
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.3f} ({loss / math.log(2):.3f} bpc) {rate:.0f} tok/s", refresh=False)
            return
        width = 30
        done = int(width * step / self.total)
        sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.3f} "
                         f"({loss / math.log(2):.3f} bpc) {rate:.0f} tok/s")
        sys.stdout.flush()

    def write(self, text: str) -> None:
        """A line of its own above the bar."""
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print("\n" + text if text else text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.silent:
            print(flush=True)


def plot_history(history, path: str) -> None:
    """The loss curve as a PNG at ``path``; without matplotlib (a development dependency, not the package's) a
    line says so."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path} (pip install matplotlib)")
        return

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
    p.add_argument("--replay-fraction", type=float, default=0.0,
                   help="rho > 0: that fraction of each batch is replayed by priority (examples/char_lm_replay.py)")
    p.add_argument("--replay-capacity", type=int, default=10000, help="segments the replay buffer keeps")
    p.add_argument("--priority", choices=("loss", "loss_difference", "grad_norm"), default="loss",
                   help="replay priority rule")
    p.add_argument("--replay-alpha", type=float, default=0.6, help="replay priority exponent (0: uniform replay)")
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
    p.add_argument("--progress", choices=("auto", "tqdm", "plain"), default="auto",
                   help="progress bar: tqdm when installed (auto), or a plain line")
    g = p.add_argument_group("evaluation and sampling from <out>/checkpoint.pt (the model's settings come from it)")
    g.add_argument("--eval-only", action="store_true",
                   help="test bpc with the training settings and with the evaluation settings below, and tokens/s")
    g.add_argument("--eval-tgt-len", type=int, default=None, help="evaluation segment (default: the training one)")
    g.add_argument("--eval-mem-len", type=int, default=None, help="evaluation memory (default: 4x the training one)")
    g.add_argument("--eval-clamp-len", type=int, default=None,
                   help="distances past this share its embedding (default: the longest seen in training, "
                        "tgt_len + mem_len - 1)")
    g.add_argument("--sample", type=int, default=0, metavar="N", help="print N characters generated after --prompt")
    g.add_argument("--prompt", default="def ", help="text to continue with --sample")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=0.95)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Exits with the usage and a message naming the flag (argparse's error) for values out of range."""
    at_least = {"steps": 1, "batch_size": 1, "tgt_len": 1, "mem_len": 0, "n_layer": 1, "n_head": 1, "d_model": 1,
                "d_inner": 1, "eval_every": 1, "eval_chars": 0, "replay_segments": 0, "replay_capacity": 1,
                "sample": 0, "stop_at": 1, "finetune_at": 0, "top_k": 1, "eval_tgt_len": 1, "eval_mem_len": 0}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    within = {"dropout": (0, 1, False), "cross_head_p": (0, 1, True), "skip_retain_p": (0, 1, True),
              "replay_fraction": (0, 1, False)}
    for name, (low, high, closed) in within.items():
        value = getattr(args, name)
        if not (low <= value <= high if closed else low <= value < high):
            parser.error(f"--{name.replace('_', '-')} must lie in [{low}, {high}{']' if closed else ')'}, got {value}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    for name in ("lr", "replay_alpha", "temperature"):
        value = getattr(args, name)
        if not (0 < value < math.inf if name == "lr" else 0 <= value < math.inf):
            parser.error(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, "
                         f"got {value}")
    if args.eval_chars and args.eval_chars <= args.tgt_len:
        parser.error(f"--eval-chars must be 0 (the whole split) or more than --tgt-len ({args.tgt_len}), "
                     f"got {args.eval_chars}")
    if args.replay_segments and args.skip_retain_p:
        parser.error("--replay-segments does not combine with --skip-retain-p: skip-retain's pre-training changes the "
                     "memory's structure between the segments a rollout back-propagates through")


# Arguments that define the run: a resumed run must have the checkpoint's.
RUN_ARGS = ("batch_size", "tgt_len", "mem_len", "n_layer", "n_head", "d_model", "d_inner", "dropout", "lr",
            "cross_head_p", "skip_retain_p", "finetune_at", "replay_segments", "replay_fraction", "replay_capacity",
            "priority", "replay_alpha", "seed", "layout", "upsample", "downsample")


def random_states(model: TransformerXL) -> dict:
    """Every random-number state the run draws from: torch's CPU and CUDA generators and the model's own."""
    return {"cpu": torch.get_rng_state(), "model": model.random_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_random_states(model: TransformerXL, states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    model.set_random_state(states["model"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, schedule, state, args, rank=0, world=1, replay=None) -> None:
    """Writes everything the run needs to go on exactly (rank 0 writes; the memory, random-number states and replay
    buffer of every rank go in): a temporary file first, then renamed."""
    memory = None if state["memory"] is None else [
        dict(hidden=m.hidden.cpu(), age=m.age, mem_offset=m.mem_offset) for m in state["memory"]]
    ranks = gather(dict(memory=memory, rng=random_states(model),
                        replay=None if replay is None else replay.state_dict()), world)
    if rank != 0:
        return
    payload = dict(state, model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                   args=vars(args), world=world, ranks=ranks, **ranks[0])
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, model, optimizer, schedule, args, device, rank=0, world=1, replay=None):
    """Restores a checkpoint of save_checkpoint (this rank's memory, random-number states and replay buffer) ->
    (the training state: step, data position, memory, history...; the learning-rate schedule)."""
    if not os.path.exists(path):
        raise SystemExit(f"--resume: {path} does not exist: train first (without --resume)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # random-number states stay CPU tensors
    changed = {k: (ckpt["args"].get(k), getattr(args, k)) for k in RUN_ARGS if ckpt["args"].get(k) != getattr(args, k)}
    if ckpt.get("world", 1) != world:
        changed["processes"] = (ckpt.get("world", 1), world)
    if changed:
        raise SystemExit(f"--resume: {path} was written with other settings (checkpoint, now): {changed}")
    ckpt.update(ckpt["ranks"][rank])
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["args"]["steps"] == args.steps:
        schedule.load_state_dict(ckpt["schedule"])
    else:  # a longer (or shorter) run: the schedule is planned anew from here
        print(f"--resume: the learning-rate schedule is re-planned for --steps {args.steps} (the checkpoint planned "
              f"{ckpt['args']['steps']}), so the run differs from one that planned {args.steps} from the start")
        schedule = learning_rate_schedule(optimizer, args, last_epoch=ckpt["step"] - 1)
    set_random_states(model, ckpt["rng"])
    if replay is not None:
        replay.load_state_dict(ckpt["replay"])
    memory = None if ckpt["memory"] is None else [LayerMemory(**dict(m, hidden=m["hidden"].to(device)))
                                                  for m in ckpt["memory"]]
    return dict(step=ckpt["step"], position=ckpt["position"], memory=memory, running=ckpt["running"],
                history=ckpt["history"]), schedule


def learning_rate_schedule(optimizer, args, last_epoch: int = -1):
    """One-cycle schedule over ``--steps``: warm-up over 5% of them (2 steps at least from 3 on: OneCycleLR divides
    by the warm-up's length, which 5% of 20 steps makes 0), then annealing."""
    pct_start = 2 / args.steps if 3 <= args.steps < 40 else 0.05
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=pct_start,
                                               last_epoch=last_epoch)


def build_model(args, vocab) -> TransformerXL:
    """The run's model: a TransformerXL, or with ``--layout`` a HourglassTransformerXL; settings it refuses exit with
    its message."""
    shape = dict(n_head=args.n_head, d_model=args.d_model, d_head=args.d_model // args.n_head, d_inner=args.d_inner,
                 dropout=args.dropout, mem_len=args.mem_len, cross_head_p=args.cross_head_p,
                 skip_retain_p=args.skip_retain_p)
    try:
        if getattr(args, "layout", None):
            model = HourglassTransformerXL(len(vocab), layout=args.layout, downsample=args.downsample or "mean",
                                           upsample=args.upsample or "repeat", **shape)
        else:
            model = TransformerXL(len(vocab), n_layer=args.n_layer, **shape)
    except ValueError as exc:
        raise SystemExit(f"model settings: {exc}")
    if args.tgt_len % model.segment_multiple:
        raise SystemExit(f"--tgt-len {args.tgt_len} must be a multiple of the layout's largest factor "
                         f"({model.segment_multiple})")
    return model


def setup_distributed(device):
    """Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1): joins the process group (gloo on the CPU, nccl on
    CUDA, one GPU per local rank) -> (rank, world size, device); else (0, 1, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def close_distributed(world: int):
    """Every rank waits for rank 0's last evaluation, then leaves the process group together: a rank that exits
    first closes its gloo connections under the others, which can abort them."""
    if world == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather(value, world: int):
    """``value`` of every rank, in rank order (every rank gets the list)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def load_for_inference(args, device):
    """The model of ``<out>/checkpoint.pt`` (built with the checkpoint's settings) and the corpus vocabulary."""
    path = os.path.join(args.out, "checkpoint.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: train first (without --eval-only / --sample)")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    trained = argparse.Namespace(**ckpt["args"])
    *_, vocab = load_corpus()
    model = build_model(trained, vocab).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), trained, vocab, ckpt["step"]


def run_evaluation(args, device) -> None:
    """--eval-only: test bits per character with the training settings and with the evaluation settings (a longer
    memory, same_length, distances clamped at the longest one seen in training), and tokens/s."""
    model, trained, vocab, step = load_for_inference(args, device)
    test = batchify(load_corpus()[2][: args.eval_chars or None], 1).to(device)
    length = trained.tgt_len if args.eval_tgt_len is None else args.eval_tgt_len
    span = dict(mem_len=4 * trained.mem_len if args.eval_mem_len is None else args.eval_mem_len,
                clamp_len=(trained.tgt_len + trained.mem_len - 1 if args.eval_clamp_len is None
                           else args.eval_clamp_len), same_length=True)
    results = {}
    for name, settings, seg in (("training", {}, trained.tgt_len), ("evaluation", span, length)):
        try:
            with model.attention_span(**settings):
                start = time.perf_counter()
                bpc = evaluate(model, test, seg)
                seconds = time.perf_counter() - start
        except ValueError as exc:  # settings this model cannot take (an hourglass needs multiples of its factor)
            raise SystemExit(f"--eval-only with {name} settings (segment {seg}, {settings}): {exc}")
        results[name] = dict(test_bpc=bpc, tokens_per_s=test.numel() / seconds, segment=seg,
                             mem_len=settings.get("mem_len", trained.mem_len),
                             clamp_len=settings.get("clamp_len", -1), same_length=settings.get("same_length", False))
        print(f"test {bpc:.3f} bpc with {name} settings (segment {seg}, memory {results[name]['mem_len']}, clamp_len "
              f"{results[name]['clamp_len']}, same_length {results[name]['same_length']}): "
              f"{results[name]['tokens_per_s']:.0f} tokens/s")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(dict(results, step=step, test_chars=test.numel()), f, indent=1)


def run_sampling(args, device) -> None:
    """--sample N: N characters generated from the checkpoint after ``--prompt``."""
    model, trained, vocab, _ = load_for_inference(args, device)
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(args.prompt) - set(index))
    if unknown or not args.prompt:
        raise SystemExit(f"--prompt must be non-empty text of the corpus' characters; unknown: {unknown}")
    prompt = torch.tensor([[index[c] for c in args.prompt]], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new, _ = model.generate(prompt, args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            generator=generator, segment_len=trained.tgt_len)
    print(args.prompt + "".join(vocab[i] for i in new[0].tolist()))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.eval_only or args.sample:
        if args.eval_only:
            run_evaluation(args, device)
        if args.sample:
            run_sampling(args, device)
        return
    rank, world, device = setup_distributed(device)
    train_model(args, rank, world, device)
    close_distributed(world)  # not after an error: torchrun stops the other ranks, a barrier would hang them


def train_model(args, rank: int, world: int, device):
    """Trains (or resumes) on this rank's share of the batch; rank 0 evaluates, checkpoints and writes results."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({world})")
    torch.manual_seed(args.seed)  # the same initial model on every rank
    train, valid, test, vocab = load_corpus()
    replay = replay_from_args(args, device)
    if replay is not None and world > 1:
        raise SystemExit("--replay-fraction runs in one process: each rank would need its own buffer of its streams")
    fresh = args.batch_size - (replay.replayed if replay else 0)
    per_rank = fresh // world
    train_streams = batchify(train, fresh)[rank * per_rank:(rank + 1) * per_rank].to(device)
    valid_streams = batchify(valid[: args.eval_chars or None], 1).to(device)
    test_streams = batchify(test, 1).to(device)
    model = build_model(args, vocab).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = learning_rate_schedule(optimizer, args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = dict(step=0, position=0, memory=None, running=None, history={"train": [], "valid": []})
    torch.manual_seed(args.seed + rank)  # each rank its own dropout masks; cross-head and skip-retain stay in step
    if args.resume:
        state, schedule = load_checkpoint(ckpt_path, model, optimizer, schedule, args, device, rank, world, replay)
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {state['step']}")
    forward, rollout = model, SegmentRollout(model)
    if world > 1:  # DDP sees one forward (a segment, or a whole memory-replay rollout) and one backward per step
        ddp = torch.nn.parallel.DistributedDataParallel
        if args.replay_segments:
            rollout = ddp(rollout)
        else:  # a layer that skip-retain skips gives no gradient that step
            forward = ddp(model, find_unused_parameters=args.skip_retain_p > 0)
    parameters = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{parameters / 1e6:.2f}M parameters, vocab {len(vocab)}, "
              f"{train.numel()} training characters, device {device}, {world} process(es)")

    per_step = max(args.replay_segments, 1)
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    history, tokens, start, train_seconds = state["history"], 0, time.perf_counter(), 0.0
    bar = Progress(args.steps, state["step"], args.progress if rank == 0 else "off")
    while state["step"] < stop:
        if state["position"] + per_step > segment_count(train_streams, args.tgt_len):
            state.update(position=0, memory=None)  # next epoch: the streams again, from an empty memory
        index = state["position"]
        chunk = [segment(train_streams, args.tgt_len, index + i) for i in range(per_step)]
        step_start = time.perf_counter()
        state["position"] += per_step
        step = state["step"]
        if args.finetune_at is not None and step >= args.finetune_at:
            model.set_phase("finetune")
        optimizer.zero_grad(set_to_none=True)
        logged = None
        if replay is not None:
            loss, logged, memory = replay.train_loss(model, train_streams, index, state["memory"])
        elif args.replay_segments:
            losses, memory = rollout([c[0] for c in chunk], [c[1] for c in chunk], state["memory"])
            loss = sum(losses) / len(losses)
            memory = [dataclasses.replace(m, hidden=m.hidden.detach()) for m in memory]  # truncate here
        else:
            loss, memory = forward(chunk[0][0], state["memory"], chunk[0][1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - step_start
        step = state["step"] = step + 1
        state["memory"] = memory
        tokens += world * sum(c[1].numel() for c in chunk)
        running, logged = state["running"], (loss if logged is None else logged).item()
        state["running"] = running = logged if running is None else 0.95 * running + 0.05 * logged
        history["train"].append((step, running))
        bar.update(step, running, tokens / (time.perf_counter() - start))
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            bpc = evaluate(model, valid_streams, args.tgt_len)
            history["valid"].append((step, bpc))
            bar.write(f"step {step}: validation {bpc:.3f} bpc")
        if step % args.eval_every == 0 or step == stop:
            save_checkpoint(ckpt_path, model, optimizer, schedule, state, args, rank, world, replay)
    bar.close()
    if rank != 0:
        return
    if args.resume and tokens == 0 and state["step"] >= args.steps:
        print(f"{ckpt_path} is at step {state['step']} of {args.steps} already: nothing to train (a longer run: "
              f"--steps more than {state['step']})")
        return
    if state["step"] < args.steps:
        print(f"stopped at step {state['step']} of {args.steps}: {ckpt_path}; go on with --resume")
        return

    test_bpc = evaluate(model, test_streams, args.tgt_len)
    print(f"test {test_bpc:.3f} bpc")
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"steps": state["step"], "valid_bpc": history["valid"][-1][1], "test_bpc": test_bpc,
                   "train_tokens_per_s": tokens / max(train_seconds, 1e-9), "parameters": parameters,
                   "args": vars(args)}, f, indent=1)
    plot_history(history, os.path.join(args.out, "loss.png"))


if __name__ == "__main__":
    main()
