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
    (dict(temperature=-1.0), "temperature must be a float >= 0"),
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
