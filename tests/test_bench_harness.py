"""The bench's figures can be trusted: medians and ranges over interleaved rounds in shuffled order, failures kept as
rows with their reason, the machine's load in the report."""

import torch

from bench import harness, report

CPU = torch.device("cpu")


def test_rounds_are_interleaved_shuffled_and_warmed_up():
    calls = []
    candidates = {name: {"t": (lambda name=name: calls.append(name))} for name in "abcd"}
    timings, failed = harness.time_interleaved(candidates, CPU, repeats=6, warmup=2, seed=1)
    assert not failed and all(t["t"].rounds == 6 for t in timings.values())  # warm-up rounds not counted
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(rounds) == 8  # each round runs every candidate once
    assert len({tuple(r) for r in rounds}) > 1 and len({r[0] for r in rounds}) > 1  # no fixed order, no fixed first


def test_median_and_range_not_the_best_round():
    timing = harness.Timing.of([0.3, 0.1, 0.2, 0.5, 0.4])
    assert (timing.median, timing.low, timing.high) == (0.3, 0.1, 0.5)
    assert timing.fields("x_ms") == {"x_ms": 300.0, "x_ms_range": [100.0, 500.0]}


def test_a_burst_times_one_call_of_many():
    """A short call is timed in a burst filling about the given seconds (probed on three calls after an untimed
    one); the burst's timing per call is one call's."""
    import time

    calls = []

    def call():
        calls.append(1)
        time.sleep(0.002)
    measure, n = harness.burst(call, CPU, seconds=0.02)
    assert len(calls) == 4 and 5 <= n <= 10  # the untimed call and the probes; about 20 ms of 2 ms calls
    timings, _ = harness.time_interleaved({"a": {"t": measure}}, CPU, repeats=3, warmup=0)
    assert len(calls) == 4 + 3 * n
    one = timings["a"]["t"].per_call(n)
    assert 0.002 <= one.low <= one.median <= one.high < 0.01 and one.rounds == 3
    assert harness.burst(call, CPU, seconds=1.0, most=4)[1] == 4


def test_a_failing_candidate_is_a_row_with_its_reason():
    from triton.runtime.errors import OutOfResources  # not a RuntimeError

    def out_of_resources():
        raise OutOfResources(300000, 232448, "shared memory")

    x = torch.randn(4, 8, requires_grad=True)
    rows = harness.measure_ops("op", "case", "float32", {"fine": lambda t: t * 2, "gpu_only": None,
                                                          "fails": lambda t: out_of_resources()},
                               [x], CPU, repeats=2, reasons={"gpu_only": "runs on CUDA tensors only"})
    by_backend = {r["backend"]: r for r in rows}
    assert set(by_backend) == {"fine", "gpu_only", "fails"}
    assert "fwd_bwd_ms" in by_backend["fine"] and "fwd_bwd_ms_range" in by_backend["fine"]
    assert by_backend["gpu_only"]["note"] == "runs on CUDA tensors only"
    assert by_backend["fails"]["note"].startswith("OutOfResources")
    text = report.markdown(rows, {"op": "fine"}, "t")
    assert "OutOfResources" in text and "runs on CUDA tensors only" in text


def test_a_model_whose_compile_fails_is_a_row_and_the_other_models_still_run(monkeypatch):
    """On a GPU one graph break under fullgraph once ended the model suite with no row at all."""
    import argparse

    import torch._dynamo.exc

    from bench.suites import model

    built = model.train_step_of

    def train_step_of(label, *args):
        if label.endswith(":compiled"):
            raise torch._dynamo.exc.Unsupported("a graph break")
        return built(label, *args)

    monkeypatch.setattr(model, "train_step_of", train_step_of)
    opts = argparse.Namespace(device=CPU, lengths=[8], batch=1, dtypes=None, backends=["reference", "cpu:compiled"],
                              repeats=1)
    rows = {r["backend"]: r for r in model.run(opts)}
    assert rows["reference"]["fwd_bwd_ms"] > 0
    assert rows["cpu:compiled"]["note"].startswith("Unsupported: a graph break")


def test_report_shows_the_load_and_warns_when_busy():
    with harness.MachineLoad() as load:
        sum(range(10**5))
    quiet = dict(load.summary(), busy=False)
    assert set(quiet) >= {"load_before", "load_after", "foreign_cores", "busy"}
    busy = dict(quiet, busy=True, foreign_cores=1.5)
    text = report.markdown([], {}, "t", {"suite_a": quiet, "suite_b": busy})
    assert "## Machine load" in text and "WARNING: the machine was busy during suite_b" in text


def test_the_training_forward_records_the_graph_and_only_where_asked():
    """``train_fwd_ms`` times the forward a backward follows (grad on: what the op saves and any work it does for
    the backward); ``fwd_ms`` the inference one (no grad)."""
    x = torch.randn(4, 8, requires_grad=True)
    seen = []

    def op(t):
        seen.append(torch.is_grad_enabled())
        return t * 2

    grad = torch.ones(4, 8)
    assert "train_fwd_ms" not in harness.op_measures(op, [x], grad)
    measures = harness.op_measures(op, [x], grad, training_forward=True)
    measures["fwd_ms"]()
    out = measures["train_fwd_ms"]()
    assert seen == [False, True] and out.requires_grad
    rows = harness.measure_ops("op", "case", "float32", {"op": op}, [x], CPU, repeats=2, training_forward=True)
    assert rows[0]["train_fwd_ms"] > 0 and "train_fwd_ms_range" in rows[0]
    assert "training fwd ms" in report.markdown(rows, {"op": "op"}, "t")
