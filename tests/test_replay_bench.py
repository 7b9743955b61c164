"""Smoke run of the replay bench suite on tiny sizes, one round: every candidate gives a row (a measured one, or one
that says why it could not run), so the suite the lead runs quietly does not rot. No timing is asserted."""

import argparse
import sys

import torch

from bench.suites import SUITES, replay


def test_replay_suite_runs_on_tiny_sizes_and_every_candidate_has_a_row(monkeypatch):
    opts = argparse.Namespace(device=torch.device("cpu"), repeats=1, backends=None, batch=4, lengths=[8],
                              capacities=[64, 300], draws=16)
    original = replay.default_config

    def tiny(device):
        return dict(original(device), n_layer=2, n_head=2, d_model=16, d_inner=32, vocab=20, replay_capacity=32)

    monkeypatch.setattr(replay, "default_config", tiny)
    monkeypatch.setitem(sys.modules, "torchrl", None)  # as where it is not installed (its import also sets env vars)
    rows = replay.run(opts)
    assert SUITES["replay"] is replay
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["backend"]] = row
    sampler_cases = [c for c in by_case if c.startswith("sample+update")]
    assert len(sampler_cases) == 2
    for case in sampler_cases:
        assert set(by_case[case]) == set(replay.SAMPLERS)
        for label in ("sum_tree", "sum_tree_b2", "cumsum"):
            assert by_case[case][label]["fwd_bwd_ms"] > 0 and "sample ms" in by_case[case][label]["extra"]
        assert "torchrl is not importable here" in by_case[case]["torchrl"]["note"]  # a row with the reason
    step_case = next(c for c in by_case if c.startswith("train step"))
    assert set(by_case[step_case]) == set(replay.STEPS)
    assert "overhead vs no_replay" in by_case[step_case]["replay_window"]["extra"]
    parts = [r for r in rows if "of the replay_window step" in r["case"]]
    assert {r["case"].split(" of ")[0] for r in parts} == {"buffer ops", "memory rebuild"}
