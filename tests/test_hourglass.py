"""HourglassTransformerXL: causality within and across segments through every level's memory (and proof that the test
catches a one-position leak), layouts, memories per level, the flat layout equals TransformerXL, fused = reference,
memory replay = BPTT, skip-retain, state dicts, validation."""

import pytest
import torch

import memtx_ops
import memtx_ops.nn.hourglass as hourglass
from helpers import assert_replay_equals_bptt
from memtx_ops.nn import HourglassTransformerXL, LayerMemory, TransformerXL
from memtx_ops.nn.hourglass import parse_layout

N_TOKEN = 23
SMALL = dict(n_head=2, d_model=16, d_head=8, d_inner=32, dropout=0.0)


def small_hourglass(layout="1@1 2@3 1@1", mem_len=12, seed=0, **kwargs):
    torch.manual_seed(seed)
    return HourglassTransformerXL(N_TOKEN, layout=layout, mem_len=mem_len, **(SMALL | kwargs)).double()


def segments(T, B=2, L=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randint(0, N_TOKEN, (B, L), generator=gen) for _ in range(T)],
            [torch.randint(0, N_TOKEN, (B, L), generator=gen) for _ in range(T)])


# -- causality -----------------------------------------------------------------------------------------------------

def logits_from(model, xs, memory=None):
    """Logits ``[B, T * L, n_token]`` of the segments in a row, memory carried; and the memory before each segment."""
    out, before = [], []
    for x in xs:
        before.append(memory)
        logits, memory = model(x, memory)
        out.append(logits)
    return torch.cat(out, dim=1), before


def causality_violations(model, xs):
    """Perturbs batch entry 0's token at every position t of every segment and returns ``[(segment, t, earliest
    changed global position)]`` wherever a position before t changed. Asserts that every perturbation is seen (at
    position t; later segments too, through the memories) and that batch entry 1 never changes."""
    model.eval()
    L = xs[0].shape[1]
    with torch.no_grad():
        base, memories = logits_from(model, xs)
        violations = []
        for s in range(len(xs)):
            for t in range(L):
                changed_xs = [x.clone() for x in xs[s:]]
                changed_xs[0][0, t] = (changed_xs[0][0, t] + 1) % N_TOKEN
                out, _ = logits_from(model, changed_xs, memories[s])
                out = torch.cat([base[:, : s * L], out], dim=1)
                assert torch.equal(out[1], base[1]), "another batch entry changed"
                changed = (out[0] != base[0]).any(-1).nonzero().flatten()
                position = s * L + t
                assert changed.numel() and changed.max() >= position, "the perturbation was not seen"
                assert not (s < len(xs) - 1 and changed.max() < (s + 1) * L), "the memory did not carry it"
                if changed.min() < position:
                    violations.append((s, t, int(changed.min())))
    return violations


CAUSAL_CONFIGS = [
    dict(layout="1@1 2@3 1@1"),
    dict(layout="1@1 2@3 1@1", downsample="weighted", upsample="linear"),
    dict(layout="1@1 1@2 1@4 1@2 1@1", upsample="linear", same_length=True),
    dict(layout="1@1 2@3 1@1", upsample="linear", backend="reference", resample_backend="reference"),
]


def randomise_resampling(model):
    """Learned group weights far from the mean, so that every row of a group matters differently."""
    if model.downsample_weights is not None:
        with torch.no_grad():
            for w in model.downsample_weights:
                w.copy_(torch.linspace(0.5, 1.5, w.numel(), dtype=w.dtype))
    return model


