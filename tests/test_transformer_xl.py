"""TransformerXL model: memory bookkeeping, options, fused vs reference backend, memory replay = BPTT."""

import pytest
import torch

from helpers import assert_replay_equals_bptt, backend_forward_calls
from memtx_ops.nn import Dropout, TransformerXL
from memtx_ops.nn.transformer_xl import PositionwiseFF


def small_model(**kwargs):
    torch.manual_seed(0)
    cfg = dict(n_token=31, n_layer=3, n_head=2, d_model=16, d_head=8, d_inner=32, mem_len=8, dropout=0.0)
    cfg.update(kwargs)
    return TransformerXL(**cfg).double()


def segments(T, B=2, L=8, n_token=31, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randint(0, n_token, (B, L), generator=gen) for _ in range(T)],
            [torch.randint(0, n_token, (B, L), generator=gen) for _ in range(T)])


def test_forward_shapes_and_memory_length():
    model = small_model(mem_len=12)
    xs, ys = segments(3)
    memory = None
    for t, x in enumerate(xs):
        logits, memory = model(x, memory)
        assert logits.shape == (2, 8, 31)
        assert [m.hidden.shape[1] for m in memory] == [min(12, 8 * (t + 1))] * 3
        assert all(not m.hidden.requires_grad for m in memory)  # detached, as in Transformer-XL
    loss, _ = model(xs[0], memory, ys[0])
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("dropout_backend", ["auto", "cpu", "torch"])
def test_dropout_backend_reaches_every_dropout(dropout_backend):
    model = small_model(dropout=0.1, dropout_backend=dropout_backend)
    drops = [m for m in model.modules() if isinstance(m, Dropout)]
    assert len(drops) == 1 + 3 * model.n_layer  # embedding/output, and per layer: attention out, FF inner, FF out
    assert {d.backend for d in drops} == {dropout_backend}
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())  # dropatt=0: never used
    torch.manual_seed(5)
    loss_a, _ = model(*segments(1)[0], None, segments(1)[1][0])
    torch.manual_seed(5)
    loss_b, _ = model(*segments(1)[0], None, segments(1)[1][0])
    assert loss_a == loss_b  # the masks follow torch's generator


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_feed_forward_fuses_relu_and_dropout_with_the_same_masks(pre_lnorm):
    torch.manual_seed(0)
    ff = PositionwiseFF(16, 64, 0.3, pre_lnorm, dropout_backend="cpu").double()
    x = torch.randn(9, 2, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 2, 16, dtype=torch.float64)

    def unfused(t):  # CoreNet layer by layer (ReLU, then a memtx Dropout drawing the same seed)
        return t + ff.CoreNet(ff.layer_norm(t)) if pre_lnorm else ff.layer_norm(t + ff.CoreNet(t))

    results = []
    for forward in (ff, unfused):
        torch.manual_seed(3)
        y = forward(x)
        y.backward(g)
        results.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in ff.parameters()])
        x.grad = None
        ff.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("options", [dict(), dict(same_length=True, clamp_len=5), dict(pre_lnorm=True)],
                         ids=["plain", "same_length+clamp", "pre_lnorm"])
