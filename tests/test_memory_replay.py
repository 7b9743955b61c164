"""Memory replay back-propagation (SPEC §3): gradients equal full BPTT in float64 for a Transformer-XL stack
(with the fused attention) and a Memformer-style slot memory, both with dropout; truncation, chaining,
offload, need_output, RNG state, autocast, one gradient per parameter (and DDP on two gloo processes),
argument errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memtx_ops
from helpers import assert_close_to_reference, gloo_group, rel_error, spawn_ranks

DTYPE = torch.float64
B, L, M, D, HEADS, VOCAB, T = 2, 4, 4, 16, 2, 11, 5


class XLLayer(nn.Module):
    """Post-norm Transformer-XL layer: relative attention over [memory ; segment], then a feed-forward block."""

    def __init__(self, d, heads, dropout, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.r_net = nn.Linear(d, d, bias=False)
        self.u = nn.Parameter(0.3 * torch.randn(heads, d // heads))
        self.vb = nn.Parameter(0.3 * torch.randn(heads, d // heads))
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, mem, pos):
        """h [B, L, d], mem [B, M, d], pos [R, d] -> [B, L, d]."""
        (b, length, d), heads = h.shape, self.heads
        q = self.q(h).view(b, length, heads, -1).transpose(1, 2)
        k, v = self.kv(torch.cat([mem, h], 1)).view(b, -1, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        r = self.r_net(pos).view(-1, heads, d // heads).transpose(0, 1)
        a = memtx_ops.rel_memory_attention(q, k, v, r, self.u, self.vb, backend=self.backend)
        h = self.norm1(h + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d))))
        return self.norm2(h + self.drop(self.ff(h)))


class TinyXL(nn.Module):
    """Transformer-XL stack whose memory (each layer's input over the last M tokens) carries gradient across
    segments. x = (embeddings [B, L, d], targets [B, L]) -> (logits [B, L, V], mem)."""

    def __init__(self, layers=2, dropout=0.2, backend="reference"):
        super().__init__()
        self.layers = nn.ModuleList(XLLayer(D, HEADS, dropout, backend) for _ in range(layers))
        self.pos = nn.Parameter(0.3 * torch.randn(M + L - 2, D))  # distances >= M + L - 3 share the last row
        self.head = nn.Linear(D, VOCAB)
        self.drop = nn.Dropout(dropout)
        self.calls = []  # need_output of every call, in order

    def set_backend(self, backend):
        for layer in self.layers:
            layer.backend = backend

    def segment(self, mem, x, need_output):
        self.calls.append(need_output)
        emb, targets = x
        h, new_mem = self.drop(emb), []
        for i, layer in enumerate(self.layers):
            new_mem.append(torch.cat([mem[i], h], 1)[:, -M:])
            if i == len(self.layers) - 1 and not need_output:
                return None, tuple(new_mem)  # the last layer and the head feed no memory
            h = layer(h, mem[i], self.pos)
        return self.head(self.drop(h)), tuple(new_mem)

    def forward(self, mem, x):
        return self.segment(mem, x, need_output=True)


class LossXL(TinyXL):
    """TinyXL whose output is the segment's loss, skipped (with the last layer) when need_output=False."""

    def forward(self, mem, x, need_output=True):
        logits, new_mem = self.segment(mem, x, need_output)
        return (None if logits is None else F.cross_entropy(logits.flatten(0, 1), x[1].flatten())), new_mem


class SlotMemory(nn.Module):
    """Memformer-style memory of S slots: the segment reads [slots ; segment], the slots write by attending
    over [slots ; segment states] with a gated update. mem [B, S, d], x [B, L, d] -> (logits [B, L, V], mem)."""

    def __init__(self, dropout=0.2):
        super().__init__()
        self.read = nn.MultiheadAttention(D, HEADS, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * D, D))
        self.norm = nn.LayerNorm(D)
        self.write = nn.MultiheadAttention(D, HEADS, dropout=dropout, batch_first=True)
        self.gate = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, slots, x):
        context = torch.cat([slots, x], 1)
        h = self.norm(x + self.read(x, context, context, need_weights=False)[0])
        h = h + self.ff(h)
        written = torch.cat([slots, h], 1)
        candidate = torch.tanh(self.write(slots, written, written, need_weights=False)[0])
        gate = torch.sigmoid(self.gate(torch.cat([slots, candidate], -1)))
        return self.head(h), gate * slots + (1 - gate) * candidate


