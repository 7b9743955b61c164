"""PrioritizedReplay (SPEC §5) against the float64 reference: random interleavings of add, sample and update for every
structure and rule, sampling frequencies (chi-square), importance weights, duplicates, the sum tree against a
brute-force running sum, no host synchronisation, checkpoints and argument checks."""

import io
import math
import zlib

import pytest
import torch

from memtx_ops.reference import ReferencePrioritizedReplay, importance_weights, inverse_cdf, sampling_probabilities
from memtx_ops.replay import (CumsumSampler, HostSyncDetector, HostSyncError, LinearSchedule, PrioritizedReplay,
                              SumTree, make_structure)

# (structure, branching): the binary tree, a branching that leaves partial blocks, the default, cumsum + searchsorted
STRUCTURES = [("sum_tree", 2), ("sum_tree", 3), ("sum_tree", 16), ("cumsum", 16)]
STRUCTURE_IDS = ["tree2", "tree3", "tree16", "cumsum"]
RULES = ("loss", "loss_difference", "grad_norm")


def assert_tree_consistent(tree: SumTree):
    """Every node of both trees equals the brute-force sum (min) of the leaves below it; padding is 0 (+inf)."""
    b = tree.branching
    leaves = tree.sums[0]
    for k, (sums, mins) in enumerate(zip(tree.sums, tree.mins)):
        span = b ** k
        padded = torch.zeros(sums.numel() * span, dtype=torch.float64)
        padded[: leaves.numel()] = leaves
        want_sums = padded.view(-1, span).sum(1)
        padded_min = torch.full((mins.numel() * span,), math.inf, dtype=torch.float64)
        padded_min[: tree.capacity] = tree.mins[0][: tree.capacity]
        torch.testing.assert_close(sums, want_sums, rtol=1e-13, atol=0, msg=f"sum tree level {k}")
        assert torch.equal(mins, padded_min.view(-1, span).amin(1)), f"min tree level {k}"


def random_values(n, generator):
    return torch.randn(n, generator=generator, dtype=torch.float64) * 3


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("structure,branching", STRUCTURES, ids=STRUCTURE_IDS)
def test_matches_reference_over_random_interleavings(structure, branching, rule):
    """The same random calls to the buffer and to the reference give the same slots, examples, weights, priorities,
    last losses and largest priority; the sum tree stays equal to brute-force sums and draws what a brute-force
    running sum draws. Capacity 37 is no multiple of any branching; adds wrap the ring and exceed the capacity."""
    ops = torch.Generator().manual_seed(zlib.crc32(f"{structure}{branching}{rule}".encode()))  # fixed per case
    capacity, alpha = 37, 0.7
    buffer = PrioritizedReplay(capacity, alpha=alpha, beta=LinearSchedule(0.3, 1.0, 20), rule=rule,
                               structure=structure, branching=branching, seed=11)
    ref = ReferencePrioritizedReplay(capacity, alpha=alpha, beta=LinearSchedule(0.3, 1.0, 20), rule=rule)
    draws, ref_draws = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(60):
        op = int(torch.randint(0, 3, (), generator=ops)) if len(buffer) else 0
        if op == 0:
            k = int(torch.randint(1, 45, (), generator=ops))  # sometimes more than the capacity
            x = torch.randn(k, 2, 3, generator=ops)
            y = torch.randint(0, 100, (k,), generator=ops)
            priorities = torch.rand(k, generator=ops, dtype=torch.float64) * 5 + 0.1 if k % 3 == 0 else None
            losses = random_values(k, ops) if k % 2 == 0 else None
            slots = buffer.add((x, y), priorities, losses)
            assert torch.equal(slots, ref.add((x, y), priorities, losses)[-slots.numel():])
        elif op == 1:
            n = int(torch.randint(1, 30, (), generator=ops))
            got = buffer.sample(n, generator=draws)
            slots, examples, weights = ref.sample(n, ref_draws)
            assert torch.equal(got.indices, slots)
            assert all(torch.equal(a, b) for a, b in zip(got.examples, examples))
            assert got.weights.dtype == torch.float32
            torch.testing.assert_close(got.weights.double(), weights, rtol=2e-7, atol=0)
        else:
            n = int(torch.randint(1, 30, (), generator=ops))
            indices = torch.randint(0, len(buffer), (n,), generator=ops)  # duplicates included
            values = random_values(n, ops)
            buffer.update(indices, values)
            ref.update(indices, values)
        assert (buffer.position, len(buffer)) == (ref.position, ref.filled)
        torch.testing.assert_close(buffer.priorities, ref.priorities, rtol=1e-15, atol=0)
        torch.testing.assert_close(buffer.last_losses, ref.last_losses, rtol=0, atol=0, equal_nan=True)
        assert buffer.max_priority.item() == pytest.approx(ref.max_priority, rel=1e-15)
        torch.testing.assert_close(buffer.structure.masses, ref.priorities ** alpha, rtol=1e-14, atol=0)
        if isinstance(buffer.structure, SumTree):
            assert_tree_consistent(buffer.structure)
        uniforms = torch.rand(50, generator=ops, dtype=torch.float64)
        assert torch.equal(buffer.structure.draw(uniforms, len(buffer)),
                           inverse_cdf(ref.priorities[: ref.filled] ** alpha, uniforms))