def test_fused_backend_equals_reference_backend(options):
    xs, ys = segments(3)
    results = []
    for backend in ("cpu", "reference"):
        model = small_model(backend=backend, **options)
        memory, total = None, 0
        for x, y in zip(xs, ys):
            loss, memory = model(x, memory, y)
            total = total + loss
        total.backward()
        results.append((total.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dropout_backend", ["cpu", "torch"])
def test_training_with_dropout_reads_every_dropped_position_row(monkeypatch, dropout_backend):
    """Transformer-XL drops each row of its clamped position table apart (drop(pos_emb)): in training with dropout,
    every distance past the clamp reads its own dropped row, so the model equals its layers run on all rows
    (clamp_len=-1 handed to every layer); a layer that read one row for all of them gave another loss."""
    from memtx_ops.nn.transformer_xl import DecoderLayer

    xs, ys = segments(2, L=10)
    layer_forward = DecoderLayer.forward
    results = []
    for unclamped in (False, True):
        if unclamped:
            monkeypatch.setattr(DecoderLayer, "forward", lambda self, h, pos_emb, mems, window, clamp_len, *args:
                                layer_forward(self, h, pos_emb, mems, window, -1, *args))
        model, memory, total = small_model(clamp_len=3, dropout=0.3, dropout_backend=dropout_backend), None, 0
        torch.manual_seed(7)
        for x, y in zip(xs, ys):
            loss, memory = model(x, memory, y)
            total = total + loss
        total.backward()
        results.append([total.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cpu_autocast_runs_the_fused_kernel(monkeypatch):
    """Under CPU autocast to bfloat16 the attention gets bfloat16 q, k, v: backend "auto" runs the C++ kernel (in
    float32, on copies), not the eager path, and the loss is the float64 model's to bfloat16 precision."""
    calls = backend_forward_calls("cpu", monkeypatch)
    xs, ys = segments(2, L=24)
    losses = []
    for dtype, autocast in ((torch.float64, False), (torch.float32, True)):
        model, memory, total = small_model(backend="auto", d_model=32, d_head=16).to(dtype), None, 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for x, y in zip(xs, ys):
                loss, memory = model(x, memory, y)
                total = total + loss
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        losses.append(total.item())
    # 3 layers x 2 segments each
    assert [args[0].dtype for args in calls] == [torch.float64] * 6 + [torch.float32] * 6
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0])


def test_skip_retain_ages_memory_and_finetune_never_skips():
    model = small_model(skip_retain_p=1.0, skip_schedule="uniform", phase="finetune")
    xs, _ = segments(4)
    _, memory = model(xs[0])  # fills every memory
    written = [m.hidden for m in memory]
    model.set_phase("pretrain")  # now every layer but the last skips
    for x in xs[1:3]:
        _, memory = model(x, memory)
    assert [m.age for m in memory] == [3, 3, 1]
    assert [m.mem_offset for m in memory] == [16, 16, 0]
    assert memory[0].hidden is written[0] and memory[1].hidden is written[1]
    model.eval()  # evaluation never skips
    _, memory = model(xs[3], memory)
    assert [m.age for m in memory] == [1, 1, 1]


@pytest.mark.parametrize("cross_head_p", [0.0, 0.5])
def test_replay_segments_equal_bptt_with_dropout(cross_head_p):
    model = small_model(dropout=0.2, cross_head_p=cross_head_p)
    xs, ys = segments(6)
    assert_replay_equals_bptt(model, xs, ys)


def test_replay_segments_rejects_skip_retain_pretraining():
    model = small_model(skip_retain_p=0.5)
    xs, ys = segments(2)
    with pytest.raises(ValueError, match="skip-retain changes the memory's structure"):
        model.replay_segments(xs, ys)


def test_replay_segments_from_an_aged_memory_reads_it_at_its_offset():
    """Fine-tuning goes on from the pre-training memory, whose skipped layers kept an aged memory (full already):
    the first replayed segment reads it at mem_offset = (g - 1) L (SPEC §2) and keeps the layer input alone, as the
    forward does; memory replay had rebuilt it as a fresh memory (offset 0) and kept its rows."""
    model = small_model(skip_retain_p=1.0, skip_schedule="uniform", phase="finetune")
    xs, ys = segments(4)
    _, memory = model(xs[0])
    model.set_phase("pretrain")
    _, memory = model(xs[1], memory)
    assert [(m.age, m.mem_offset) for m in memory] == [(2, 8), (2, 8), (1, 0)]
    model.set_phase("finetune")
    model.zero_grad()
    losses, after = model.replay_segments(xs[2:], ys[2:], memory)
    sum(losses).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, plain = [], memory
    for x, y in zip(xs[2:], ys[2:]):
        loss, plain = model(x, plain, y)
        expected.append(loss)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-12, atol=1e-12)
    for a, b in zip(after, plain):
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-12, atol=1e-12)
    assert all(g is not None for g in got)


def test_bad_probabilities_and_phase_are_refused():
    for name in ("cross_head_p", "skip_retain_p"):
        for p in (-0.5, float("nan"), 1.5):
            with pytest.raises(ValueError, match=f"{name} must be a probability in \\[0, 1\\]"):
                small_model(**{name: p})
    with pytest.raises(ValueError, match="phase must be one of"):
        small_model(phase="bogus")
    with pytest.raises(ValueError, match="phase must be one of"):
        small_model().set_phase("bogus")