def make_model(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).to(DTYPE)


def xl_inputs(segments=T, seed=1):
    """mem0: one [B, M, d] tensor per layer; xs: (embeddings [B, L, d], targets [B, L]) per segment."""
    gen = torch.Generator().manual_seed(seed)
    mem0 = tuple(torch.randn(B, M, D, generator=gen, dtype=DTYPE).requires_grad_() for _ in range(2))
    xs = [(torch.randn(B, L, D, generator=gen, dtype=DTYPE).requires_grad_(),
           torch.randint(VOCAB, (B, L), generator=gen)) for _ in range(segments)]
    return mem0, xs


def slot_inputs(segments=T, seed=1, slots=3):
    gen = torch.Generator().manual_seed(seed)
    mem0 = torch.randn(B, slots, D, generator=gen, dtype=DTYPE).requires_grad_()
    return mem0, [torch.randn(B, L, D, generator=gen, dtype=DTYPE).requires_grad_() for _ in range(segments)]


def bptt(step, mem0, xs, truncate_every=None, memory_path_rng=False):
    """Full back-propagation through time: the steps in a loop with one graph, the memory detached entering
    segments truncate_every, 2 * truncate_every, ... ``memory_path_rng``: the random stream advances across a
    step as a call with need_output=False advances it (as in memory_replay's forward pass with such a step)."""
    mem, ys = mem0, []
    for t, x in enumerate(xs):
        if truncate_every and t and t % truncate_every == 0:
            mem = tuple(m.detach() for m in mem) if isinstance(mem, tuple) else mem.detach()
        if memory_path_rng:
            before = torch.get_rng_state()
            with torch.no_grad():
                step(mem, x, need_output=False)
            after = torch.get_rng_state()
            torch.set_rng_state(before)
        y, mem = step(mem, x)
        ys.append(y)
        if memory_path_rng:
            torch.set_rng_state(after)
    return ys, mem


def as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def leaves_of(model, mem0, xs):
    """Every tensor that should get a gradient: parameters, mem0's tensors, the float segment inputs."""
    named = dict(model.named_parameters())
    named.update({f"mem0[{i}]": m for i, m in enumerate(as_tuple(mem0))})
    for t, x in enumerate(xs):
        named.update({f"xs[{t}][{i}]": v for i, v in enumerate(as_tuple(x)) if v.requires_grad})
    return named


def run_and_backprop(run, model, mem0, xs, seed=7, cotangents="random"):
    """Runs ``run()`` from RNG seed ``seed``, back-propagates the cotangents ("random": fixed random ones for ys
    and mem_T; "sum": sum(ys)) with .backward() and returns (ys, mem_T, {name: grad})."""
    named = leaves_of(model, mem0, xs)
    for v in named.values():
        v.grad = None
    torch.manual_seed(seed)
    ys, mem_T = run()
    if cotangents == "sum":
        torch.stack([y.sum() for y in ys]).sum().backward()
    else:
        gen = torch.Generator().manual_seed(123)
        outs = [v for y in ys for v in as_tuple(y)] + list(as_tuple(mem_T))
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs])
    grads = {name: v.grad.clone() for name, v in named.items()}
    return ys, mem_T, grads


def assert_close(got, want, dtype=DTYPE):
    """The SPEC bounds of ``dtype`` (relative L2 and elementwise) for every entry of two dicts of tensors."""
    assert_close_to_reference(got, want, dtype, context="memory replay against BPTT:")