@pytest.mark.parametrize("config", CAUSAL_CONFIGS, ids=lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
def test_no_logit_sees_a_later_token(config):
    """Changing the token at t (every t of three segments: group starts m*k and ends m*k + k - 1, the first positions
    of segments whose shortened memories and shifted-in rows came from the segment before) leaves every earlier logit
    bitwise unchanged, in float64 without dropout."""
    model = randomise_resampling(small_hourglass(**config))
    xs, _ = segments(3, L=12 if "4@" not in config["layout"] else 16)
    assert causality_violations(model, xs) == []


def downsample_shifted_by_k_minus_2(x, factor, *, prev=None, weights=None, backend="auto"):
    """A one-position leak: coarse row m reads fine rows m*k - (k - 2) .. m*k + 1."""
    B, L, d = x.shape
    shifted_in = x.new_zeros(B, factor - 2, d) if prev is None else prev[:, 1:]
    s = torch.cat([shifted_in, x[:, : L - (factor - 2)]], dim=1)
    return s.reshape(B, L // factor, factor, d).mean(2)


def upsample_one_row_early(x_short, residual, factor, *, mode="repeat", prev=None, backend="auto"):
    """A one-position leak: fine row i reads coarse row (i + 1) // k (the last row of a group reads the next group)."""
    index = torch.clamp((torch.arange(residual.shape[1]) + 1) // factor, max=x_short.shape[1] - 1)
    return residual + x_short[:, index]


def downsample_with_prev_from_this_segment(x, factor, *, prev=None, weights=None, backend="auto"):
    """Shifted-in rows from the current segment's end instead of the previous segment's."""
    return memtx_ops.causal_downsample(x, factor, prev=x[:, x.shape[1] - factor + 1:], weights=weights)


@pytest.mark.parametrize("name, patch, leak", [
    ("causal_downsample", downsample_shifted_by_k_minus_2, "one position"),
    ("upsample_add", upsample_one_row_early, "one position"),
    ("causal_downsample", downsample_with_prev_from_this_segment, "segment end"),
])
def test_the_causality_test_catches_a_leak(name, patch, leak, monkeypatch):
    """The same test on models with a known leak finds it: a shift by k - 2 (coarse row m sees token m*k + 1, which
    position m*k reads), upsampling one row early, the shifted-in rows taken from the current segment."""
    monkeypatch.setattr(hourglass, name, patch)
    model = small_hourglass("1@1 2@3 1@1")
    xs, _ = segments(2)
    violations = causality_violations(model, xs)
    assert violations
    if leak == "one position":
        k = 3
        assert all(s * 12 + t - earliest == 1 for s, t, earliest in violations)
        expected_t = 1 if name == "causal_downsample" else 0  # t = m*k + 1, or the first row of the next group
        assert {t % k for _, t, _ in violations} == {expected_t}


# -- structure and memories ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, groups", [("2@1 4@3 2@1", [(2, 1), (4, 3), (2, 1)]), ("8@1", [(8, 1)]),
                                            (" 1@1  2@2 3@6 2@2 1@1 ", [(1, 1), (2, 2), (3, 6), (2, 2), (1, 1)]),
                                            ("1@1 2@3 3@1", [(1, 1), (2, 3), (3, 1)])])
def test_parse_layout(layout, groups):
    assert parse_layout(layout) == groups


@pytest.mark.parametrize("layout, match", [
    ("", "at least one group"), ("2@1 4", "group '4' must be <layers>@<factor>"), ("0@1", "both >= 1"),
    ("2@0", "both >= 1"), ("2@2", "rise from 1"), ("2@1 4@3", "rise from 1"), ("2@1 4@3 2@2", "symmetrically"),
    ("1@1 1@2 1@3 1@2 1@1", "each a multiple"), ("1@1 1@3 1@3 1@1", "symmetrically"),
    ("1@1 1@4 1@2 1@4 1@1", "rise from 1"),
])
def test_bad_layouts_are_refused(layout, match):
    with pytest.raises(ValueError, match=match):
        parse_layout(layout)


def test_flat_layout_is_the_transformer_xl():
    """Layout "3@1" is TransformerXL(n_layer=3): same parameters, same logits, gradients and memories."""
    xs, ys = segments(3)
    results = []
    for make in (lambda: small_hourglass("3@1", dropout=0.1),
                 lambda: TransformerXL(N_TOKEN, n_layer=3, mem_len=12, **(SMALL | dict(dropout=0.1))).double()):
        torch.manual_seed(0)
        model = make()
        torch.manual_seed(5)
        memory, total = None, 0
        for x, y in zip(xs, ys):
            loss, memory = model(x, memory, y)
            total = total + loss
        total.backward()
        results.append([total.detach()] + [p.grad for p in model.parameters()] + [m.hidden for m in memory])
    assert len(results[0]) == len(results[1]) and all(torch.equal(a, b) for a, b in zip(*results))


def test_generate_decodes_a_flat_layout_as_the_transformer_xl():
    """A flat layout decodes as the TransformerXL it equals (token for token, through the decoding caches)."""
    prompt = torch.randint(0, N_TOKEN, (2, 5), generator=torch.Generator().manual_seed(0))
    flat = small_hourglass("3@1", dropout=0.0)
    torch.manual_seed(0)
    plain = TransformerXL(N_TOKEN, n_layer=3, mem_len=12, **(SMALL | dict(dropout=0.0))).double()
    got, want = (m.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(1),
                            return_logits=True)[1] for m in (flat, plain))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def forward_by_groups(model, tokens):
    """Logits ``[B, len, n_token]`` of ``tokens`` fed from an empty memory in segments of one group (the largest
    factor), the last one padded, and the memory after the whole groups: what decoding computes, memory truncation
    and same_length windows included."""
    F = model.max_factor
    whole = tokens.shape[1] - tokens.shape[1] % F
    padded = torch.cat([tokens, tokens[:, :1].expand(tokens.shape[0], -tokens.shape[1] % F)], 1)
    memory, out = None, []
    with torch.no_grad():
        for start in range(0, padded.shape[1], F):
            logits, after = model(padded[:, start:start + F], memory)
            out.append(logits)
            memory = after if start < whole else memory
    return torch.cat(out, 1)[:, : tokens.shape[1]], memory


