"""Segment replay of the char-LM example (examples/char_lm_replay.py): a replayed segment, its memory rebuilt from
the stored window (or the stored memory), has the loss it had when fresh; the step's loss is the weighted mean of
the per-segment losses of its one forward; the priorities come from those losses or from the output layer's
per-example gradient norm."""

import argparse
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from memtx_ops.nn import HourglassTransformerXL, TransformerXL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example_module():
    spec = importlib.util.spec_from_file_location("char_lm_replay", os.path.join(ROOT, "examples", "char_lm_replay.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not put in sys.modules: nothing global changes
    return module


char_lm_replay = load_example_module()
L = M = 8


def tiny_model(layout=None):
    """A 2-layer flat model, or an hourglass one of ``layout`` (its levels and resampling states keep other memory
    lengths than M)."""
    torch.manual_seed(0)
    options = dict(n_head=2, d_model=16, d_head=8, d_inner=32, dropout=0.0, mem_len=M)
    if layout is not None:
        return HourglassTransformerXL(20, layout, upsample="linear", **options).eval()
    return TransformerXL(20, n_layer=2, **options).eval()


def own_losses(model, inputs, targets, memory):
    """Each segment's mean token loss, by a forward of those segments alone -> [B]."""
    hidden, _ = model.hidden_states(inputs, memory)
    logits = model.logits(hidden)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


class Recorder:
    """Wraps a buffer's add, sample and update (pytest's monkeypatch undoes it) and keeps what went through."""

    def __init__(self, buffer, monkeypatch):
        self.added, self.drawn, self.updated = [], [], []
        for name, log in (("add", self.added), ("sample", self.drawn), ("update", self.updated)):
            method = getattr(buffer, name)

            def spy(*args, _method=method, _log=log, **kwargs):
                result = _method(*args, **kwargs)
                _log.append((args, kwargs, result))
                return result

            monkeypatch.setattr(buffer, name, spy)


def run_three_steps(context, rule, monkeypatch, layout=None):
    """Segments 0, 1, 2 of three fresh streams (batch 4, one replayed): 0 has no memory, 1 is stored, 2 replays
    a segment 1 -> (model, streams, replay, recorder, per-step (loss, memory in))."""
    model = tiny_model(layout)
    streams = torch.randint(0, 20, (3, 4 * L + 1), generator=torch.Generator().manual_seed(1))
    replay = char_lm_replay.SegmentReplay(batch_size=4, fraction=0.25, capacity=16, rule=rule, tgt_len=L, mem_len=M,
                                          device="cpu", steps=10, context=context, seed=0)
    recorder = Recorder(replay.buffer, monkeypatch)
    memory, steps = None, []
    for index in range(3):
        loss, logged, next_memory = replay.train_loss(model, streams, index, memory)
        steps.append((loss, logged, memory))
        memory = next_memory
    return model, streams, replay, recorder, steps


@pytest.mark.parametrize("context,layout", [("window", None), ("memory", None), ("window", "1@1 1@2 1@1")],
                         ids=["window", "memory", "hourglass-window"])
def test_replayed_segment_has_its_fresh_loss_and_the_step_is_the_weighted_mean(context, layout, monkeypatch):
    """An hourglass model's memory is full when each entry holds what its level keeps (it never was, for a check
    against mem_len: nothing was stored or replayed)."""
    model, streams, replay, recorder, steps = run_three_steps(context, "loss", monkeypatch, layout)
    assert len(recorder.added) == 2 and len(recorder.drawn) == 1 and len(recorder.updated) == 1  # steps 1, 2 store
    (_, add_kwargs, slots), = recorder.added[:1]
    fresh_losses_at_1 = add_kwargs["losses"]
    drawn = recorder.drawn[0][2]
    slot = int(drawn.indices[0])
    stream = int((slots == slot).nonzero())                       # the stream whose segment 1 was replayed
    (_, replayed_values), _, _ = recorder.updated[0]
    # with L = M the window of segment 1 is segment 0, so the rebuilt memory is the one segment 1 had when fresh
    torch.testing.assert_close(replayed_values, fresh_losses_at_1[stream:stream + 1], rtol=1e-5, atol=0)
    assert replay.buffer.priorities[slot].item() == pytest.approx(fresh_losses_at_1[stream].item() + 1e-6, rel=1e-5)
    # the step's loss: mean over the 4 segments of w * loss, fresh weights 1
    loss, logged, memory_in = steps[2]
    start = 2 * L
    fresh = own_losses(model, streams[:, start:start + L], streams[:, start + 1:start + L + 1], memory_in)
    want = (fresh.sum() + drawn.weights[0] * replayed_values[0]) / 4
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(logged, fresh.mean(), rtol=1e-5, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_grad_norm_priority_is_the_output_layers_per_example_gradient_norm(monkeypatch):
    model, streams, replay, recorder, _ = run_three_steps("window", "grad_norm", monkeypatch)
    slot = int(recorder.drawn[0][2].indices[0])
    stream = int((recorder.added[0][2] == slot).nonzero())
    _, memory = model.hidden_states(streams[stream:stream + 1, :L], model.empty_memory(1))
    hidden, _ = model.hidden_states(streams[stream:stream + 1, L:2 * L], memory)
    weight = model.word_emb.weight.detach().clone().requires_grad_()
    bias = model.out_bias.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(hidden.detach()[0], weight, bias), streams[stream, L + 1:2 * L + 1])
    dw, db = torch.autograd.grad(loss, (weight, bias))
    want = (dw.pow(2).sum() + db.pow(2).sum()).sqrt().item()
    assert replay.buffer.priorities[slot].item() == pytest.approx(want + 1e-6, rel=1e-4)


def test_stored_memories_need_one_mem_len_entry_per_layer():
    replay = char_lm_replay.SegmentReplay(batch_size=4, fraction=0.25, capacity=16, rule="loss", tgt_len=L,
                                          mem_len=M, device="cpu", steps=10, context="memory")
    with pytest.raises(ValueError, match=r"context='memory' .* keep \[8, 4, 8, 1, 1\] rows: use context='window'"):
        replay.train_loss(tiny_model("1@1 1@2 1@1"), torch.randint(0, 20, (3, 4 * L + 1)), 0, None)


def test_no_replay_before_the_memory_is_full_and_the_batch_is_the_fresh_streams_then():
    model = tiny_model()
    streams = torch.randint(0, 20, (3, 4 * L + 1))
    replay = char_lm_replay.SegmentReplay(batch_size=4, fraction=0.25, capacity=16, rule="loss", tgt_len=L,
                                          mem_len=M, device="cpu", steps=10)
    loss, logged, memory = replay.train_loss(model, streams, 0, None)
    assert len(replay.buffer) == 0 and memory[0].hidden.shape == (3, M, 16)
    torch.testing.assert_close(loss, logged)
    with pytest.raises(ValueError, match="streams"):
        replay.train_loss(model, streams[:2], 1, None)


def test_replayed_count_and_flags():
    assert char_lm_replay.replayed_count(0.25, 8) == 2 and char_lm_replay.replayed_count(0.25, 2) == 1
    for fraction, batch in ((1.0, 8), (0.1, 2), (-0.1, 8), (0.9, 2)):
        with pytest.raises(ValueError, match="replay fraction"):
            char_lm_replay.replayed_count(fraction, batch)
    args = argparse.Namespace(replay_fraction=0.25, replay_segments=0, skip_retain_p=0.5, batch_size=8,
                              replay_capacity=10, priority="loss", replay_alpha=0.6, tgt_len=L, mem_len=M, steps=10,
                              seed=0)
    with pytest.raises(SystemExit, match="does not combine"):
        char_lm_replay.replay_from_args(args, "cpu")
    args.skip_retain_p, args.batch_size = 0.0, 1
    with pytest.raises(SystemExit, match="replay-fraction"):
        char_lm_replay.replay_from_args(args, "cpu")
    assert char_lm_replay.replay_from_args(argparse.Namespace(replay_fraction=0.0), "cpu") is None
