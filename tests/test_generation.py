"""Generation and long-memory evaluation: decoding against the cached memory equals recomputing the whole context,
sampling is reproducible from a generator, the attention span can differ from training's."""

import pytest
import torch

from memtx_ops.nn import TransformerXL
from memtx_ops.nn.generation import sample_next_token


def model(**kwargs):
    torch.manual_seed(0)
    cfg = dict(n_token=23, n_layer=3, n_head=2, d_model=16, d_head=8, d_inner=32, mem_len=64, dropout=0.1)
    cfg.update(kwargs)
    return TransformerXL(**cfg).double()


def prompt(B=2, P=7, seed=1):
    return torch.randint(0, 23, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [dict(), dict(clamp_len=6), dict(same_length=True, mem_len=5)],
                         ids=["plain", "clamp", "same_length"])
@pytest.mark.parametrize("segment_len", [3, 64])
def test_each_step_equals_a_full_recomputation(options, segment_len):
    """The logits of every decoded token equal those of one forward over the whole context (prompt and the tokens
    decoded so far) from an empty memory: the cached memory holds exactly what that forward would compute. With
    same_length the memory (5) is shorter than the context (15): the window bounds both alike."""
    m = model(**options)
    m.train()  # generate runs in eval mode whatever the module's mode, and restores it
    context = prompt()
    new, logits, memory = m.generate(context, 9, temperature=0.0, segment_len=segment_len, return_logits=True)
    assert m.training and new.shape == (2, 9) and logits.shape == (2, 9, 23)
    m.eval()
    full = torch.cat([context, new[:, :-1]], 1)
    with torch.no_grad(), m.attention_span(mem_len=full.shape[1]):
        if options.get("same_length"):
            m.mem_len = options["mem_len"]  # the window of same_length stays the model's
        expected, _ = m(full)
    torch.testing.assert_close(logits, expected[:, context.shape[1] - 1:], rtol=1e-10, atol=1e-10)
    assert torch.equal(new, logits.argmax(-1))
    assert all(mem.hidden.shape[1] == min(full.shape[1], m.mem_len) for mem in memory)


def test_memory_keeps_at_most_mem_len_positions_and_generation_goes_on():
    m = model(mem_len=5)
    new, memory = m.generate(prompt(P=4), 6, temperature=0.0)
    assert [mem.hidden.shape[1] for mem in memory] == [5] * 3
    more, _ = m.generate(new[:, -1:], 3, temperature=0.0, memory=memory)
    whole, _ = m.generate(prompt(P=4), 9, temperature=0.0)
    assert torch.equal(torch.cat([new, more], 1), whole)


def test_sampling_is_reproducible_from_a_generator():
    m = model()
    draws = [m.generate(prompt(), 20, temperature=1.3, top_k=10, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))[0] for seed in (5, 5, 6)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next_token(logits, top_p=0.7, generator=gen).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(sample_next_token(logits, top_p=0.4, generator=gen).tolist()) == {0}
    assert torch.equal(sample_next_token(logits, top_k=1, generator=gen), logits.argmax(-1))
    drawn = sample_next_token(logits, generator=gen)
    frequencies = torch.bincount(drawn, minlength=4) / drawn.numel()
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), rtol=0, atol=0.04)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be a finite float >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite float >= 0"),  # -inf / inf: NaN probabilities
    (dict(top_k=0), "top_k must be None or an int >= 1"),
    (dict(top_p=1.5), r"top_p must be None or a float in \(0, 1\]"),
    (dict(max_new_tokens=-2), "max_new_tokens must be an int >= 0"),
    (dict(segment_len=0), "segment_len must be an int >= 1"),
])
def test_bad_generation_arguments(kwargs, message):
    args = dict(max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model().generate(prompt(), args.pop("max_new_tokens"), **args)


def test_attention_span_changes_evaluation_and_restores_training_settings():
    m = model(mem_len=8, clamp_len=-1).eval()
    x = prompt(P=8)
    with torch.no_grad():
        _, memory = m(x)
        with m.attention_span(mem_len=16, clamp_len=3, same_length=True):
            assert (m.mem_len, m.clamp_len, m.same_length) == (16, 3, True)
            _, longer = m(x, memory)
            assert longer[0].hidden.shape[1] == 16
        assert (m.mem_len, m.clamp_len, m.same_length) == (8, -1, False)
        _, shorter = m(x, memory)
        assert shorter[0].hidden.shape[1] == 8
    with pytest.raises(ValueError, match="mem_len must be an int >= 0"):
        m.set_attention_span(mem_len=-1)


def decode_uncached(m, first, tokens, memory):
    """The logits ``[B, N, V]`` of feeding ``first`` then ``tokens[:, :-1]`` one at a time through ``m``'s forward,
    which projects every layer's whole [memory ; segment] again, and the memory after."""
    logits = []
    with torch.no_grad():
        for token in torch.cat([first, tokens[:, :-1]], 1).split(1, 1):
            step, memory = m(token, memory)
            logits.append(step[:, -1])
    return torch.stack(logits, 1), memory


@pytest.mark.parametrize("options", [dict(), dict(pre_lnorm=True), dict(same_length=True, clamp_len=3)],
                         ids=["plain", "pre_lnorm", "same_length_clamp"])
@pytest.mark.parametrize("aged", [False, True], ids=["fresh_memory", "aged_memory"])
def test_cached_decoding_equals_the_uncached_forward(options, aged):
    """generate's per-layer caches (projected keys, values and positions, memory rows appended in a buffer) give
    the logits of the plain forward, token by token, over enough steps that every buffer is moved to its front, and
    from a memory aged by skip-retain (mem_offset > 0, which the next update drops). The memory it returns equals
    the forward's, in tensors of its own."""
    from memtx_ops.nn import LayerMemory

    m = model(mem_len=6, **options).eval()
    memory = m.generate(prompt(P=9), 1, temperature=0.0)[1]
    if aged:
        memory = [LayerMemory(mem.hidden, age=2, mem_offset=4) for mem in memory]
    first = prompt(P=1, seed=3)
    # sampled, not greedy: a greedy untrained model repeats one token, and a memory of equal rows hides lost keys
    new, logits, after = m.generate(first, 60, temperature=1.0, memory=memory, return_logits=True,
                                    generator=torch.Generator().manual_seed(0))
    assert len(set(new[0].tolist())) > 10
    expected, expected_after = decode_uncached(m, first, new, memory)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(after, expected_after):
        assert got.hidden.is_contiguous() and got.hidden.shape == want.hidden.shape
        torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-10, atol=1e-10)