DECODED_LAYOUTS = [("1@1 1@3 1@1", dict()), ("1@1 1@3 1@1", dict(upsample="linear", downsample="weighted")),
                   ("1@1 1@2 1@6 1@2 1@1", dict(upsample="linear", same_length=True, clamp_len=5)),
                   ("2@1 1@2 1@1", dict(pre_lnorm=True))]


@pytest.mark.parametrize("layout, options", DECODED_LAYOUTS, ids=["repeat", "linear_weighted", "nested_same_length",
                                                                  "pre_lnorm"])
@pytest.mark.parametrize("P", [1, 5, 13])
def test_generate_through_shortenings_equals_the_forward_by_groups(layout, options, P):
    """Decoding through the shortenings: every step's logits equal those of the forward over the context fed a group
    at a time (each token that does not complete a group is decoded with the group's earlier ones and forgotten);
    40 steps against a memory of 12 also move the caches' buffers. Prompts of every length, not only multiples."""
    model = small_hourglass(layout, mem_len=12, dropout=0.1, **options)
    if model.downsample_weights is not None:
        with torch.no_grad():
            for weights in model.downsample_weights:
                weights.uniform_(0.2, 1.0)
    prompt = torch.randint(0, N_TOKEN, (2, P), generator=torch.Generator().manual_seed(P))
    new, logits, memory = model.generate(prompt, 40, temperature=0.0, segment_len=model.max_factor,
                                         return_logits=True)
    model.eval()
    context = torch.cat([prompt, new[:, :-1]], 1)
    expected, expected_memory = forward_by_groups(model, context)
    torch.testing.assert_close(logits, expected[:, P - 1:], rtol=1e-10, atol=1e-10)
    assert torch.equal(new, logits.argmax(-1))
    assert len(memory) == len(expected_memory)
    for got, want in zip(memory, expected_memory):
        torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-10, atol=1e-10)
    pending = context.shape[1] % model.max_factor
    assert getattr(memory, "pending", context[:, :0]).shape[1] == pending
    if pending:
        assert torch.equal(memory.pending, context[:, -pending:])


def test_generate_with_a_long_memory_equals_one_forward_and_goes_on_from_a_pending_group():
    """With a memory longer than the context, decoding equals one forward over it all (padded to the group); a
    generation stopped inside a group goes on from its PendingMemory exactly as one longer generation would, and
    forward refuses that memory rather than starting a segment inside a group."""
    model = small_hourglass("1@1 1@3 1@1", mem_len=60, upsample="linear")
    prompt = torch.randint(0, N_TOKEN, (2, 7), generator=torch.Generator().manual_seed(3))
    new, logits, _ = model.generate(prompt, 13, temperature=0.0, return_logits=True)
    model.eval()
    context = torch.cat([prompt, new[:, :-1]], 1)  # 19 tokens, padded to 21
    with torch.no_grad():
        expected, _ = model(torch.cat([context, context[:, :2]], 1))
    torch.testing.assert_close(logits, expected[:, 6:19], rtol=1e-10, atol=1e-10)

    first, first_logits, memory = model.generate(prompt, 5, temperature=0.0, return_logits=True)
    assert memory.pending.shape == (2, 2)  # 7 + 4 tokens decoded: 9 in whole groups, 2 pending
    second, second_logits, _ = model.generate(first[:, -1:], 8, temperature=0.0, memory=memory, return_logits=True)
    torch.testing.assert_close(torch.cat([first_logits, second_logits], 1), logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.cat([first, second], 1), new)
    with pytest.raises(ValueError, match="memory ends 2 tokens into a group of 3"):
        model(first[:, :3], memory)
    with pytest.raises(ValueError, match="memory.pending must be the"):
        model.generate(first[:1, -1:], 2, memory=memory)  # a prompt of another batch
    # int32 prompts: the pending tokens of a memory may be int32 or int64 (the sampled ones), either goes on
    short, short_memory = model.generate(prompt.int(), 1, temperature=0.0)
    assert short_memory.pending.dtype == torch.int32 and short.dtype == torch.int64
    rest, _ = model.generate(short[:, -1:], 12, temperature=0.0, memory=short_memory)
    assert torch.equal(torch.cat([short, rest], 1), new)
    assert torch.equal(model.generate(first[:, -1:].int(), 8, temperature=0.0, memory=memory)[0], second)
    with pytest.raises(ValueError, match="segment_len must be an int >= 1 and a multiple of 3"):
        model.generate(prompt, 2, segment_len=4)