def outputs_dict(ys, mem_T):
    named = {f"y[{t}][{i}]": v for t, y in enumerate(ys) for i, v in enumerate(as_tuple(y))}
    named.update({f"mem_T[{i}]": v for i, v in enumerate(as_tuple(mem_T))})
    return named


def compare_with_bptt(model, mem0, xs, cotangents="random", truncate_every=None, memory_path_rng=False, **options):
    """MRBP against BPTT from the same RNG seed: outputs, mem_T and every gradient in float64."""
    want_ys, want_mem, want = run_and_backprop(lambda: bptt(model, mem0, xs, truncate_every, memory_path_rng),
                                               model, mem0, xs, cotangents=cotangents)
    got_ys, got_mem, got = run_and_backprop(
        lambda: memtx_ops.memory_replay(model, mem0, xs, truncate_every=truncate_every, **options), model, mem0, xs,
        cotangents=cotangents)
    assert_close(outputs_dict(got_ys, got_mem), outputs_dict(want_ys, want_mem))
    assert_close(got, want)
    return got, want


def test_transformer_xl_with_fused_attention_matches_bptt():
    """The fused CPU kernel inside the replayed step against BPTT through the pure-PyTorch attention."""
    model = make_model(TinyXL, backend="cpu")
    mem0, xs = xl_inputs()
    got_ys, got_mem, got = run_and_backprop(lambda: memtx_ops.memory_replay(model, mem0, xs), model, mem0, xs)
    model.set_backend("reference")
    want_ys, want_mem, want = run_and_backprop(lambda: bptt(model, mem0, xs), model, mem0, xs)
    assert_close(outputs_dict(got_ys, got_mem), outputs_dict(want_ys, want_mem))
    assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in got.values())


def test_slot_memory_matches_bptt():
    model = make_model(SlotMemory)
    mem0, xs = slot_inputs(segments=6)
    compare_with_bptt(model, mem0, xs)


def test_dropout_masks_come_from_the_restored_rng_state():
    """Without the RNG states the replay draws other dropout masks: shows the tests above exercise dropout."""
    model = make_model(SlotMemory)
    mem0, xs = slot_inputs()
    *_, want = run_and_backprop(lambda: bptt(model, mem0, xs), model, mem0, xs)
    *_, got = run_and_backprop(lambda: memtx_ops.memory_replay(model, mem0, xs, preserve_rng=False), model, mem0, xs)
    assert rel_error(got["head.weight"], want["head.weight"]) > 1e-3


@pytest.mark.parametrize("truncate_every", [1, 2])
def test_truncation_matches_truncated_bptt(truncate_every):
    model = make_model(TinyXL)
    mem0, xs = xl_inputs()
    got, _ = compare_with_bptt(model, mem0, xs, truncate_every=truncate_every)
    *_, untruncated = run_and_backprop(lambda: bptt(model, mem0, xs), model, mem0, xs)
    assert rel_error(got["xs[0][0]"], untruncated["xs[0][0]"]) > 1e-3  # the cut changes the gradient


