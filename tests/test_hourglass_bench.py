"""The bench suites of the resampling ops, of the hourglass model and of decoding (with its hourglass cases) run and
give their rows (tiny sizes, one round; no figure is judged here: measure on a quiet machine with ``python -m bench
--ops causal_resample,hourglass,generation``)."""

import argparse

import torch

from bench import report
from bench.suites import SUITES


def tiny_options(**overrides):
    return argparse.Namespace(**dict(device=torch.device("cpu"), lengths=[12], batch=1, dtypes=None, backends=None,
                                     repeats=1) | overrides)


def test_resampling_suite_gives_eager_and_fused_rows():
    suite = SUITES["causal_resample"]
    rows = suite.run(tiny_options())
    report.add_ratios(rows, {suite.NAME: suite.BASELINE})
    assert {r["case"].split()[0] for r in rows} == {"causal_downsample", "upsample_add"}
    assert {r["backend"] for r in rows} == {"eager", "cpu"} and len(rows) == 8
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_mb"] > 0 and "speedup" in r and "mem_ratio" in r for r in rows)


def test_hourglass_suite_gives_both_models():
    suite = SUITES["hourglass"]
    rows = suite.run(tiny_options())
    report.add_ratios(rows, {suite.NAME: suite.BASELINE})
    assert [r["backend"] for r in rows] == ["flat 8@1", "hourglass 2@1 4@3 2@1"]
    assert all("tokens/s" in r["extra"] and r["peak_mb"] > 0 and "mem_ratio" in r for r in rows)


def test_generation_suite_decodes_the_flat_and_the_hourglass_model():
    suite = SUITES["generation"]
    rows = suite.run(tiny_options(memories=[7], batch=2))
    report.add_ratios(rows, {suite.NAME: suite.BASELINE})
    hourglass = [r for r in rows if r["case"].startswith("hourglass")]
    assert [r["backend"] for r in hourglass] == ["reference", "cpu", "cpu:generate", "flat 8@1:generate"]
    assert "M=6 " in hourglass[0]["case"] and len(rows) == 10
    assert all(r.get("step_ms", 0) > 0 and "tokens/s" in r["extra"] for r in rows)