@pytest.mark.parametrize("structure,branching", STRUCTURES, ids=STRUCTURE_IDS)
def test_sampling_frequencies_follow_priority_to_the_alpha(structure, branching):
    """200k draws over 23 slots of spread priorities: chi-square against p**alpha / sum below the 0.999 quantile
    (fixed seed); against the probabilities of a wrong alpha the same counts are far above it."""
    capacity, alpha, draws = 23, 0.6, 200_000
    buffer = PrioritizedReplay(capacity, alpha=alpha, structure=structure, branching=branching, seed=0)
    priorities = torch.logspace(-2, 2, capacity, dtype=torch.float64)
    buffer.add(torch.arange(capacity), priorities=priorities)
    counts = torch.zeros(capacity, dtype=torch.float64)
    for _ in range(draws // 10_000):
        counts += torch.bincount(buffer.sample(10_000).indices, minlength=capacity).double()

    def chi_square(probabilities):
        expected = draws * probabilities
        return ((counts - expected) ** 2 / expected).sum().item()

    quantile_999_df22 = 48.27  # chi-square 0.999 quantile, 22 degrees of freedom
    assert chi_square(sampling_probabilities(priorities, alpha)) < quantile_999_df22
    assert chi_square(sampling_probabilities(priorities, 0.55)) > 10 * quantile_999_df22  # the test has power
    torch.testing.assert_close(buffer.probabilities(), sampling_probabilities(priorities, alpha), rtol=1e-14, atol=0)


def test_importance_weights_follow_the_formula():
    """Priorities 1, 2, 4 with alpha 1 and beta 0.5: P = (1, 2, 4) / 7, w_i = (3 P_i)**-0.5 / (3 P_min)**-0.5 --
    the max over the buffer (slot 0), not over the batch, even when slot 0 is not drawn."""
    buffer = PrioritizedReplay(8, alpha=1.0, beta=0.5, structure="cumsum", seed=0)
    buffer.add(torch.arange(3), priorities=torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    draw = buffer.sample(64)
    want = torch.tensor([1.0, 0.5 ** 0.5, 0.25 ** 0.5], dtype=torch.float64)[draw.indices]
    torch.testing.assert_close(draw.weights.double(), want, rtol=1e-7, atol=0)
    torch.testing.assert_close(want, importance_weights(torch.tensor([1.0, 2.0, 4.0]), draw.indices, 1.0, 0.5))
    buffer.update(torch.tensor([0]), torch.tensor([8.0]))  # slot 1 is the least likely now
    draw = buffer.sample(256)
    want = torch.tensor([0.25 ** 0.5, 1.0, 0.5 ** 0.5], dtype=torch.float64)[draw.indices]
    assert (draw.indices == 1).any() and (draw.indices != 1).any()
    torch.testing.assert_close(draw.weights.double(), want, rtol=1e-6, atol=0)


def test_beta_is_annealed_by_its_schedule_per_sample_call():
    schedule = LinearSchedule(0.4, 1.0, steps=3)
    assert [schedule(s) for s in range(5)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])
    buffer = PrioritizedReplay(4, alpha=1.0, beta=schedule, seed=0)
    buffer.add(torch.arange(2), priorities=torch.tensor([1.0, 3.0], dtype=torch.float64))
    for step in range(5):
        assert buffer.current_beta() == pytest.approx(schedule(step))
        draw = buffer.sample(32)
        want = torch.where(draw.indices == 1, 3.0 ** -schedule(step), 1.0)  # (P_i / P_min) ** -beta
        torch.testing.assert_close(draw.weights.double(), want.double(), rtol=1e-6, atol=0)
    bad = PrioritizedReplay(4, beta=lambda step: 1.5)
    bad.add(torch.arange(2))
    with pytest.raises(ValueError, match=r"beta \(from the schedule\)"):
        bad.sample(1)


@pytest.mark.parametrize("structure", ["sum_tree", "cumsum"])
def test_duplicate_indices_take_the_last_value(structure):
    """One update with slot 3 three times and slot 5 once: slot 3 takes its last value; with the loss difference
    every difference is against the loss before the update."""
    buffer = PrioritizedReplay(8, alpha=1.0, rule="loss", structure=structure, eps=1e-3)
    buffer.add(torch.arange(8))
    buffer.update(torch.tensor([3, 3, 5, 3]), torch.tensor([1.0, -2.0, 3.0, -4.0]))
    assert buffer.priorities[3].item() == pytest.approx(4.001) and buffer.priorities[5].item() == pytest.approx(3.001)
    assert buffer.structure.masses[3].item() == pytest.approx(4.001)
    assert buffer.max_priority.item() == pytest.approx(4.001)

    diff = PrioritizedReplay(8, alpha=1.0, rule="loss_difference", structure=structure, eps=1e-3)
    diff.add(torch.arange(4), losses=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    diff.add(torch.arange(4))  # slots 4-7: no loss recorded
    diff.update(torch.tensor([2, 2, 6, 6]), torch.tensor([5.0, 1.5, 2.0, -3.0]))
    assert diff.priorities[2].item() == pytest.approx(0.501)      # |1.5 - 1| (its last occurrence, against before)
    assert diff.priorities[6].item() == pytest.approx(3.001)      # first visit: |-3|
    assert diff.last_losses[2].item() == 1.5 and diff.last_losses[6].item() == -3.0
    diff.update(torch.tensor([6]), torch.tensor([-1.0]))
    assert diff.priorities[6].item() == pytest.approx(2.001)      # |-1 - (-3)|


def test_new_examples_enter_with_the_largest_priority_seen():
    buffer = PrioritizedReplay(6, alpha=1.0, eps=1e-6)
    buffer.add(torch.arange(2))
    assert buffer.priorities[:2].tolist() == [1.0, 1.0]  # an empty buffer's largest priority is 1
    buffer.update(torch.tensor([0]), torch.tensor([7.0]))
    buffer.update(torch.tensor([0]), torch.tensor([0.5]))  # lower now; 7 stays the largest seen
    buffer.add(torch.arange(2))
    assert buffer.priorities[2:4].tolist() == pytest.approx([7.000001, 7.000001])
    buffer.add(torch.arange(1), priorities=torch.tensor([9.0]))
    buffer.add(torch.arange(1))
    assert buffer.priorities[5].item() == 9.0


def test_ring_overwrites_the_oldest_and_keeps_the_last_of_a_large_add():
    buffer = PrioritizedReplay(5, seed=0)
    assert buffer.add(torch.arange(3)).tolist() == [0, 1, 2]
    assert buffer.add(torch.arange(10, 14)).tolist() == [3, 4, 0, 1]
    assert buffer.examples().tolist() == [12, 13, 2, 10, 11] and buffer.position == 2 and len(buffer) == 5
    assert buffer.add(torch.arange(20, 32)).tolist() == [4, 0, 1, 2, 3]  # 12 examples: the last 5 stay
    assert buffer.examples().tolist() == [28, 29, 30, 31, 27] and buffer.position == 4
    single = buffer.sample(3)
    assert isinstance(single.examples, torch.Tensor) and single.examples.shape == (3,)


@pytest.mark.parametrize("structure", ["sum_tree", "cumsum"])
def test_alpha_zero_samples_uniformly_with_unit_weights(structure):
    buffer = PrioritizedReplay(10, alpha=0.0, beta=1.0, structure=structure, seed=1)
    buffer.add(torch.arange(10), priorities=torch.logspace(-3, 3, 10))
    draw = buffer.sample(50_000)
    counts = torch.bincount(draw.indices, minlength=10).double()
    assert ((counts - 5000) ** 2 / 5000).sum() < 27.88  # chi-square 0.999 quantile, 9 degrees of freedom
    assert torch.equal(draw.weights, torch.ones(50_000))


def test_detector_sees_the_host_syncing_ops():
    """Positive controls: each of these ops makes the host read device data, and the detector reports it."""
    x = torch.tensor([1.0, 0.0, 2.0])
    cases = {"item": lambda: x.sum().item(), "bool": lambda: bool(x[0] > 0), "float": lambda: float(x[0]),
             "nonzero": lambda: x.nonzero(), "mask": lambda: x[x > 0], "masked_select": lambda: x.masked_select(x > 0),
             "unique": lambda: torch.unique(x), "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
             "bincount": lambda: torch.bincount(torch.tensor([1, 2])), "equal": lambda: torch.equal(x, x)}
    for name, call in cases.items():
        with HostSyncDetector() as detector:
            call()
        assert detector.syncs, name
        with pytest.raises(HostSyncError):
            with HostSyncDetector(raise_on_sync=True):
                call()
    with HostSyncDetector() as detector:  # and these do not
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        x.cumsum(0).amax()
        torch._assert_async(torch.tensor(True), "fine")
    assert detector.syncs == []


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("structure", ["sum_tree", "cumsum"])
def test_add_sample_update_never_sync_with_the_host(structure, rule):
    buffer = PrioritizedReplay(50, rule=rule, structure=structure, device="cpu", seed=0)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4), torch.randint(0, 5, (30, 7))
    with HostSyncDetector(raise_on_sync=True):
        buffer.add((x, y))
        buffer.add((x, y), priorities=torch.rand(30) + 0.5, losses=torch.rand(30))  # wraps the ring
        for _ in range(3):
            draw = buffer.sample(16)
            buffer.update(torch.cat([draw.indices, draw.indices[:4]]), torch.rand(20))
            draw = buffer.sample(5, generator=generator)
            buffer.update(draw.indices.int(), torch.rand(5, dtype=torch.float32))


def test_lazy_buffer_takes_the_device_of_its_first_examples_and_never_syncs():
    buffer = PrioritizedReplay(10)
    with HostSyncDetector(raise_on_sync=True):
        buffer.add(torch.ones(3, 2))
        buffer.update(buffer.sample(2).indices, torch.ones(2))
    assert buffer.device == torch.device("cpu")


@pytest.mark.parametrize("structure", ["sum_tree", "cumsum"])
def test_state_dict_resumes_exactly(structure):
    """A buffer restored (through torch.save) from another's state_dict goes on with the same draws, weights and
    priorities, bit for bit: examples, priorities, last losses, tree, ring position and generator state."""
    def build():
        return PrioritizedReplay(20, alpha=0.8, beta=LinearSchedule(0.4, 1.0, 10), rule="loss_difference",
                                 structure=structure, branching=4, seed=3)

    buffer = build()
    buffer.add((torch.randn(26, 3), torch.arange(26)), losses=torch.randn(26))
    for _ in range(4):
        draw = buffer.sample(8)
        buffer.update(draw.indices, torch.randn(8))
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = build()
    restored.load_state_dict(torch.load(saved, weights_only=False))
    for _ in range(4):
        a, b = buffer.sample(8), restored.sample(8)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
        assert all(torch.equal(u, v) for u, v in zip(a.examples, b.examples))
        values, new = torch.randn(8), (torch.randn(3, 3), torch.arange(3))
        for each in (buffer, restored):
            each.update(a.indices, values)
            each.add(new, losses=values[:3])
    for name in ("priorities", "last_losses", "max_priority"):
        assert torch.equal(getattr(buffer, name), getattr(restored, name)), name
    assert (buffer.position, len(buffer), buffer.samples_drawn) == (restored.position, len(restored),
                                                                     restored.samples_drawn)


def test_state_dict_resumes_exactly_through_every_operation():
    """The same, with adds after the restore, and the restore refused for a buffer of other settings."""
    def build(**kw):
        return PrioritizedReplay(16, alpha=0.5, rule="loss", structure="sum_tree", branching=2, seed=7, **kw)

    buffer = build()
    buffer.add(torch.randn(10, 2))
    buffer.update(buffer.sample(5).indices, torch.rand(5) * 4)
    restored = build()
    restored.load_state_dict(buffer.state_dict())
    feed = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, v = torch.randn(4, 2, generator=feed), torch.rand(6, generator=feed)
        buffer.add(x)
        restored.add(x)
        a, b = buffer.sample(6), restored.sample(6)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
        buffer.update(a.indices, v)
        restored.update(b.indices, v)
    assert torch.equal(buffer.priorities, restored.priorities)
    assert torch.equal(buffer.examples(), restored.examples())
    with pytest.raises(ValueError, match="other settings"):
        PrioritizedReplay(16, alpha=0.6, structure="sum_tree", branching=2).load_state_dict(buffer.state_dict())
    with pytest.raises(ValueError, match="structure"):
        PrioritizedReplay(16, alpha=0.5, structure="cumsum").load_state_dict(buffer.state_dict())


@pytest.mark.parametrize("structure", ["sum_tree", "cumsum"])
def test_state_dict_is_a_snapshot_that_later_calls_leave_alone(structure):
    """A state kept in memory (no torch.save) restores the buffer as it was when taken: it holds copies, not the live
    tensors that later adds and updates change in place (the same buffer, restored, drew other slots), and only the
    filled slots' examples (a view saved the whole storage with them)."""
    buffer = PrioritizedReplay(1000, alpha=0.7, structure=structure, branching=2, seed=5)
    buffer.add(torch.arange(30.0)[:, None].expand(30, 4).clone())
    state = buffer.state_dict()
    assert state["storage"][0].untyped_storage().nbytes() == 30 * 4 * 4

    def steps():
        draws, feed = [], torch.Generator().manual_seed(2)
        for _ in range(5):
            draw = buffer.sample(6)
            draws.append(draw.indices)
            buffer.update(draw.indices, torch.rand(6, generator=feed) * 5)
            buffer.add(torch.randn(3, 4, generator=feed))
        return torch.cat(draws), buffer.examples().clone(), buffer.priorities.clone()

    first = steps()
    buffer.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first, steps()))