def test_position_buffer_keeps_the_last_positions_through_moves():
    from memtx_ops.nn.generation import PositionBuffer

    buffer, rows, moves, capacities = PositionBuffer(dim=1), [], 0, set()
    for step in range(200):
        start = buffer.start
        new = torch.randn(2, 1 + step % 3, 4)
        rows.append(new)
        window = buffer.extend(new)
        buffer.keep_last(7)
        everything = torch.cat(rows, 1)
        assert torch.equal(window, everything[:, everything.shape[1] - window.shape[1]:])
        assert torch.equal(buffer.window(), everything[:, -7:] if everything.shape[1] >= 7 else everything)
        moves += buffer.start < start
        capacities.add(buffer.buffer.shape[1])
    assert moves > 10 and len(capacities) == 1  # moved to the front many times, never regrown: it holds 7 + 3


def test_position_buffer_forgets_one_extend_through_moves_and_growth():
    """forget_last(n, kept) returns to the positions kept before an extend of n, whether it appended in place, moved
    the positions to the front first, or grew the buffer; the forgotten rows' room is written by the next extend."""
    from memtx_ops.nn.generation import PositionBuffer

    buffer, kept, moves, growths = PositionBuffer(dim=1), torch.randn(2, 0, 4), 0, 0
    for step in range(120):
        new = torch.randn(2, 1 + step % 3, 4)
        if step % 2:  # a forward that is forgotten
            start, capacity, n = buffer.start, buffer.buffer.shape[1], 40 if step == 111 else 1 + step % 4
            buffer.extend(torch.randn(2, n, 4))  # 40: past its capacity
            buffer.keep_last(7)
            moves += buffer.buffer.shape[1] == capacity and buffer.start < start
            growths += buffer.buffer.shape[1] != capacity
            buffer.forget_last(n, kept.shape[1])
            assert torch.equal(buffer.window(), kept)
        buffer.extend(new)
        buffer.keep_last(7)
        kept = torch.cat([kept, new], 1)[:, -7:]
        assert torch.equal(buffer.window(), kept)
    assert moves > 5 and growths >= 1
    with pytest.raises(ValueError, match="are not all in the buffer"):
        buffer.forget_last(1, buffer.end)


