"""The comparison helper itself: what the SPEC's relative L2 error alone lets through, it does not."""

import pytest
import torch

from helpers import ELEMENT_ULPS, EPSILON, TOLERANCE, reference_errors, rel_error, rms, spawn_ranks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_one_wrong_element_fails_though_the_l2_error_passes(dtype):
    ref = torch.randn(64, 64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = ref.to(dtype)
    assert not reference_errors({"x": got}, {"x": ref}, dtype)[1]
    got[3, 5, 7] += 1.0  # one element of 65536 is off by the tensor's standard deviation
    assert rel_error(got, ref) <= TOLERANCE[dtype] or dtype == torch.float32  # the L2 bound lets it through
    _, bad = reference_errors({"x": got}, {"x": ref}, dtype)
    assert "x" in bad and "(at (3, 5, 7))" in bad["x"], bad


def test_nan_and_inf_fail():
    ref = torch.randn(10, dtype=torch.float64)
    for value in (float("nan"), float("inf")):
        got = ref.float().clone()
        got[4] = value
        assert "x" in reference_errors({"x": got}, {"x": ref}, torch.float32)[1]


def test_vanishing_gradient_is_judged_against_its_unit():
    """A gradient that is 0 in exact arithmetic comes out as rounding noise: relative to itself that is an error of
    1 (or infinity), relative to the size of the terms it sums it is a few eps."""
    ref = torch.zeros(8, 8, dtype=torch.float64)
    noise = 4 * EPSILON[torch.float32] * torch.randn(8, 8)
    assert "g" in reference_errors({"g": noise}, {"g": ref}, torch.float32)[1]
    errors, bad = reference_errors({"g": noise}, {"g": ref}, torch.float32, units={"g": 1.0})
    assert not bad and errors["g"]["vanishing"]
    wrong = noise.clone()
    wrong[2, 2] = 1e-3  # an error that is not rounding: fails even against the unit
    assert "g" in reference_errors({"g": wrong}, {"g": ref}, torch.float32, units={"g": 1.0})[1]


def test_a_sum_that_nearly_cancels_is_judged_against_its_uncancelled_size():
    """du of one head adds a term per batch row and query (B=8, L=50: 400 terms of unit size), and each term's
    rounding adds in quadrature, so the sum carries a few ``eps * sqrt(400)`` units of noise however much it cancels
    (MEMTX_FUZZ_SEED=11 cpu float32 draw 51 summed 13 terms to 1.7e-3 of the unit). Judged against its uncancelled
    size, ``sqrt(400)`` units, noise of 3 eps of it passes; judged against one unit, as if it were a single term, it
    would not. An error of 5e-4 units (30% of the sum) still fails."""
    eps, count = EPSILON[torch.float32], 400
    ref = torch.full((1, 1), 1.7e-3, dtype=torch.float64)
    got = ref + 3 * eps * count ** 0.5
    units = {"g": 1.0}
    assert "g" in reference_errors({"g": got}, {"g": ref}, torch.float32, units=units)[1]
    errors, bad = reference_errors({"g": got}, {"g": ref}, torch.float32, units=units, terms={"g": count})
    assert not bad and errors["g"]["vanishing"], errors
    wrong = ref + 5e-4
    assert "g" in reference_errors({"g": wrong}, {"g": ref}, torch.float32, units=units, terms={"g": count})[1]


def test_the_rounding_floor_is_continuous():
    """MEMTX_FUZZ_SEED=64 cpu float32 draw 50: dvb cancelled to 1.4e-3 of its uncancelled size, just above
    ``VANISHING``, and carried 1.7 eps of that size in rounding (float32 PyTorch: 0.9 eps), 1.3e-4 of itself. Judged
    relative to itself it failed, where a sum that cancelled a little further passed against its uncancelled size;
    the floor judges both alike. An error of 64 eps of that size still fails, and so does one of twice the SPEC's
    bound of a sum that does not cancel (the floor is 0.038 of its uncancelled size in float32)."""
    eps, unit = EPSILON[torch.float32], 1.0
    noise = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise /= rms(noise)
    for size, error, fails in ((1.4e-3, 1.7 * eps, False), (1e-4, 1.7 * eps, False), (1.4e-3, 64 * eps, True),
                               (0.5, 2 * TOLERANCE[torch.float32] * 0.5, True)):
        ref = size * unit * torch.ones(64, dtype=torch.float64)
        got = ref + error * unit * noise
        bad = reference_errors({"g": got}, {"g": ref}, torch.float32, units={"g": unit})[1]
        assert ("g" in bad) == fails, (size, error / eps, bad)


def test_units_do_not_loosen_a_gradient_that_does_not_vanish():
    ref = torch.randn(100, dtype=torch.float64)
    got = ref.float().clone()
    got[0] += 2 * ELEMENT_ULPS[torch.float32] * EPSILON[torch.float32] * ref.abs().max().item()
    for units in (None, {"g": 0.5 * ref.abs().max().item()}):
        assert "g" in reference_errors({"g": got}, {"g": ref}, torch.float32, units=units)[1]


def _writes_then_hangs(rank, out_dir):
    """A rank whose work is done (its output written) but whose teardown never ends."""
    import os
    import time

    with open(os.path.join(out_dir, f"{rank}.out"), "w") as f:
        f.write("done")
    if rank == 1:
        time.sleep(600)


def test_spawned_ranks_that_hang_in_teardown_are_ended(tmp_path):
    """spawn_ranks returns once every output exists and the ranks had teardown_s to exit, killing a rank that
    hangs after its work (torch's gloo teardown deadlock); ranks that never finish fail the test at timeout_s."""
    import time

    outputs = [str(tmp_path / f"{rank}.out") for rank in (0, 1)]
    start = time.monotonic()
    spawn_ranks(_writes_then_hangs, (str(tmp_path),), outputs, teardown_s=2, timeout_s=120)
    assert time.monotonic() - start < 60
    with pytest.raises(pytest.fail.Exception, match="still running after 3 s"):
        spawn_ranks(_writes_then_hangs, (str(tmp_path),), outputs + [str(tmp_path / "never")], timeout_s=3)