@pytest.mark.parametrize("options", [dict(), dict(upsample="linear", same_length=True, clamp_len=3)],
                         ids=["repeat", "linear_same_length_clamp"])
def test_evaluation_with_kv_caches_equals_the_plain_forward(options):
    """Segments scored with ``kv_caches`` (every level's layers project only the segment's keys) give the losses and
    memories of the plain forward, through memory truncation at every level."""
    model = small_hourglass("1@1 2@3 1@1", mem_len=12, **options).eval()
    xs, ys = segments(5, L=6)
    caches = model.new_kv_caches()
    plain = cached = None
    with torch.no_grad():
        for x, y in zip(xs, ys):
            want, plain = model(x, plain, y)
            got, cached = model(x, cached, y, kv_caches=caches)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            assert len(cached) == len(plain)
            for a, b in zip(cached, plain):
                torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-12, atol=1e-12)


def test_attention_span_sets_every_level_memory():
    """An evaluation span (longer memory, same_length) reaches every level: the model under attention_span(mem_len=24)
    keeps and computes what one built with mem_len=24 does, and a span that is not a multiple of the largest factor
    is refused rather than truncated."""
    xs, _ = segments(3, L=6)
    trained = small_hourglass("1@1 1@3 1@1", mem_len=6)
    built = small_hourglass("1@1 1@3 1@1", mem_len=24, same_length=True)
    built.load_state_dict(trained.state_dict())
    trained.eval(), built.eval()
    with torch.no_grad():
        expected, _ = logits_from(built, xs)
        with trained.attention_span(mem_len=24, same_length=True):
            assert trained.memory_lengths() == [24, 8, 24, 2]
            got, before = logits_from(trained, xs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [m.hidden.shape[1] for m in before[-1]] == [12, 4, 12, 2]
    assert trained.memory_lengths() == [6, 2, 6, 2] and not trained.same_length
    with pytest.raises(ValueError, match="multiple of the largest factor 3"):
        trained.set_attention_span(mem_len=7)
    assert trained.mem_len == 6


@pytest.mark.parametrize("upsample", ["repeat", "linear"])
def test_every_level_keeps_its_own_memory(upsample):
    model = small_hourglass("1@1 2@3 1@1", mem_len=12, upsample=upsample)
    expected = [12, 4, 4, 12, 2] + ([1] if upsample == "linear" else [])
    assert model.memory_lengths() == expected
    captured = {}
    model.layers[0].register_forward_hook(lambda m, args, out: captured.update(fine=out))  # input of the shortening
    model.layers[2].register_forward_hook(lambda m, args, out: captured.update(coarse=out))  # of the upsampling
    xs, _ = segments(4, L=6)
    memory = None
    for t, x in enumerate(xs):
        _, memory = model(x, memory)
        assert [m.hidden.shape[1] for m in memory] == [min(n, 6 * (t + 1) // (3 if n == 4 else 1))
                                                       if i < 4 else n for i, n in enumerate(expected)]
        assert torch.equal(memory[4].hidden, captured["fine"][-2:].transpose(0, 1))  # the last k - 1 fine rows
        if upsample == "linear":
            assert torch.equal(memory[5].hidden, captured["coarse"][-1:].transpose(0, 1))  # the last coarse row
        assert all(not m.hidden.requires_grad and m.hidden.is_contiguous() for m in memory[4:])


@pytest.mark.parametrize("options", [dict(), dict(downsample="weighted", upsample="linear", same_length=True,
                                                   clamp_len=3, pre_lnorm=True)], ids=["plain", "every option"])
def test_fused_backends_equal_the_reference(options):
    xs, ys = segments(3)
    results = []
    for backend in ("cpu", "reference"):
        model = randomise_resampling(small_hourglass(backend=backend, resample_backend=backend, **options))
        memory, total = None, 0
        for x, y in zip(xs, ys):
            loss, memory = model(x, memory, y)
            total = total + loss
        total.backward()
        results.append((total.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [dict(cross_head_p=0.5), dict(downsample="weighted", upsample="linear")],
                         ids=["cross_head", "weighted+linear"])
def test_replay_segments_equal_bptt(options):
    """Memory replay carries every level's memory and the resampling states: its gradients are those of BPTT."""
    model = randomise_resampling(small_hourglass("1@1 2@3 1@1", mem_len=6, dropout=0.2, **options))
    xs, ys = segments(5, L=6)
    assert_replay_equals_bptt(model, xs, ys)


def test_skip_retain_ages_memories_in_each_levels_units():
    model = small_hourglass("1@1 2@3 1@1", skip_retain_p=1.0, skip_schedule="uniform", phase="finetune")
    xs, _ = segments(3)
    _, memory = model(xs[0])
    model.set_phase("pretrain")  # every layer but the last skips
    for x in xs[1:]:
        _, memory = model(x, memory)
    assert [m.age for m in memory[:4]] == [3, 3, 3, 1]
    assert [m.mem_offset for m in memory[:4]] == [24, 8, 8, 0]  # two segments of 12 fine = 4 coarse positions
    model.train()
    loss, _ = model(xs[0], memory, xs[1])
    loss.backward()  # aged memories at both levels run through the fused attention
    assert torch.isfinite(loss)


def test_state_dict_is_the_flat_models_plus_the_resampling_weights(tmp_path):
    flat = TransformerXL(N_TOKEN, n_layer=4, mem_len=12, **SMALL).double()
    model = small_hourglass("1@1 2@3 1@1")
    assert list(model.state_dict()) == list(flat.state_dict())
    model.load_state_dict(flat.state_dict(), strict=True)
    weighted = small_hourglass("1@1 2@3 1@1", downsample="weighted", seed=3)
    assert list(weighted.state_dict()) == list(flat.state_dict()) + ["downsample_weights.0"]
    randomise_resampling(weighted)
    torch.save(weighted.state_dict(), tmp_path / "hourglass.pt")
    restored = small_hourglass("1@1 2@3 1@1", downsample="weighted", seed=4)
    restored.load_state_dict(torch.load(tmp_path / "hourglass.pt"), strict=True)
    x = segments(1)[0][0]
    weighted.eval(), restored.eval()
    assert torch.equal(weighted(x)[0], restored(x)[0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mem_len must be .* a multiple of the largest factor 3"):
        small_hourglass("1@1 2@3 1@1", mem_len=10)
    with pytest.raises(ValueError, match="downsample must be one of"):
        small_hourglass(downsample="max")
    with pytest.raises(ValueError, match="upsample must be one of"):
        small_hourglass(upsample="attention")
    model = small_hourglass("1@1 2@3 1@1")
    with pytest.raises(ValueError, match=r"tokens have L=10 positions, which must be a multiple of the largest "
                                         r"factor 3"):
        model(torch.zeros(2, 10, dtype=torch.long))
    xs, ys = segments(2)
    _, memory = model(xs[0])
    with pytest.raises(ValueError, match=r"one LayerMemory per layer \(n_layer=4\) and per resampling state \(1\): "
                                         r"5 entries, got 4 entries"):
        model(xs[1], memory[:4])
    with pytest.raises(ValueError, match=r"inputs\[1\] have L=10"):
        model.replay_segments([xs[0], xs[1][:, :10]], [ys[0], ys[1][:, :10]])
    bad_state = memory[:4] + [LayerMemory(torch.zeros(2, 1, 16, dtype=torch.float64))]
    with pytest.raises(ValueError, match=r"causal_downsample: prev must have shape \[B, factor - 1, d\]"):
        model(xs[1], bad_state)