def test_key_value_cache_rollback_gives_back_the_memory_it_stood_for():
    """A forgotten forward (update_memory and extend, then rollback) leaves the cache standing for the memory before
    it, with rows equal to that memory's even when the forward moved them in the buffer, and the next forward
    appends after them."""
    from memtx_ops.nn import LayerMemory
    from memtx_ops.nn.generation import KeyValueCache

    cache, kept = KeyValueCache(), torch.randn(2, 0, 4)
    mem, moved = LayerMemory(kept), 0
    for step in range(60):
        checkpoint, start = cache.checkpoint(), cache._hidden.start
        cache.update_memory(mem, torch.randn(2, 1 + step % 3, 4), 7)
        cache.extend(torch.randn(1 + step % 3, 2, 2, 1, 4))
        moved += cache._hidden.start < start
        mem = cache.rollback(checkpoint, mem)
        assert torch.equal(mem.hidden, kept)
        new = torch.randn(2, 1 + step % 2, 4)
        mem = cache.update_memory(mem, new, 7)
        kept = torch.cat([kept, new], 1)[:, -7:]
        assert torch.equal(mem.hidden, kept)
    assert moved > 3


def test_key_value_cache_rollback_keeps_the_keys_of_a_memory_it_started_over_from():
    """A forgotten forward against a memory the cache did not stand for keeps that memory's rows and keys: the cache
    stands for it afterwards (the next forward projects only its own positions); a memory it could not keep whole
    (longer than mem_len) leaves the cache as it was."""
    from memtx_ops.nn import LayerMemory
    from memtx_ops.nn.generation import KeyValueCache

    mem = LayerMemory(torch.randn(2, 5, 4))
    cache = KeyValueCache()
    checkpoint = cache.checkpoint()
    cache.update_memory(mem, torch.randn(2, 3, 4), 8)
    keys = torch.randn(8, 2, 2, 1, 4)
    cache.extend(keys)  # the layer projects [memory ; segment]
    kept = cache.rollback(checkpoint, mem)
    assert kept is not mem and torch.equal(kept.hidden, mem.hidden) and len(cache) == 5
    assert torch.equal(cache.extend(keys[:1])[0][:, 0, :5], keys[:5, :, 0, 0].transpose(0, 1))
    cache.keep_last(5)
    buffer = cache._keys
    cache.update_memory(kept, torch.randn(2, 1, 4), 8)
    assert cache._keys is buffer  # stood for it: no start over

    long_cache = KeyValueCache()
    checkpoint = long_cache.checkpoint()
    long_cache.update_memory(mem, torch.randn(2, 3, 4), 4)  # mem_len 4 < 5: keeps 4 of mem's rows only
    long_cache.extend(keys)
    assert long_cache.rollback(checkpoint, mem) is mem and len(long_cache) == 0


def test_attention_rejects_a_cache_it_cannot_use():
    from memtx_ops.nn import RelPartialLearnableMultiHeadAttn
    from memtx_ops.nn.generation import KeyValueCache

    layer = RelPartialLearnableMultiHeadAttn(2, 16, 8, 0.0).double().eval()
    w, mems, r = torch.randn(3, 2, 16).double(), torch.randn(5, 2, 16).double(), torch.randn(8, 1, 16).double()
    cache = KeyValueCache()
    with pytest.raises(ValueError, match="kv_cache is for inference"):
        layer(w, r, None, mems, window=None, clamp_len=-1, kv_cache=cache)
    with torch.no_grad():
        out = layer(w, r, None, mems, window=None, clamp_len=-1, kv_cache=cache)
        assert len(cache) == 8
        torch.testing.assert_close(out, layer(w, r, None, mems, window=None, clamp_len=-1), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="kv_cache holds 8 positions, but mems has 5"):
            layer(w, r, None, mems, window=None, clamp_len=-1, kv_cache=cache)


@pytest.mark.parametrize("options", [dict(), dict(same_length=True, clamp_len=3, pre_lnorm=True)],
                         ids=["plain", "same_length_clamp_pre_lnorm"])
def test_evaluation_with_kv_caches_equals_the_plain_forward(options):
    """Segments of a stream scored with ``kv_caches`` give the losses and memories of the plain forward; a memory
    the caches did not return (here the first segment's, reused) makes them start over, not reuse stale keys."""
    m = model(mem_len=10, **options).eval()
    stream = prompt(P=40, seed=4)
    caches = m.new_kv_caches()
    with torch.no_grad():
        plain, cached = None, None
        for start in range(0, 32, 8):
            x, y = stream[:, start:start + 8], stream[:, start + 1:start + 9]
            want, plain = m(x, plain, y)
            got, cached = m(x, cached, y, kv_caches=caches)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            for a, b in zip(cached, plain):
                torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-12, atol=1e-12)
                assert a.hidden.is_contiguous()
            if start == 8:
                replay = cached
        x = stream[:, 32:40]
        torch.testing.assert_close(m(x, replay, kv_caches=caches)[0], m(x, replay)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="kv_caches must be model.new_kv_caches"):
        m(x, kv_caches=caches[:1])
    with pytest.raises(ValueError, match="kv_cache is for inference"):
        m(x, kv_caches=m.new_kv_caches())


