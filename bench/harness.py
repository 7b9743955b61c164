"""Measurement primitives shared by every bench suite: interleaved timing with medians and ranges, peak tensor and
resident memory, machine load, the failures a row records instead of vanishing, device naming.

Timing: every candidate of a case (backends, methods) runs once per round, the rounds in a new random order, after
warm-up rounds; a figure is the median over the rounds with its range (min-max), never the best round. So a slow
phase of the machine hits every candidate alike, and no candidate always runs first.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import random
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

# A measure: a callable timed whole, or (setup, timed): setup() runs untimed, timed(setup()) is timed.
Measure = Union[Callable[[], object], Tuple[Callable[[], object], Callable[[object], object]]]


def _bench_errors() -> Tuple[type, ...]:
    """What a backend raises when it cannot run a case: a row records it (Triton's errors are not RuntimeErrors)."""
    errors = [RuntimeError, TypeError, ValueError, NotImplementedError, MemoryError]
    try:
        from torch._dynamo.exc import TorchDynamoException  # torch.compile's failures (recompile limits, ...)

        errors.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from triton.errors import TritonError  # OutOfResources, CompilationError, PTXASError, ...

        errors.append(TritonError)
    except ImportError:
        try:
            from triton.compiler.errors import CompilationError
            from triton.runtime.errors import OutOfResources

            errors += [OutOfResources, CompilationError]
        except ImportError:
            pass
    return tuple(errors)


BENCH_ERRORS = _bench_errors()


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (for the report's note column)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    """Seconds over the rounds: the median and the range."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, seconds: List[float]) -> "Timing":
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    def per_call(self, calls: int) -> "Timing":
        """The timing of one of ``calls`` calls timed together (:func:`burst`)."""
        return Timing(self.median / calls, self.low / calls, self.high / calls, self.rounds)

    def fields(self, name: str) -> Dict[str, object]:
        """Row fields ``<name>`` (median, ms) and ``<name>_range`` ([min, max], ms)."""
        return {name: 1e3 * self.median, f"{name}_range": [1e3 * self.low, 1e3 * self.high]}


def _run_measure(measure: Measure, device: torch.device) -> float:
    if isinstance(measure, tuple):
        setup, timed = measure
        arg = setup()
        synchronize(device)
        start = time.perf_counter()
        timed(arg)
    else:
        synchronize(device)
        start = time.perf_counter()
        measure()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(candidates: Dict[str, Dict[str, Measure]], device: torch.device, repeats: int, warmup: int = 1,
                     seed: int = 0) -> Tuple[Dict[str, Dict[str, Timing]], Dict[str, str]]:
    """Times ``{label: {measure name: measure}}`` in rounds -> (``{label: {measure name: Timing}}``, ``{label: why it
    failed}``). Each round runs every label once in a new random order (seeded), each label's measures in their
    order; ``warmup`` rounds come first and are not counted. A label whose measure raises one of ``BENCH_ERRORS``
    leaves the rounds, with the reason."""
    order = random.Random(seed)
    seconds: Dict[str, Dict[str, List[float]]] = {label: {name: [] for name in m} for label, m in candidates.items()}
    failed: Dict[str, str] = {}
    for round_index in range(warmup + repeats):
        labels = [label for label in candidates if label not in failed]
        order.shuffle(labels)
        for label in labels:
            try:
                for name, measure in candidates[label].items():
                    t = _run_measure(measure, device)
                    if round_index >= warmup:
                        seconds[label][name].append(t)
            except BENCH_ERRORS as exc:
                failed[label] = describe_error(exc)
    timings = {label: {name: Timing.of(ts) for name, ts in by_name.items()}
               for label, by_name in seconds.items() if label not in failed}
    return timings, failed


def burst(fn: Callable[[], object], device: torch.device, seconds: float = 0.05, most: int = 400, probes: int = 3
          ) -> Tuple[Callable[[], None], int]:
    """A measure of a call far shorter than a round: ``fn`` back to back, as many times as fill about ``seconds``
    (from ``probes`` timed calls after one untimed call) -> (the measure, its number of calls; ``Timing.per_call`` of
    its timing is one call's). A single millisecond call, timed alone after another candidate ran, is dominated by
    waking the threads and refilling the caches; a burst times the steady state a decoding loop runs in, the same way
    for every candidate. The probe times several calls because the first one after another candidate is the slowest
    (at 1.6 ms, up to 3x): probed on it alone, a burst held a handful of calls and its first one still weighed in the
    per-call time. Raises what ``fn`` raises."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(probes):
        fn()
    synchronize(device)
    per_call = max((time.perf_counter() - start) / probes, 1e-6)
    calls = max(1, min(most, round(seconds / per_call)))

    def measure():
        for _ in range(calls):
            fn()
    return measure, calls


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 5) -> Timing:
    """:func:`time_interleaved` of one callable."""
    timings, failed = time_interleaved({"fn": {"t": fn}}, device, repeats, warmup)
    if failed:
        raise RuntimeError(failed["fn"])
    return timings["fn"]["t"]


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of tensors the call ``fn()`` holds at its peak above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of torch's allocation and free events recorded by
    the profiler (``profile_memory=True``), so the number does not depend on the C allocator's settings and the
    timings are taken under the allocator users run with. Not counted on the CPU: kernels' per-thread scratch
    that is not a tensor (the C++ CPU attention keeps a few tiles, well under 1 MiB per thread).
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def resident_peak(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which the process's resident set peaks during ``fn()`` above its size at the call (Linux: VmHWM,
    reset through /proc/self/clear_refs), under whatever C allocator runs: tensor bytes plus the heap's
    fragmentation, scratch and page faults. None where /proc does not tell."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = _status_kib("VmRSS")
        fn()
        return 1024 * (_status_kib("VmHWM") - start)
    except (OSError, StopIteration):
        return None


def _busy_jiffies() -> Optional[Tuple[int, int]]:
    """(busy, all) CPU time of the whole machine in clock ticks, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class MachineLoad:
    """How loaded the machine was while a suite ran: the load averages before and after, and the CPU time that
    other processes used meanwhile (the machine's busy time minus this process's), in cores.

    ``busy``: other processes used more than ``BUSY_CORES`` cores on average. (The load averages lag by minutes
    and count the bench itself, so they are reported, not judged.)"""

    BUSY_CORES = 0.25

    def __enter__(self):
        self.cores = os.cpu_count() or 1
        self.load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        self._jiffies = _busy_jiffies()
        self._own = self._own_seconds()
        self._start = time.perf_counter()
        return self

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        self.load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        self.foreign_cores = None
        jiffies = _busy_jiffies()
        if jiffies is not None and self._jiffies is not None and self.seconds > 0:
            ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            busy = (jiffies[0] - self._jiffies[0]) / ticks
            own = self._own_seconds() - self._own
            self.foreign_cores = max(0.0, busy - own) / self.seconds
        return False

    @property
    def busy(self) -> bool:
        return self.foreign_cores is not None and self.foreign_cores > self.BUSY_CORES

    def summary(self) -> Dict[str, object]:
        def rounded(values):
            return None if values is None else [round(v, 2) for v in values]

        return dict(seconds=round(self.seconds, 1), cores=self.cores, load_before=rounded(self.load_before),
                    load_after=rounded(self.load_after),
                    foreign_cores=None if self.foreign_cores is None else round(self.foreign_cores, 3),
                    busy=self.busy)


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. ``NVIDIA-H100-80GB-HBM3`` or ``cpu-AMD-EPYC-2t``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1] for l in f if l.startswith("model name")), "")
            name = f"cpu-{model.strip()}"
        except OSError:
            pass
        name += f"-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def failure_row(op: str, case: str, backend: str, dtype: str, reason: str) -> Dict[str, object]:
    """The row of a candidate that could not run a case: it stays in the report with its reason."""
    print(f"  {case} {dtype} {backend}: not measured ({reason})", flush=True)
    return dict(op=op, case=case, backend=backend, dtype=dtype, note=reason)