def test_examples_are_stored_without_their_autograd_history():
    """Examples computed with grad are stored detached: replaying them neither reaches the model that made them nor
    backpropagates through a freed graph a step later."""
    encoder = torch.nn.Linear(3, 3)
    buffer = PrioritizedReplay(8, seed=0)
    for _ in range(3):
        buffer.add(encoder(torch.randn(2, 3)))
        replayed = buffer.sample(4)
        assert not replayed.examples.requires_grad and not buffer.examples().requires_grad
        (replayed.weights[:, None] * replayed.examples * torch.ones(3, requires_grad=True)).sum().backward()
    assert encoder.weight.grad is None


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_buffer_filled_or_loaded_under_inference_mode_works_outside_it(device):
    """The buffer's state is allocated as normal tensors even when its first add, or a load_state_dict into a fresh
    buffer, runs under torch.inference_mode: later adds and updates outside it write to them in place (inference
    tensors refused that)."""
    source = PrioritizedReplay(8, rule="loss_difference", seed=0)
    source.add(torch.randn(3, 2), losses=torch.rand(3))
    buffers = [PrioritizedReplay(8, rule="loss_difference", device=device, seed=0) for _ in range(2)]
    with torch.inference_mode():
        buffers[0].add(torch.randn(3, 2), losses=torch.rand(3))
        buffers[1].load_state_dict(source.state_dict())
    for buffer in buffers:
        buffer.add(torch.randn(2, 2), losses=torch.rand(2))
        buffer.update(buffer.sample(4).indices, torch.rand(4))
        assert len(buffer) == 5 and buffer.examples().shape == (5, 2)