def test_generation_and_evaluation_under_inference_mode_leave_training_intact():
    """torch.inference_mode() around generate and an evaluation forward: the same tokens as under no_grad, and no
    inference tensor left cached in the model (position tables, default kv heads) for a later training step to
    fail saving for backward."""
    m = model(n_layer=2)
    with torch.no_grad():
        want = m.generate(prompt(), 6, temperature=0.0)[0]
    fresh = model(n_layer=2)
    with torch.inference_mode():
        assert torch.equal(fresh.generate(prompt(), 6, temperature=0.0)[0], want)
        fresh.eval()
        fresh(prompt(), None, prompt(seed=2), kv_caches=fresh.new_kv_caches())
    fresh.train()
    loss, _ = fresh(prompt(), None, prompt(seed=2))
    loss.backward()
    assert all(p.grad is not None for p in fresh.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_into_an_empty_memory_keeps_one_position_table_and_projects_it_rarely(monkeypatch, dtype):
    """A memory filled one token per step from a 1-token prompt: one position table, grown by doubling (not one
    per length, which held about mem_len**2 / 2 rows), and each layer's projection of it computed O(log mem_len)
    times (not once per step), with the logits of a plain recomputation."""
    m = model(n_layer=2, mem_len=64).to(dtype)  # float64 tables are views of their sinusoids, float32 ones copies
    projections = []
    for layer in m.layers:
        attn = layer.dec_attn
        monkeypatch.setattr(attn, "_project_positions",
                            lambda r, rows, project=attn._project_positions:
                            projections.append(rows) or project(r, rows))
    new, logits, _ = m.generate(prompt(P=1), 64, temperature=1.0, return_logits=True,
                                generator=torch.Generator().manual_seed(0))
    tables = list(m._position_tables.values())
    assert len(tables) == 1 and 64 <= tables[0].shape[0] < 2 * 65
    assert len(projections) <= len(m.layers) * 2 * (1 + (64).bit_length())  # two per doubling, per layer
    m.eval()
    with torch.no_grad():
        expected, _ = m(torch.cat([prompt(P=1), new[:, :-1]], 1))
    torch.testing.assert_close(logits, expected, rtol=1e-10 if dtype == torch.float64 else 1e-4,
                               atol=1e-10 if dtype == torch.float64 else 1e-5)


def test_a_memory_edited_in_place_makes_the_caches_start_over():
    """A stream reset at a document boundary by zeroing its memory rows in place: the caches holding that memory's
    keys see the edit (its version) and project the rows again, so the scores are those of the plain forward."""
    m = model(mem_len=6).eval()
    x0, x1, x2 = prompt(P=4, seed=5), prompt(P=4, seed=6), prompt(P=4, seed=7)
    caches = m.new_kv_caches()
    with torch.no_grad():
        _, memory = m(x0, None, kv_caches=caches)
        _, memory = m(x1, memory, kv_caches=caches)
        for mem in memory:
            mem.hidden[1].zero_()
        got, _ = m(x2, memory, kv_caches=caches)
        want, _ = m(x2, memory)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_generate_restores_the_mode_of_every_module():
    m = model()
    m.train()
    m.layers[1].eval()  # a frozen part: its dropout stays off after generate too
    m.generate(prompt(), 2)
    assert m.training and m.layers[0].training and not m.layers[1].training
    assert not any(module.training for module in m.layers[1].modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1e-30, 1e-39, 1e-300])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature, dtype):
    """Logits divided by a temperature that overflows them (or that rounds to 0 in float32) gave inf - inf = NaN
    probabilities; taken from the row's maximum they give the argmax."""
    logits = torch.tensor([[2.0, 1.0, -1.0], [-3.0, 5.0, 4.5]], dtype=dtype)
    assert sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(0)).tolist() == [0, 1]


def test_same_length_needs_a_memory():
    """same_length's window is the memory length: with mem_len 0 no key, not even the query's own, is visible."""
    with pytest.raises(ValueError, match="same_length needs mem_len >= 1"):
        model(mem_len=0, same_length=True)
    m = model(mem_len=0)
    with pytest.raises(ValueError, match="same_length needs mem_len >= 1"):
        m.set_attention_span(same_length=True)
    with pytest.raises(ValueError, match="same_length needs mem_len >= 1"):
        model(same_length=True).set_attention_span(mem_len=0)
    m.set_attention_span(mem_len=4, same_length=True)
