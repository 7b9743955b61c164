"""``python -m bench``: sweep the default shapes of every op on the device at hand, print a markdown table
and write JSON, markdown and plots under bench/results/ (named by device)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from bench import harness, report
from bench.suites import SUITES


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--ops", type=_csv(str), default=list(SUITES), help=f"comma list of {list(SUITES)}")
    p.add_argument("--backends", type=_csv(str), help="comma list, e.g. reference,cpu,triton,cuda")
    p.add_argument("--dtypes", type=_csv(str), help="comma list, e.g. float32,bfloat16")
    p.add_argument("--lengths", type=_csv(int), help="segment lengths L (memory M = L), comma list")
    p.add_argument("--head-dims", type=_csv(int), help="head dims D, comma list")
    p.add_argument("--batch", type=int, help="batch size B")
    p.add_argument("--heads", type=int, help="query heads H")
    p.add_argument("--segments", type=_csv(int), help="memory_replay: numbers of segments T, comma list")
    p.add_argument("--memories", type=_csv(int), help="short_query, generation: memory lengths M, comma list")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds after one warm-up round; every candidate of a case runs once per round, in a "
                        "shuffled order; figures are the median and the range")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--record-auto", action="store_true",
                   help="on a GPU: record the faster of triton/cuda per dtype and head dim for backend='auto'")
    opts = p.parse_args(argv)
    unknown = [o for o in opts.ops if o not in SUITES]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(SUITES)}")
    opts.device = torch.device(opts.device) if opts.device else harness.default_device()
    return opts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    rows, loads = [], {}
    for name in opts.ops:
        print(f"[{name}]", flush=True)
        with harness.MachineLoad() as load:
            rows += SUITES[name].run(opts)
        loads[name] = load.summary()
        print(f"  machine load: {loads[name]}" + ("  WARNING: busy machine" if load.busy else ""), flush=True)
    baselines = {name: SUITES[name].BASELINE for name in opts.ops}
    report.add_ratios(rows, baselines, {name: getattr(SUITES[name], "RATIO_FIELD", "fwd_bwd_ms") for name in opts.ops})
    stem = harness.device_name(opts.device)
    meta = dict(device=stem, torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), rounds=f"1 warm-up + {opts.repeats} timed, interleaved", load=loads)
    print(report.write(rows, baselines, meta, opts.out, stem))
    if opts.record_auto and opts.device.type == "cuda":
        for name in opts.ops:
            if hasattr(SUITES[name], "record_auto"):
                print(f"auto choices: {SUITES[name].record_auto(rows, opts.device)}")
    if not opts.no_plots:
        for name in opts.ops:
            for path in getattr(SUITES[name], "plot", lambda rows, out_dir, stem: [])(rows, opts.out, stem):
                print(f"plot: {path}")


if __name__ == "__main__":
    main()
