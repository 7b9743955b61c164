"""Turns bench rows into the markdown report, the JSON file and the plots under bench/results/."""

from __future__ import annotations

import json
import os
from collections import defaultdict

FIELDS = [("fwd_ms", "fwd ms", "{:.2f}"), ("train_fwd_ms", "training fwd ms", "{:.2f}"), ("bwd_ms", "bwd ms", "{:.2f}"),
          ("fwd_bwd_ms", "fwd+bwd ms", "{:.2f}"), ("step_ms", "ms per step", "{:.2f}"),
          ("peak_mb", "peak MiB", "{:.1f}"), ("tflops", "TFLOP/s", "{:.3f}")]


def add_ratios(rows, baselines, ratio_fields=None):
    """Adds ``speedup`` (the baseline's median time / this one's; fwd+bwd, or the op's ``ratio_fields`` entry) and
    ``mem_ratio`` (peak / baseline peak)."""
    base = {(r["op"], r["case"], r["dtype"]): r for r in rows if r["backend"] == baselines.get(r["op"])}
    for r in rows:
        b = base.get((r["op"], r["case"], r["dtype"]))
        if b is None:
            continue
        field = (ratio_fields or {}).get(r["op"], "fwd_bwd_ms")
        if r.get(field) and b.get(field):
            r["speedup"] = b[field] / r[field]
        if r.get("peak_mb") and b.get("peak_mb"):
            r["mem_ratio"] = r["peak_mb"] / b["peak_mb"]


def cell(row, key, fmt):
    """A figure with its range over the rounds where it has one: ``12.30 (11.90-13.05)``."""
    if row.get(key) is None:
        return "-"
    text = fmt.format(row[key])
    if row.get(f"{key}_range"):
        low, high = row[f"{key}_range"]
        text += f" ({fmt.format(low)}-{fmt.format(high)})"
    return text


def load_lines(loads):
    """The machine-load section: per suite, load averages before/after and other processes' CPU use."""
    lines = ["## Machine load", "", "| suite | seconds | load before (1, 5, 15 min) | load after | other processes "
             "(cores) |", "|---|---|---|---|---|"]
    for name, load in loads.items():
        lines.append(f"| {name} | {load['seconds']} | {load['load_before']} | {load['load_after']} | "
                     f"{load['foreign_cores']} |")
    busy = [name for name, load in loads.items() if load["busy"]]
    lines.append("")
    if busy:
        lines.append(f"**WARNING: the machine was busy during {', '.join(busy)}** (other processes used more than a "
                     "quarter of a core on average): those figures are not comparable.")
    else:
        lines.append("The machine was quiet: other processes used less than a quarter of a core during every suite.")
    return lines + [""]


def markdown(rows, baselines, title, loads=None):
    """One table per op; the ratio columns compare with that op's baseline backend. Figures are medians over the
    rounds with their range; a row that could not be measured says why."""
    lines = [f"# {title}", "", "Figures: median over the interleaved rounds, (min-max) over the rounds.", ""]
    if loads:
        lines += load_lines(loads)
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op, op_rows in by_op.items():
        fields = [f for f in FIELDS if any(r.get(f[0]) is not None for r in op_rows)]
        extra = sorted({k for r in op_rows for k in r.get("extra", {})})
        notes = any(r.get("note") for r in op_rows)
        header = ["case", "backend", "dtype"] + [f[1] for f in fields] + extra
        header += [f"speedup vs {baselines[op]}", f"peak / {baselines[op]}"] + (["note"] if notes else [])
        if not any("peak_mb" in r for r in op_rows):
            header.remove(f"peak / {baselines[op]}")
        lines += [f"## {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in op_rows:
            cells = [r["case"], r["backend"], r["dtype"]]
            cells += [cell(r, key, fmt) for key, _, fmt in fields]
            cells += [str(r.get("extra", {}).get(k, "-")) for k in extra]
            cells += [f"{r['speedup']:.2f}x" if "speedup" in r else "-"]
            cells += [f"{r['mem_ratio']:.3f}" if "mem_ratio" in r else "-"] if any("peak_mb" in x for x in op_rows) else []
            cells += [r.get("note", "")] if notes else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write(rows, baselines, meta, out_dir, stem):
    """Writes ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(rows, baselines, f"memtx_ops bench on {meta['device']}", meta.get("load"))
    text += "\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items() if k != "load") + "\n"
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(text)
    return text


def plot_against(rows, op, x_of, out_path, xlabel, title):
    """Two panels (fwd+bwd time, peak memory) against ``x_of(row)``, one line per backend and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if r["op"] == op and r.get("fwd_bwd_ms") is not None:
            series[(r["backend"], r["dtype"])].append((x_of(r), r.get("fwd_bwd_ms"), r.get("peak_mb")))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (backend, dtype), pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=f"{backend} {dtype}")
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=f"{backend} {dtype}")
    for ax, ylabel in zip(axes, ("fwd+bwd time (ms)", "peak memory (MiB)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def write_gate(stem: str, markdown: str, meta: dict, rows: list, failures: list) -> int:
    """A compile gate's result (``make check-aot``, ``make check-cuda-resources``): ``<stem>.md`` and ``<stem>.json``
    written, the failures printed -> the exit status (1 when any)."""
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"{meta}: {stem}.md")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0