def test_loading_an_empty_state_empties_a_used_buffer():
    """The state of a buffer that never held an example, loaded into one that did, leaves no mass behind: every draw
    lands on an example added afterwards (the sum tree kept the old masses and drew removed slots)."""
    for structure in ("sum_tree", "cumsum"):
        buffer = PrioritizedReplay(10, structure=structure, seed=1)
        buffer.add(torch.randn(10, 2))
        buffer.load_state_dict(PrioritizedReplay(10, structure=structure, seed=1).state_dict())
        assert len(buffer) == 0 and buffer.examples() is None
        buffer.add(torch.ones(1, 2))
        assert torch.equal(buffer.sample(50).indices, torch.zeros(50, dtype=torch.long))


def test_masses_whose_sum_overflows_are_refused():
    """Priorities whose masses are each finite but sum to inf are refused before anything is written (an infinite
    total sent every draw to the least likely slot)."""
    for structure in ("sum_tree", "cumsum"):
        buffer = PrioritizedReplay(4, alpha=1.0, structure=structure, seed=0)
        buffer.add(torch.zeros(1, 1), priorities=torch.tensor([1e308], dtype=torch.float64))
        with pytest.raises(RuntimeError, match="its sum with the masses held"):
            buffer.add(torch.zeros(2, 1), priorities=torch.tensor([1e308, 1.0], dtype=torch.float64))
        with pytest.raises(RuntimeError, match="its sum with the masses held"):
            buffer.update(torch.tensor([0]), torch.tensor([1e308], dtype=torch.float64))
        assert len(buffer) == 1 and buffer.structure.total.isfinite()