def attention_inputs(B, H, L, M, D, dtype, device):
    """Fresh leaves (q, k, v, r, u, vb) of relative memory attention: ``[B, H, L, D]``, k/v ``[B, H, M + L, D]``,
    r ``[H, M + L, D]``, u/vb ``[H, D]``."""

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    return leaf(B, H, L, D), leaf(B, H, M + L, D), leaf(B, H, M + L, D), leaf(H, M + L, D), leaf(H, D), leaf(H, D)


def attention_cases(opts, cfg, device):
    """The attention suites' grid: yields (case, dtype name, inputs, (B, H, L, D)) for every segment length
    L (memory M = L), head dim D and dtype of the options, else of ``cfg``."""
    B = opts.batch or cfg["batch"]
    H = opts.heads or cfg["heads"]
    for L, D, dtype_name in itertools.product(opts.lengths or cfg["lengths"], opts.head_dims or cfg["head_dims"],
                                              opts.dtypes or cfg["dtypes"]):
        inputs = attention_inputs(B, H, L, L, D, getattr(torch, dtype_name), device)
        yield f"B={B} H={H} L=M={L} D={D}", dtype_name, inputs, (B, H, L, D)


def op_measures(fn: Callable, inputs: List[torch.Tensor], grad: torch.Tensor,
                training_forward: bool = False) -> Dict[str, Measure]:
    """Forward (no grad), backward (after an untimed forward) and forward+backward of ``fn(*inputs)``; with
    ``training_forward``, also the forward that records the graph for a backward (``train_fwd_ms``: what it saves,
    and any extra work it does for the backward, against ``fwd_ms``)."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def clear():
        for t in inputs:
            t.grad = None

    def forward_for_backward():
        clear()
        return fn(*inputs)

    def forward_backward():
        clear()
        fn(*inputs).backward(grad)

    measures = {"fwd_ms": forward, "bwd_ms": (forward_for_backward, lambda out: out.backward(grad)),
                "fwd_bwd_ms": forward_backward}
    if training_forward:
        measures["train_fwd_ms"] = forward_for_backward  # the graph and what it saved are dropped with the output
    return measures


def measure_ops(op: str, case: str, dtype: str, fns: Dict[str, Optional[Callable]], inputs: List[torch.Tensor],
                device: torch.device, repeats: int, reasons: Optional[Dict[str, str]] = None,
                grad: Optional[torch.Tensor] = None, training_forward: bool = False):
    """Rows of every ``{label: fn(*inputs)}`` of one case (its output shaped like ``inputs[0]``, or like ``grad``, the
    cotangent of its backward, when given): fwd, bwd, fwd+bwd (medians and ranges over interleaved rounds), the
    training forward with ``training_forward`` (:func:`op_measures`), and the peak tensor memory of one fwd+bwd. A
    label whose fn is None (``reasons[label]`` says why) or that raises gets a row with the reason."""
    reasons = dict(reasons or {})
    grad = torch.randn_like(inputs[0]) if grad is None else grad
    runnable = {label: op_measures(fn, inputs, grad, training_forward) for label, fn in fns.items() if fn is not None}
    timings, failed = time_interleaved(runnable, device, repeats)
    reasons.update(failed)
    rows = []
    for label in fns:
        if label not in timings:
            rows.append(failure_row(op, case, label, dtype, reasons.get(label, "not available")))
            continue
        for t in inputs:
            t.grad = None
        row = dict(op=op, case=case, backend=label, dtype=dtype)
        for name, timing in timings[label].items():
            row.update(timing.fields(name))
        row["peak_mb"] = peak_memory(runnable[label]["fwd_bwd_ms"], device) / 2**20
        for t in inputs:
            t.grad = None
        rows.append(row)
        print(f"  {case} {dtype} {label}: fwd+bwd {row['fwd_bwd_ms']:.2f} ms "
              f"({row['fwd_bwd_ms_range'][0]:.2f}-{row['fwd_bwd_ms_range'][1]:.2f})", flush=True)
    return rows


def lm_model(cfg: Dict[str, object], backend: str, mem_len: int, dropout: float, device: torch.device,
             dtype: Optional[torch.dtype] = None, layout: Optional[str] = None) -> torch.nn.Module:
    """A fresh ``TransformerXL`` of the suite config ``cfg`` (vocab, n_layer, n_head, d_model, d_inner), seeded,
    whose attention runs ``backend``: ``"reference"`` is the eager Transformer-XL (with torch's dropout). With a
    ``layout``, a ``HourglassTransformerXL`` of it instead (its depth, not ``n_layer``)."""
    from memtx_ops.nn import HourglassTransformerXL, TransformerXL

    torch.manual_seed(0)
    shape = dict(n_head=cfg["n_head"], d_model=cfg["d_model"], d_head=cfg["d_model"] // cfg["n_head"],
                 d_inner=cfg["d_inner"], dropout=dropout, mem_len=mem_len, backend=backend,
                 dropout_backend="torch" if backend == "reference" else "auto")
    model = (TransformerXL(cfg["vocab"], n_layer=cfg["n_layer"], **shape) if layout is None
             else HourglassTransformerXL(cfg["vocab"], layout=layout, resample_backend=backend, **shape))
    return model.to(device=device, dtype=dtype)


def lm_training_step(model: torch.nn.Module, vocab: int, B: int, L: int, device: torch.device, autocast,
                     forward: Optional[Callable] = None) -> Callable[[], None]:
    """A training step (forward, backward, Adam) of the language model ``model`` on random tokens ``[B, L]`` with a
    full memory of L positions (``forward``: what to call instead of ``model``, e.g. its compiled form). One step is
    run here, so that the optimiser state exists (and a compiled forward is compiled) before any measure."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (B, L + 1), device=device)
    with torch.no_grad(), autocast:
        _, memory = model(tokens[:, :-1])
    forward = model if forward is None else forward

    def train_step():
        with autocast:
            loss, _ = forward(tokens[:, :-1], memory, tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()
    return train_step


def measure_training_steps(op: str, case: str, dtype: str, steps: Dict[str, Callable[[], None]], tokens: int,
                           device: torch.device, repeats: int) -> List[Dict[str, object]]:
    """Rows of the training steps ``steps`` {name: step} timed in interleaved rounds: time, peak memory and
    ``tokens`` per step as tokens/s (median and range); a step that fails is a row with the reason."""
    timings, failed = time_interleaved({n: {"fwd_bwd_ms": s} for n, s in steps.items()}, device, repeats)
    rows = []
    for name, step in steps.items():
        if name in failed:
            rows.append(failure_row(op, case, name, dtype, failed[name]))
            continue
        timing = timings[name]["fwd_bwd_ms"]
        row = dict(op=op, case=case, backend=name, dtype=dtype, **timing.fields("fwd_bwd_ms"),
                   peak_mb=peak_memory(step, device) / 2**20)
        row["extra"] = {"tokens/s": f"{tokens / timing.median:.0f} ({tokens / timing.high:.0f}-"
                                    f"{tokens / timing.low:.0f})"}
        rows.append(row)
        print(f"  {case} {dtype} {name}: {row['extra']['tokens/s']} tokens/s, peak {row['peak_mb']:.1f} MiB",
              flush=True)
    return rows