def test_offload_matches_bptt():
    model = make_model(TinyXL)
    mem0, xs = xl_inputs()
    compare_with_bptt(model, mem0, xs, offload=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_with_fused_attention_matches_bptt():
    model = make_model(TinyXL, backend="auto").cuda()
    mem0, xs = xl_inputs()
    mem0 = tuple(m.detach().cuda().requires_grad_() for m in mem0)
    xs = [(e.detach().cuda().requires_grad_(), y.cuda()) for e, y in xs]
    got, _ = compare_with_bptt(model, mem0, xs, offload=True)
    assert all(g.is_cuda for g in got.values())


def test_chained_rollouts_match_bptt_over_both():
    """mem_T of one call is mem0 of the next; back-propagating the second reaches the first."""
    model = make_model(TinyXL)
    mem0, xs = xl_inputs(segments=6)

    def chained():
        ys1, mem = memtx_ops.memory_replay(model, mem0, xs[:3])
        ys2, mem = memtx_ops.memory_replay(model, mem, xs[3:])
        return ys1 + ys2, mem

    want_ys, want_mem, want = run_and_backprop(lambda: bptt(model, mem0, xs), model, mem0, xs)
    got_ys, got_mem, got = run_and_backprop(chained, model, mem0, xs)
    assert_close(outputs_dict(got_ys, got_mem), outputs_dict(want_ys, want_mem))
    assert_close(got, want)


class PassThroughMemory(nn.Module):
    """A memory whose cotangent reaches the segment input unchanged: ``mem_next = decay * mem + x`` (``decay`` 0:
    the input itself), so autograd hands back dmem_{t+1} itself as x_t's gradient. y, read off the memory only: a
    loss, or (``empty_y``) per-token losses of no token, an empty tensor. mem, x ``[B, D]``."""

    def __init__(self, decay, empty_y=False):
        super().__init__()
        self.decay, self.empty_y = decay, empty_y
        self.w = nn.Parameter(torch.randn(B, D))

    def forward(self, mem, x, need_output=True):
        mem_next = x if self.decay == 0 else self.decay * mem + x
        if not need_output:
            return None, mem_next
        y = torch.tanh(mem * self.w)
        return (y[x > 1e9] if self.empty_y else y.sum()), mem_next


def row_inputs(segments, seed=1):
    """mem0 ``[B, D]`` and ``segments`` inputs ``[B, D]``, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randn(B, D, generator=gen, dtype=DTYPE).requires_grad_() for _ in range(segments + 1)]
    return rows[0], rows[1:]


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_input_gradient_that_is_the_carried_memory_gradient_is_its_own(decay):
    """x_t's gradient is dmem_{t+1} passed through: it must not stay a view of the buffer that carries dmem from
    step to step, which step t - 1 overwrites (x_2 .. x_{T-2} got x_0's gradient)."""
    model = make_model(PassThroughMemory, decay=decay)
    mem0, xs = row_inputs(segments=6)
    with pytest.warns(UserWarning, match="not the same scalar"):  # random cotangents of every y and of mem_T
        compare_with_bptt(model, mem0, xs, memory_path_rng=True)


def test_need_output_with_empty_outputs_matches_bptt():
    """Outputs with no element (no token counted in any segment): sum(ys) + mem_T.sum() gives BPTT's gradients
    through the memory and none to w, instead of failing to read a scale off an empty cotangent."""
    model = make_model(PassThroughMemory, decay=0.5, empty_y=True)
    mem0, xs = row_inputs(segments=4)
    grads = []
    for run in (lambda: bptt(model, mem0, xs), lambda: memtx_ops.memory_replay(model, mem0, xs)):
        for v in (mem0, *xs):
            v.grad = None
        ys, mem_T = run()
        (sum(y.sum() for y in ys) + mem_T.sum()).backward()
        assert model.w.grad is None or not model.w.grad.any()
        grads.append({f"x{t}": v.grad for t, v in enumerate((mem0, *xs))})
    assert_close(grads[1], grads[0])


def test_memory_and_inputs_made_under_inference_mode():
    """mem0 and xs made under torch.inference_mode (a memory carried over from evaluation): autograd can neither save
    them nor read their versions, so the rollout runs on copies of them; the parameters get BPTT's gradients."""
    model = make_model(SlotMemory)
    mem0, xs = slot_inputs()
    with torch.inference_mode():
        mem0, xs = mem0.detach().clone(), [x.detach().clone() for x in xs]
    params = list(model.parameters())
    grads = []
    for run in (lambda: bptt(model, mem0.clone(), [x.clone() for x in xs]),  # plain autograd needs the copies too
                lambda: memtx_ops.memory_replay(model, mem0, xs)):
        torch.manual_seed(7)
        ys, mem_T = run()
        grads.append(dict(enumerate(torch.autograd.grad(sum(y.sum() for y in ys) + mem_T.sum(), params))))
    assert_close(grads[1], grads[0])


def test_need_output_forward_skips_the_output_and_backward_reuses_the_replay():
    """Forward: T memory-only calls, then T replays that give the losses; sum(ys).backward() calls nothing."""
    model = make_model(LossXL)
    mem0, xs = xl_inputs()
    want_ys, want_mem, want = run_and_backprop(lambda: bptt(model, mem0, xs, memory_path_rng=True), model, mem0, xs,
                                               cotangents="sum")
    model.calls.clear()
    torch.manual_seed(7)
    ys, mem_T = memtx_ops.memory_replay(model, mem0, xs)
    assert model.calls == [False] * T + [True] * T
    assert all(y.dim() == 0 and y.requires_grad for y in ys)
    assert_close(outputs_dict(ys, mem_T), outputs_dict(want_ys, want_mem))
    got_ys, got_mem, got = run_and_backprop(lambda: memtx_ops.memory_replay(model, mem0, xs), model, mem0, xs,
                                            cotangents="sum")
    assert_close(got, want)
    assert model.calls == ([False] * T + [True] * T) * 2  # nothing replayed in backward


def test_need_output_other_cotangents_replay_again_exactly():
    """Random cotangents of the losses and of mem_T: a second replay (with a warning), still exact."""
    model = make_model(LossXL)
    mem0, xs = xl_inputs()
    with pytest.warns(UserWarning, match="not the same scalar"):
        compare_with_bptt(model, mem0, xs, memory_path_rng=True)
    assert model.calls[-T:] == [True] * T


def test_need_output_gradient_through_mem_T_replays_the_memory_path_only():
    model = make_model(LossXL)
    mem0, xs = xl_inputs()

    def chained():
        ys1, mem = memtx_ops.memory_replay(model, mem0, xs[:2])
        ys2, mem = memtx_ops.memory_replay(model, mem, xs[2:])
        return ys1 + ys2, mem

    want_ys, _, want = run_and_backprop(lambda: bptt(model, mem0, xs, memory_path_rng=True), model, mem0, xs,
                                        cotangents="sum")
    model.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_ys, _, got = run_and_backprop(chained, model, mem0, xs, cotangents="sum")
    assert_close(got, want)
    assert model.calls == [False] * 2 + [True] * 2 + [False] * 3 + [True] * 3 + [False] * 2


def test_rng_state_afterwards_is_as_if_the_steps_ran_once():
    model = make_model(SlotMemory)
    mem0, xs = slot_inputs()
    torch.manual_seed(3)
    bptt(model, mem0, xs)
    want = torch.rand(4)
    torch.manual_seed(3)
    ys, mem_T = memtx_ops.memory_replay(model, mem0, xs)
    state = torch.get_rng_state()
    assert torch.equal(torch.rand(4), want)
    torch.set_rng_state(state)
    torch.stack([y.sum() for y in ys]).sum().backward()
    assert torch.equal(torch.rand(4), want)  # the replays leave the state as they found it


def test_rng_state_with_need_output_is_as_if_the_memory_path_ran_once():
    model = make_model(LossXL)
    mem0, xs = xl_inputs()
    torch.manual_seed(3)
    with torch.no_grad():
        mem = mem0
        for x in xs:
            _, mem = model(mem, x, need_output=False)
    want = torch.rand(4)
    torch.manual_seed(3)
    memtx_ops.memory_replay(model, mem0, xs)
    assert torch.equal(torch.rand(4), want)


def test_autocast_is_reentered_for_the_replay():
    """CPU autocast to bfloat16: the replay in backward must compute in the forward pass's precisions. (Without
    the cast cache: with it, BPTT casts each weight once and sums all segments' gradients in bfloat16, while the
    replays sum them in float32, which differs by bfloat16 rounding.)"""
    model = make_model(SlotMemory).float()
    mem0, xs = slot_inputs()
    mem0, xs = mem0.detach().float().requires_grad_(), [x.detach().float().requires_grad_() for x in xs]

    def under_autocast(run):
        def wrapped():
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                return run()
        return wrapped

    *_, want = run_and_backprop(under_autocast(lambda: bptt(model, mem0, xs)), model, mem0, xs)
    *_, got = run_and_backprop(under_autocast(lambda: memtx_ops.memory_replay(model, mem0, xs)), model, mem0, xs)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("need_output", [False, True])
def test_each_parameter_gets_one_gradient_per_backward(need_output):
    model = make_model(LossXL if need_output else TinyXL)
    mem0, xs = xl_inputs()
    counts = {name: 0 for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: counts.__setitem__(name, counts[name] + 1))
    ys, _ = memtx_ops.memory_replay(model, mem0, xs)
    torch.stack([y.sum() for y in ys]).sum().backward()
    assert set(counts.values()) == {1}, counts


def test_plain_function_with_explicit_params_and_bound_method():
    model = make_model(SlotMemory)
    mem0, xs = slot_inputs()
    *_, want = run_and_backprop(lambda: bptt(model, mem0, xs), model, mem0, xs)
    *_, got = run_and_backprop(lambda: memtx_ops.memory_replay(lambda m, x: model(m, x), mem0, xs,
                                                               params=model.parameters()), model, mem0, xs)
    assert_close(got, want)
    *_, got = run_and_backprop(lambda: memtx_ops.memory_replay(model.forward, mem0, xs), model, mem0, xs)
    assert_close(got, want)


def test_without_grad_the_steps_simply_run():
    model = make_model(LossXL).eval()
    mem0, xs = xl_inputs()
    with torch.no_grad():
        want_ys, want_mem = bptt(model, mem0, xs)
        model.calls.clear()
        ys, mem_T = memtx_ops.memory_replay(model, mem0, xs)
    assert model.calls == [True] * T and not mem_T[0].requires_grad
    assert_close(outputs_dict(ys, mem_T), outputs_dict(want_ys, want_mem))


def _step_changing(change):
    """A step whose memory is ``change(mem * mean(x))`` and output ``sum(x)``."""
    def step(mem, x):
        return x.sum(), change(mem * x.mean())
    return step


_keep = _step_changing(lambda m: m)
ERROR_CASES = [  # (arguments of memory_replay other than step=_keep, mem0=ones(2), xs=[ones(2)]; error; message)
    (dict(xs=[]), ValueError, "xs must hold at least one"),
    (dict(xs=torch.ones(3, 2)), TypeError, "xs must be a list or tuple"),
    (dict(xs=[torch.ones(2), 3.0]), TypeError, r"xs\[1\] must be a tensor"),
    (dict(mem0=[]), TypeError, "mem0 must be a tensor"),
    (dict(truncate_every=0), ValueError, "truncate_every must be >= 1"),
    (dict(truncate_every=1.5), TypeError, "truncate_every must be a positive int"),
    (dict(truncate_every=True), TypeError, "truncate_every must be a positive int"),
    (dict(offload=1), TypeError, "offload must be a bool"),
    (dict(params=torch.ones(2)), TypeError, "params must be an iterable"),
    (dict(params=[torch.ones(2), "w"]), TypeError, "params must contain tensors only, got a str at index 1"),
    (dict(step="not a step"), TypeError, "step must be callable"),
    (dict(step=_step_changing(lambda m: m[:1])), ValueError,
     r"changed memory tensor 0 at segment 0: mem0 has shape \(2,\)"),
    (dict(step=_step_changing(lambda m: m.float()), mem0=torch.ones(2, dtype=DTYPE), xs=[torch.ones(2, dtype=DTYPE)]),
     TypeError, "changed the dtype of memory tensor 0"),
    (dict(step=_step_changing(lambda m: (m, m))), ValueError,
     "changed the memory's structure at segment 0: mem0 is a single tensor"),
    (dict(step=_step_changing(lambda m: [m.tolist()])), TypeError,
     "the memory that step returned at segment 0 must be a tensor"),
    (dict(step=lambda m, x: (None, m)), TypeError, "the output y that step returned at segment 0 must be a tensor"),
    (dict(step=lambda m, x: m), TypeError, r"step must return a pair \(y, mem_next\)"),
]


@pytest.mark.parametrize("arguments, error, match", ERROR_CASES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_errors_name_the_argument(arguments, error, match, requires_grad):
    arguments = dict(dict(step=_keep, mem0=torch.ones(2), xs=[torch.ones(2)]), **arguments)
    if requires_grad and isinstance(arguments["mem0"], torch.Tensor):
        arguments["mem0"] = arguments["mem0"].clone().requires_grad_()
    step, mem0, xs = arguments.pop("step"), arguments.pop("mem0"), arguments.pop("xs")
    with pytest.raises(error, match=f"memory_replay: .*{match}"):
        memtx_ops.memory_replay(step, mem0, xs, **arguments)


def test_error_when_the_memory_changes_later_or_is_modified_in_place():
    step = lambda m, x: (x.sum(), m * x.mean() if x.numel() == 2 else torch.zeros(3))  # noqa: E731
    with pytest.raises(ValueError, match="changed memory tensor 0 at segment 2: mem0 has shape \\(2,\\)"):
        memtx_ops.memory_replay(step, torch.ones(2, requires_grad=True), [torch.ones(2), torch.ones(2), torch.ones(4)])

    def in_place(mem, x):
        mem.mul_(0.5) if not mem.requires_grad else None
        return (mem * x).sum(), mem * x
    with pytest.raises(RuntimeError, match="step modified its input memory in place at segment 1"):
        memtx_ops.memory_replay(in_place, torch.ones(2, requires_grad=True), [torch.ones(2)] * 3)


def _ddp_rank(rank, world_size, store_file, out_dir):
    with gloo_group(rank, world_size, store_file):
        model = make_model(SlotMemory)
        rollout = nn.parallel.DistributedDataParallel(Rollout(model))
        counts = {name: 0 for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda _, name=name: counts.__setitem__(name, counts[name] + 1))
        mem0, xs = slot_inputs(seed=10 + rank)
        torch.manual_seed(100 + rank)
        ys, _ = rollout(mem0, xs)
        torch.stack([y.square().mean() for y in ys]).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        torch.save((grads, counts), os.path.join(out_dir, f"{rank}.pt"))


class Rollout(nn.Module):
    """The unit DDP wraps: one MRBP rollout of ``step``, so DDP sees one forward and one backward per rollout."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, mem0, xs):
        return memtx_ops.memory_replay(self.step, mem0, xs)


def test_ddp_gloo_two_processes_match_single_process_bptt(tmp_path):
    spawn_ranks(_ddp_rank, (2, str(tmp_path / "store"), str(tmp_path)), [str(tmp_path / f"{r}.pt") for r in (0, 1)])
    model = make_model(SlotMemory)
    want = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for rank in (0, 1):
        mem0, xs = slot_inputs(seed=10 + rank)
        model.zero_grad()
        torch.manual_seed(100 + rank)
        ys, _ = bptt(model, mem0, xs)
        torch.stack([y.square().mean() for y in ys]).sum().backward()
        for name, p in model.named_parameters():
            want[name] += p.grad / 2
    for rank in (0, 1):
        grads, counts = torch.load(tmp_path / f"{rank}.pt")
        assert set(counts.values()) == {1}, counts
        assert_close(grads, want)


RESIDENT_SCRIPT = """
import sys, torch, memtx_ops
from torch import nn
import torch.nn.functional as F

class SlotStep(nn.Module):  # Memformer-style: [slots ; segment] through a layer, the slots move by a gate
    def __init__(self, d=256, vocab=1024):
        super().__init__()
        self.embed, self.layer = nn.Embedding(vocab, d), nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True)
        self.gate, self.head = nn.Linear(2 * d, d), nn.Linear(d, vocab)

    def forward(self, slots, x):
        tokens, targets = x
        h = self.layer(torch.cat([slots, self.embed(tokens)], 1))
        new, out = h[:, :slots.shape[1]], h[:, slots.shape[1]:]
        gate = torch.sigmoid(self.gate(torch.cat([slots, new], -1)))
        return F.cross_entropy(self.head(out).flatten(0, 1), targets.flatten()), gate * slots + (1 - gate) * new

def rollout(T):
    model.zero_grad(set_to_none=True)
    losses, _ = memtx_ops.memory_replay(model, slots, xs[:T], offload=offload)
    torch.stack(losses).sum().backward()

T, offload = int(sys.argv[1]), sys.argv[2] == "1"
torch.manual_seed(0)
model, slots = SlotStep(), torch.randn(8, 64, 256)  # 0.5 MiB of memory per segment
xs = [tuple(torch.randint(1024, (8, 64)) for _ in range(2)) for _ in range(max(T, 8))]
for _ in range(5):  # the heap's steady state under replays (a few MiB more than under plain steps)
    rollout(8)
for _ in range(2):
    rollout(T)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
print(peak, (T - 1) * slots.numel() * slots.element_size())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
@pytest.mark.parametrize("offload", [False, True])
def test_resident_peak_grows_by_the_stored_memories_only(tmp_path, offload):
    """SPEC §3: the peak grows with T by the stored memories and nothing else. Measured as resident memory (VmHWM)
    under the default allocator, in fresh processes that first run five rollouts of T=8 (glibc's heap takes about
    16 replayed steps to reach its steady state, which a T=2 rollout alone never does), then T=2 or T=40: the peak
    grows by at most 1.5x the stored bytes plus 8 MiB (stored as separate tensors among each step's temporaries,
    the memories fragmented the heap: about 4x)."""
    import subprocess
    import sys

    script = tmp_path / "rollout.py"
    script.write_text(RESIDENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    peaks = {}
    for segments in (2, 40):
        result = subprocess.run([sys.executable, str(script), str(segments), str(int(offload))], capture_output=True,
                                text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[segments] = [int(v) for v in result.stdout.split()]
    growth = peaks[40][0] - peaks[2][0]
    stored = peaks[40][1] - peaks[2][1]
    assert growth <= 1.5 * stored + 8 * 2**20, f"resident peak grew {growth / 2**20:.1f} MiB for {stored / 2**20:.1f} MiB"


@pytest.mark.parametrize("need_output", [False, True])
def test_stored_memories_are_freed_by_the_backward_not_by_dropping_the_outputs(monkeypatch, need_output):
    """In a training loop the previous rollout's losses stay referenced until the next rollout returns; its stored
    memories must not stay with them (two rollouts' memories at the peak). With retain_graph, they stay."""
    import importlib
    import weakref

    module = importlib.import_module("memtx_ops.ops.memory_replay")

    released = []
    original = module._MemoryStore.release

    def spy(store):
        buffers = original(store)
        released.extend(weakref.ref(b) for b in buffers)
        return buffers

    monkeypatch.setattr(module._MemoryStore, "release", spy)
    model = make_model(LossXL if need_output else SlotMemory)
    mem0, xs = xl_inputs() if need_output else slot_inputs()
    for retain in (True, False):
        released.clear()
        ys, _ = memtx_ops.memory_replay(model, mem0, xs)
        total = torch.stack(ys).sum()
        first = torch.autograd.grad(total, mem0, retain_graph=retain)[0]
        assert released and all(r() is not None for r in released) == retain
        if retain:  # a second backward replays from the memories still held
            torch.testing.assert_close(torch.autograd.grad(total, mem0)[0], first, rtol=0, atol=0)