def test_adding_the_buffers_own_examples_back_copies_them_first():
    """``add(buffer.examples())`` (views of the storage) across the ring's wrap reads every example before the first
    write overwrites it."""
    buffer = PrioritizedReplay(4, seed=0)
    buffer.add(torch.tensor([0.0, 1.0, 2.0, 3.0])[:, None])
    buffer.add(torch.tensor([4.0, 5.0])[:, None])  # slots 0, 1: [4, 5, 2, 3], the ring at slot 2
    buffer.add(buffer.examples())
    assert buffer.examples().squeeze(1).tolist() == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("capacity", [1, 2, 15, 16, 17, 257])
def test_sum_tree_levels_and_draws_at_block_boundaries(capacity):
    """Capacities at and across powers of the branching: the levels shrink to one root, every draw lands on a
    filled slot (also for targets at the total), and min_mass is that of the filled slots."""
    tree = SumTree(capacity, "cpu", branching=4)
    assert tree.sums[-1].numel() == 4 and all(t.numel() % 4 == 0 for t in tree.sums)
    filled = max(1, capacity // 2)
    masses = torch.rand(filled, dtype=torch.float64) + 0.01
    tree.set(torch.arange(filled), masses)
    assert_tree_consistent(tree)
    uniforms = torch.cat([torch.rand(200, dtype=torch.float64), torch.tensor([0.0, 1 - 2**-53])])
    slots = tree.draw(uniforms, filled)
    assert torch.equal(slots, inverse_cdf(masses, uniforms))
    assert int(slots.max()) < filled
    assert tree.min_mass(filled).item() == masses.min().item()
    cumsum = CumsumSampler(capacity, "cpu")
    cumsum.set(torch.arange(filled), masses)
    assert torch.equal(cumsum.draw(uniforms, filled), slots)


def test_structures_refuse_capacities_below_one():
    """A capacity below 1 is refused by name (the sum tree's level loop never reached its one-node root: a hang)."""
    for build in (lambda c: SumTree(c, "cpu"), lambda c: CumsumSampler(c, "cpu"),
                  lambda c: make_structure("sum_tree", c, "cpu"), lambda c: make_structure("auto", c, "cpu")):
        for capacity in (0, -3, 2.0, True, None):
            with pytest.raises(ValueError, match="capacity must be an int >= 1"):
                build(capacity)


def test_auto_structure_follows_the_capacity_crossover():
    from memtx_ops.replay import SUM_TREE_FROM

    assert isinstance(make_structure("auto", SUM_TREE_FROM["cpu"] - 1, "cpu"), CumsumSampler)
    assert isinstance(make_structure("auto", SUM_TREE_FROM["cpu"], "cpu"), SumTree)


def test_seed_device_and_state_are_checked_by_name():
    """A seed outside torch.Generator's range (the first add overflowed), a device that cannot hold a buffer that
    samples (meta, a bad name: torch's RuntimeError) and a state that is no dict (AttributeError) are refused
    naming the argument; the seeds at the ends of the range and a device name that tensors report otherwise
    ("cpu:0" -> cpu: the examples were refused as on another device) work."""
    for seed in (2**64, -2**63 - 1, 2**70):
        with pytest.raises(ValueError, match="seed must be in"):
            PrioritizedReplay(4, seed=seed)
    for seed in (2**64 - 1, -2**63):
        PrioritizedReplay(4, seed=seed).add(torch.zeros(1, 2))
    for device in ("meta", torch.device("meta"), "nope", 1.5):
        with pytest.raises(ValueError, match="^device"):
            PrioritizedReplay(4, device=device)
    with pytest.raises(ValueError, match="^examples: the meta device"):
        PrioritizedReplay(4).add(torch.zeros(1, 2, device="meta"))
    buffer = PrioritizedReplay(4, device="cpu:0", seed=0)
    buffer.add(torch.zeros(1, 2))
    assert buffer.device == torch.device("cpu")
    for state in (None, [("capacity", 4)]):
        with pytest.raises(TypeError, match="state must be a dict"):
            buffer.load_state_dict(state)


def test_bad_arguments_raise_before_any_work():
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplay(0)
    with pytest.raises(ValueError, match="alpha"):
        PrioritizedReplay(4, alpha=-1)
    with pytest.raises(ValueError, match="beta"):
        PrioritizedReplay(4, beta=1.5)
    with pytest.raises(ValueError, match="rule"):
        PrioritizedReplay(4, rule="td_error")
    with pytest.raises(ValueError, match="eps"):
        PrioritizedReplay(4, eps=0)
    for name, value in (("alpha", math.inf), ("eps", math.inf), ("alpha", math.nan)):
        with pytest.raises(ValueError, match=name):
            PrioritizedReplay(4, **{name: value})
    with pytest.raises(ValueError, match=r"eps \*\* alpha"):
        PrioritizedReplay(4, eps=1e-200, alpha=2.0)  # the mass of a zero loss would underflow to 0
    with pytest.raises(ValueError, match="structure"):
        PrioritizedReplay(4, structure="heap")
    with pytest.raises(ValueError, match="branching"):
        PrioritizedReplay(4, branching=1)
    with pytest.raises(ValueError, match="start"):
        LinearSchedule(1.2)
    buffer = PrioritizedReplay(4, seed=0)
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(2)
    with pytest.raises(ValueError, match="empty"):
        buffer.update(torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="examples"):
        buffer.add([1, 2])
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        buffer.add((torch.zeros(3), torch.zeros(2)))
    buffer.add((torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"examples\[0\] must be \[k, 2\]"):
        buffer.add((torch.zeros(3, 5), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(TypeError, match="structure"):
        buffer.add(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"priorities must be a real tensor \[3\]"):
        buffer.add((torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)), priorities=torch.ones(2))
    with pytest.raises(RuntimeError, match="positive"):
        buffer.add((torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), priorities=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="n must be"):
        buffer.sample(0)
    with pytest.raises(TypeError, match="generator"):
        buffer.sample(2, generator=1)
    with pytest.raises(TypeError, match="indices"):
        buffer.update(torch.tensor([0.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"values must be a real tensor \[2\]"):
        buffer.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="filled slots"):
        buffer.update(torch.tensor([0, 3]), torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="finite"):
        buffer.update(torch.tensor([0]), torch.tensor([math.nan]))
    with pytest.raises(RuntimeError, match=r"priority \*\* alpha"):  # 1e300 ** 0.6 is finite, but not **2
        PrioritizedReplay(4, alpha=2.0, seed=0).add(torch.zeros(1, 2), priorities=torch.tensor([1e300], dtype=torch.float64))
    squaring = PrioritizedReplay(4, alpha=2.0, rule="loss_difference", seed=0)
    squaring.add(torch.zeros(2, 2), losses=torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match=r"priority \*\* alpha"):
        squaring.update(torch.tensor([0]), torch.tensor([1e300], dtype=torch.float64))
    assert squaring.last_losses[:2].tolist() == [0.5, 0.5]
    assert buffer.priorities[:3].tolist() == [1.0, 1.0, 1.0]  # nothing was written by the failed calls