def test_cross_head_and_skip_retain_leave_initial_weights_and_global_generator_alone():
    """With one seed, a model with cross-head and skip-retain gets the weights of one without them and leaves torch's
    generator where that one does (each seeded its generator by drawing from it, so every later layer's weights and
    every dropout mask moved); its own generators follow the seed and draw apart."""
    built = []
    for options in (dict(), dict(cross_head_p=0.3, skip_retain_p=0.5)):
        torch.manual_seed(4)
        model = TransformerXL(31, n_layer=3, n_head=2, d_model=16, d_head=8, d_inner=32, **options)
        built.append((model, torch.get_rng_state()))
    (plain, plain_after), (options, options_after) = built
    assert torch.equal(plain_after, options_after)
    for (name, a), b in zip(plain.state_dict().items(), options.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(4)
    again = TransformerXL(31, n_layer=3, n_head=2, d_model=16, d_head=8, d_inner=32, cross_head_p=0.3,
                          skip_retain_p=0.5)
    state, state_again = options.random_state(), again.random_state()
    generators = state["cross_head"] + [state["skip_retain"]]
    assert all(torch.equal(a, b) for a, b in zip(generators, state_again["cross_head"] + [state_again["skip_retain"]]))
    assert len({bytes(g.numpy()) for g in generators}) == len(generators)


def test_float64_position_tables_are_computed_in_float64():
    """sinusoid_positions of a float64 model: float64 angles (float32 ones were 2e-4 off at distance 4000)."""
    import math

    from memtx_ops.nn.transformer_xl import sinusoid_positions

    table = sinusoid_positions(4001, 8, -1, "cpu", torch.float64)
    assert table.dtype == torch.float64
    assert abs(table[0, 0, 0].item() - math.sin(4000.0)) < 1e-12


def bad_memories(model, memory):
    """(name, memory, error, message) of memories that do not fit the model of test_memory_must_match_the_model."""
    from memtx_ops.nn import LayerMemory

    h = memory[0].hidden
    return [
        ("shorter list", memory[:-1], ValueError, r"one LayerMemory per layer \(n_layer=3\), got 2 entries"),
        ("longer list", memory + memory[:1], ValueError, r"n_layer=3\), got 4 entries"),
        ("not a list", memory[0], ValueError, r"got LayerMemory"),
        ("tensor entry", [m.hidden for m in memory], TypeError, r"memory\[0\] must be a LayerMemory, got Tensor"),
        ("batch", [LayerMemory(m.hidden[:1]) for m in memory], ValueError, r"memory\[0\].hidden must have shape \[B=2"),
        ("d_model", [LayerMemory(torch.zeros(2, 8, 7, dtype=h.dtype)) for _ in memory], ValueError,
         r"d_model=16\], got \(2, 8, 7\)"),
        ("rank", [LayerMemory(m.hidden[0]) for m in memory], ValueError, r"must have shape \[B=2, M, d_model=16\]"),
        ("integer memory", [LayerMemory(m.hidden.long()) for m in memory], TypeError,
         r"memory\[0\].hidden must have the model's dtype torch.float64 .*, got torch.int64"),
        ("float32 memory", [LayerMemory(m.hidden.float()) for m in memory], TypeError,
         r"model's dtype torch.float64 .*, got torch.float32"),
        ("float offset", [LayerMemory(m.hidden, 1, 1.5) for m in memory], ValueError,
         r"memory\[0\].mem_offset must be an int >= 0, got 1.5"),
        ("age 0", [LayerMemory(m.hidden, 0) for m in memory], ValueError, r"memory\[0\].age must be an int >= 1"),
        ("device", [LayerMemory(m.hidden.to("meta")) for m in memory], ValueError, r"memory\[0\] is on meta"),
    ]


def test_a_forward_under_a_fake_mode_leaves_no_fake_table_behind():
    """Shape propagation (FakeTensorMode) builds its position table inline: one cached there held no values, and the
    next real forward of the model returned a FakeTensor."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = small_model().eval()
    tokens = segments(1)[0][0]
    want, _ = model(tokens)
    model._position_tables.clear()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        logits, _ = model(mode.from_tensor(tokens))
    assert isinstance(logits, FakeTensor) and logits.shape == want.shape
    got, _ = model(tokens)
    assert not isinstance(got, FakeTensor) and torch.equal(got, want)


def test_memory_must_match_the_model():
    """A memory list shorter than n_layer used to make zip() run fewer layers, silently."""
    model = small_model()
    xs, ys = segments(2)
    _, memory = model(xs[0])
    for name, bad, error, message in bad_memories(model, memory):
        for call in (lambda: model(xs[1], bad), lambda: model(xs[1], bad, ys[1]),
                     lambda: model.hidden_states(xs[1], bad), lambda: model.replay_segments(xs, ys, bad)):
            with pytest.raises(error, match=message):
                call()


@pytest.mark.parametrize("tokens,targets,error,message", [
    (torch.zeros(2, 8), None, TypeError, r"tokens must be an int64 or int32 tensor \[B, L\].*got torch.float32 \(2, 8\)"),
    (torch.zeros(16, dtype=torch.long), None, TypeError, r"int32 tensor \[B, L\].*got torch.int64 \(16,\)"),
    (torch.zeros(2, 8, dtype=torch.uint8), None, TypeError, r"int32 tensor \[B, L\].*\.long\(\).*torch.uint8"),
    (torch.zeros(2, 0, dtype=torch.long), None, ValueError, r"B, L >= 1"),
    (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long), ValueError,
     r"targets must have the shape of tokens \(2, 8\), got \(2, 7\)"),
    (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8), TypeError,
     r"targets must be an int64 or int32 tensor of token ids, got torch.float32"),
    (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long, device="meta"), ValueError,
     r"targets are on meta but tokens are on cpu"),
], ids=["float tokens", "1-d tokens", "byte tokens", "empty", "targets shape", "float targets", "targets device"])
def test_bad_segments_are_refused(tokens, targets, error, message):
    with pytest.raises(error, match=message):
        small_model()(tokens, None, targets)


def test_int32_targets_give_the_int64_loss_and_segment_lists_are_required():
    model = small_model()
    xs, ys = segments(2)
    loss, _ = model(xs[0], None, ys[0])
    loss32, _ = model(xs[0].int(), None, ys[0].int())
    assert torch.equal(loss, loss32)
    for inputs, targets, name in ((xs[0], ys, "inputs"), (xs, ys[0], "targets")):
        with pytest.raises(TypeError, match=f"replay_segments: {name} must be a list or tuple of T tensors"):
            model.replay_segments(inputs, targets)


@pytest.mark.parametrize("option,value,message", [
    ("n_token", 0, "n_token must be an int >= 1, got 0"), ("n_layer", 2.0, "n_layer must be an int >= 1"),
    ("n_head", 0, "n_head must be an int >= 1"), ("d_head", 0, "d_head must be an int >= 1"),
    ("d_inner", True, "d_inner must be an int >= 1"), ("d_model", 9, "d_model must be even"),
])
def test_bad_sizes_are_refused_when_the_model_is_built(option, value, message):
    """Each failed only later (a shape error at the first forward for an odd d_model, ZeroDivisionError for d_head=0)."""
    with pytest.raises(ValueError, match=message):
        TransformerXL(**(dict(n_token=31, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32) | {option: value}))


def test_random_state_restores_cross_head_and_skip_retain_draws():
    model = small_model(cross_head_p=0.5, skip_retain_p=0.5, dropout=0.0)
    state = model.random_state()
    draws = [(model.skip_retain.decide(True), [layer.draw_permutation("cpu") for layer in model.layers])
             for _ in range(4)]
    model.set_random_state(state)
    again = [(model.skip_retain.decide(True), [layer.draw_permutation("cpu") for layer in model.layers])
             for _ in range(4)]
    assert repr(draws) == repr(again) and any(p is not None for _, perms in draws for p in perms)
    with pytest.raises(ValueError, match="other skip-retain options"):
        small_model(cross_head_p=0.5).set_random_state(state)


@pytest.mark.parametrize("options", [dict(), dict(same_length=True, clamp_len=5, dropout=0.1)], ids=["plain", "options"])
def test_step_compiles_whole_with_no_recompile_per_step(options):
    """torch.compile(fullgraph=True) of a training step and of an evaluation step while the memory grows from
    empty to full and then stays full: two compiles at most (memory empty, then its length marked dynamic by
    dynamo), the same losses as eager."""
    from torch._dynamo.testing import CompileCounter

    model = small_model(mem_len=24, **options)
    xs, ys = segments(6)
    for training in (True, False):
        model.train(training)
        counter = CompileCounter()
        step = torch.compile(lambda x, mem, y: model(x, mem, y), fullgraph=True, backend=counter)
        memory, eager_memory = model.empty_memory(2), model.empty_memory(2)
        for x, y in zip(xs, ys):
            torch.manual_seed(3)
            loss, memory = step(x, memory, y)
            torch.manual_seed(3)
            eager_loss, eager_memory = model(x, eager_memory, y)
            if training:
                loss.backward()
            torch.testing.assert_close(loss, eager_loss, rtol=1e-12, atol=1e-12)
        assert [m.hidden.shape[1] for m in memory] == [24] * model.n_layer
        assert counter.frame_count <= 2, counter.frame_count


def test_inductor_compiles_the_training_step():
    model = TransformerXL(n_token=31, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32, mem_len=8, dropout=0.1)
    xs, ys = segments(2)
    step = torch.compile(lambda x, mem, y: model(x, mem, y), fullgraph=True)
    memory = model.empty_memory(2)
    for x, y in zip(xs, ys):
        loss, memory = step(x, memory, y)
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
