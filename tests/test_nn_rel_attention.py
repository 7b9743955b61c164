"""Drop-in RelPartialLearnableMultiHeadAttn against a time-major eager module written like Transformer-XL's."""

import warnings

import pytest
import torch
from torch import nn

from memtx_ops.nn.generation import KeyValueCache
from memtx_ops.nn.rel_attention import RelPartialLearnableMultiHeadAttn, clamp_rows, window_of_mask


class TimeMajorTxlAttn(nn.Module):
    """Transformer-XL's relative attention layer restated in its own time-major layout ([len, bsz, ...]),
    with AC/BD einsums, the zero-pad shift along the key axis, -inf masking and softmax over keys."""

    def __init__(self, n_head, d_model, d_head, pre_lnorm=False):
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.r_r_bias = nn.Parameter(torch.randn(n_head, d_head) * 0.3)
        self.r_w_bias = nn.Parameter(torch.randn(n_head, d_head) * 0.3)

    @staticmethod
    def shift(x):  # x [qlen, klen, bsz, n_head]
        zero = x.new_zeros((x.size(0), 1, *x.shape[2:]))
        padded = torch.cat([zero, x], 1).view(x.size(1) + 1, x.size(0), *x.shape[2:])
        return padded[1:].view_as(x)

    def forward(self, w, r, attn_mask, mems=None):
        qlen, bsz = w.shape[:2]
        cat = w if mems is None else torch.cat([mems, w], 0)
        heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)
        q, k, v = torch.chunk(heads, 3, dim=-1)
        klen = k.shape[0]
        q = q[-qlen:].view(qlen, bsz, self.n_head, self.d_head)
        k = k.view(klen, bsz, self.n_head, self.d_head)
        v = v.view(klen, bsz, self.n_head, self.d_head)
        r_k = self.r_net(r).view(r.shape[0], self.n_head, self.d_head)
        ac = torch.einsum("ibnd,jbnd->ijbn", q + self.r_w_bias, k)
        bd = self.shift(torch.einsum("ibnd,jnd->ijbn", q + self.r_r_bias, r_k))
        score = (ac + bd) / self.d_head ** 0.5
        mask = attn_mask if attn_mask.dim() == 3 else attn_mask[:, :, None]
        score = score.masked_fill(mask[:, :, :, None], float("-inf"))
        prob = torch.softmax(score, dim=1)
        vec = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(qlen, bsz, -1)
        out = self.o_net(vec)
        return w + out if self.pre_lnorm else self.layer_norm(w + out)


def txl_mask(qlen, mlen, same_length=False, mem_len=None, dim3=True):
    klen = qlen + mlen
    ones = torch.ones(qlen, klen, dtype=torch.uint8)
    if same_length:
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = (torch.triu(ones, 1 + mlen) + torch.tril(ones, -shift)).bool()
    else:
        mask = torch.triu(ones, diagonal=1 + mlen).bool()
    return mask[:, :, None] if dim3 else mask


def positions(klen, d_model, clamp_len=0):
    pos = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    inv = 1 / (10000 ** (torch.arange(0, d_model, 2.0, dtype=torch.float64) / d_model))
    ang = pos[:, None] * inv[None]
    return torch.cat([ang.sin(), ang.cos()], -1)[:, None, :]


CONFIGS = [
    dict(qlen=20, mlen=12, pre_lnorm=False),
    dict(qlen=16, mlen=0, pre_lnorm=True),
    dict(qlen=24, mlen=30, same_length=True, mem_len=30),
    dict(qlen=24, mlen=10, same_length=True, mem_len=30),  # partial memory
    dict(qlen=18, mlen=14, clamp_len=9, dim3=False),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_transformer_xl_layer(cfg, backend):
    n_head, d_model, d_head, bsz = 3, 24, 8, 2
    qlen, mlen = cfg["qlen"], cfg["mlen"]
    original = TimeMajorTxlAttn(n_head, d_model, d_head, cfg.get("pre_lnorm", False)).double()
    fused = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout=0.0,
                                             pre_lnorm=cfg.get("pre_lnorm", False), backend=backend).double()
    fused.load_state_dict(original.state_dict(), strict=True)
    w = torch.randn(qlen, bsz, d_model, dtype=torch.float64, requires_grad=True)
    mems = torch.randn(mlen, bsz, d_model, dtype=torch.float64, requires_grad=True) if mlen else None
    r = positions(qlen + mlen, d_model, cfg.get("clamp_len", 0))
    mask = txl_mask(qlen, mlen, cfg.get("same_length", False), cfg.get("mem_len"), cfg.get("dim3", True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the fused path runs
        out = fused(w, r, attn_mask=mask, mems=mems)
    expected = original(w, r, mask, mems)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    leaves = [w] + ([mems] if mems is not None else []) + list(fused.parameters())
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, [w] + ([mems] if mems is not None else []) + list(original.parameters()), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_mask_recognition():
    assert window_of_mask(txl_mask(8, 5), 8, 13) == (True, None)
    assert window_of_mask(txl_mask(8, 5, same_length=True, mem_len=5), 8, 13) == (True, 5)
    odd = txl_mask(8, 5).clone()
    odd[3, 0] = True
    assert window_of_mask(odd, 8, 13) == (False, None)


def test_clamp_rows_reads_repeated_rows():
    r = positions(20, 8, clamp_len=6).flip(0)
    assert clamp_rows(r) == 7
    assert clamp_rows(positions(20, 8).flip(0)) == 20


def test_arbitrary_mask_falls_back_with_warning():
    torch.manual_seed(0)
    original = TimeMajorTxlAttn(2, 16, 8).double()
    fused = RelPartialLearnableMultiHeadAttn(2, 16, 8, dropout=0.0).double()
    fused.load_state_dict(original.state_dict())
    w = torch.randn(6, 1, 16, dtype=torch.float64)
    mask = txl_mask(6, 4)
    mask[2, 1] = True
    mems, r = torch.randn(4, 1, 16, dtype=torch.float64), positions(10, 16)
    with pytest.warns(UserWarning, match="neither causal-with-memory nor same_length"):
        out = fused(w, r, attn_mask=mask, mems=mems)
    torch.testing.assert_close(out, original(w, r, mask, mems), rtol=1e-10, atol=1e-10)


def test_shared_biases_are_not_copied():
    r_w, r_r = nn.Parameter(torch.zeros(2, 8)), nn.Parameter(torch.zeros(2, 8))
    layer = RelPartialLearnableMultiHeadAttn(2, 16, 8, 0.1, r_r_bias=r_r, r_w_bias=r_w)
    assert layer.r_w_bias is r_w and layer.r_r_bias is r_r


def test_cross_head_and_aged_memory_match_eager_path():
    """kv_head_index and mem_offset reach the fused op; the eager fallback computes the same thing."""
    torch.manual_seed(1)
    layer = RelPartialLearnableMultiHeadAttn(4, 32, 8, dropout=0.0, backend="cpu").double()
    nn.init.normal_(layer.r_w_bias, std=0.3)
    nn.init.normal_(layer.r_r_bias, std=0.3)
    qlen, mlen, offset, bsz = 10, 7, 10, 2
    w = torch.randn(qlen, bsz, 32, dtype=torch.float64)
    mems = torch.randn(mlen, bsz, 32, dtype=torch.float64)
    r = positions(qlen + mlen + offset, 32)
    perm = torch.tensor([2, 3, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = layer(w, r, attn_mask=txl_mask(qlen, mlen), mems=mems, kv_head_index=perm, mem_offset=offset)
    heads = layer.qkv_net(torch.cat([mems, w])).view(qlen + mlen, bsz, 3, 4, 8).permute(2, 1, 3, 0, 4)
    r_head = layer.r_net(r.flip(0).squeeze(1)).view(-1, 4, 8).transpose(0, 1)
    vec = layer._eager_attention(heads[0][:, :, mlen:], heads[1], heads[2], r_head, txl_mask(qlen, mlen), perm, offset)
    eager = layer.layer_norm(w + layer.o_net(vec.permute(2, 0, 1, 3).reshape(qlen, bsz, 32)))
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_stated_window_and_clamp_equal_the_recognised_mask(cfg):
    """A caller that knows its mask states window= and clamp_len= instead (no tensor read on the host)."""
    n_head, d_model, d_head, bsz = 3, 24, 8, 2
    qlen, mlen = cfg["qlen"], cfg["mlen"]
    layer = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout=0.0,
                                             pre_lnorm=cfg.get("pre_lnorm", False)).double()
    w = torch.randn(qlen, bsz, d_model, dtype=torch.float64)
    mems = torch.randn(mlen, bsz, d_model, dtype=torch.float64) if mlen else None
    r = positions(qlen + mlen, d_model, cfg.get("clamp_len", 0))
    mask = txl_mask(qlen, mlen, cfg.get("same_length", False), cfg.get("mem_len"), cfg.get("dim3", True))
    window = cfg.get("mem_len") if cfg.get("same_length") else None
    expected = layer(w, r, attn_mask=mask, mems=mems)
    stated = layer(w, r, mems=mems, window=window, clamp_len=cfg.get("clamp_len", -1))
    torch.testing.assert_close(stated, expected, rtol=0, atol=0)


def test_stated_window_must_be_an_int_or_none():
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0)
    with pytest.raises(TypeError, match="window must be 'mask', None or an int, got 2.5"):
        layer(torch.randn(3, 1, 8), positions(3, 8).float(), window=2.5, clamp_len=-1)


def drop_in_pair(n_head=2, d_model=16, d_head=8, seed=0, **options):
    """The eager Transformer-XL layer and the drop-in one with its weights, float64."""
    torch.manual_seed(seed)
    original = TimeMajorTxlAttn(n_head, d_model, d_head).double()
    fused = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout=0.0, **options).double()
    fused.load_state_dict(original.state_dict())
    return original, fused


def test_masks_per_batch_entry():
    """A [qlen, klen, bsz] mask (Transformer-XL's masked_fill broadcasts it over the heads): alike for every entry,
    it is recognised; with entries masked apart (padding), it falls back to the eager path, which masks each."""
    original, fused = drop_in_pair()
    qlen, mlen, bsz = 5, 4, 3
    w, mems = torch.randn(qlen, bsz, 16, dtype=torch.float64), torch.randn(mlen, bsz, 16, dtype=torch.float64)
    r = positions(qlen + mlen, 16)
    alike = txl_mask(qlen, mlen).repeat(1, 1, bsz)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recognised: the fused path runs
        out = fused(w, r, attn_mask=alike, mems=mems)
    torch.testing.assert_close(out, original(w, r, alike, mems), rtol=1e-10, atol=1e-10)
    padded = alike.clone()
    padded[:, 0, 1] = True  # batch entry 1 does not see the first memory position
    with pytest.warns(UserWarning, match="neither causal-with-memory nor same_length"):
        out = fused(w, r, attn_mask=padded, mems=mems)
    torch.testing.assert_close(out, original(w, r, padded, mems), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out[:, 1], original(w, r, alike, mems)[:, 1])


def test_equal_rows_of_a_learned_r_each_get_their_gradient():
    """clamp_len=None reads a clamp off r's repeated rows; a learned r (requires grad) whose far rows are equal now
    keeps every row, so each gets its own gradient (read as one row, they all went to the clamp row)."""
    original, fused = drop_in_pair()
    qlen, mlen, bsz = 4, 4, 2
    w, mems = torch.randn(qlen, bsz, 16, dtype=torch.float64), torch.randn(mlen, bsz, 16, dtype=torch.float64)
    table = torch.randn(qlen + mlen, 1, 16, dtype=torch.float64)
    table[:5] = table[5]  # distances 2 .. 7 alike
    r = table.clone().requires_grad_()
    mask, grad = txl_mask(qlen, mlen), torch.randn(qlen, bsz, 16, dtype=torch.float64)
    got, = torch.autograd.grad(fused(w, r, attn_mask=mask, mems=mems), r, grad)
    want, = torch.autograd.grad(original(w, r, mask, mems), r, grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_bad_clamp_len_r_and_mask_are_refused():
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0)
    w, r = torch.randn(3, 2, 8), positions(3, 8).float()
    for clamp_len in (2.5, "x", True):
        with pytest.raises(TypeError, match="clamp_len must be None or an int"):
            layer(w, r, window=None, clamp_len=clamp_len)
        with pytest.raises(TypeError, match="clamp_len must be None or an int"):
            RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0, clamp_len=clamp_len)
    with pytest.raises(ValueError, match=r"r must have klen \+ mem_offset = 3 rows .* got 1"):
        layer(w, r[:1], attn_mask=txl_mask(3, 0))
    with pytest.raises(ValueError, match=r"attn_mask must be \[qlen, klen\] or \[qlen, klen, 1 or bsz\]"):
        layer(w, r, attn_mask=txl_mask(3, 0).repeat(1, 1, 3))


def test_attention_dropout_in_training_compiles_whole():
    """dropatt > 0 in training takes the eager path: its warning is given in eager mode only, so that a compiled
    step has no graph break."""
    torch.manual_seed(0)
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0, dropatt=0.1).train()
    w, mems, r = torch.randn(3, 2, 8), torch.randn(2, 2, 8), positions(5, 8).float()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(w, r, mems=mems, window=None, clamp_len=-1).sum().backward()
    assert layer.qkv_net.weight.grad is not None


def small_segment(bsz=2, qlen=3, mlen=2, d_model=8):
    """w, mems, r (float32) and Transformer-XL's causal mask for a layer of d_model 8."""
    torch.manual_seed(0)
    w, mems = torch.randn(qlen, bsz, d_model), torch.randn(mlen, bsz, d_model)
    return w, mems, positions(qlen + mlen, d_model).float(), txl_mask(qlen, mlen)


def test_r_expanded_over_the_batch_is_refused():
    """Transformer-XL's pos_emb(pos_seq, bsz) layout [klen, bsz, d_model] was read as bsz * klen rows of r (output
    off by 0.15 for an expansion of the same embeddings); r must be [rlen, 1, d_model]."""
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0)
    w, mems, r, mask = small_segment()
    expected = r"r must have shape \[rlen, 1, d_model=8\] .*pos_emb\[:, :1\].* got \(5, 2, 8\)"
    with pytest.raises(ValueError, match=expected):
        layer(w, r.expand(5, 2, 8), mask, mems)


def fused_and_eager_layers():
    """The same layer taking the fused path (eval) and the eager one (attention dropout in training)."""
    return [RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0).eval(),
            RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0, dropatt=0.1).train()]


@pytest.mark.parametrize("layer", fused_and_eager_layers(), ids=["fused", "eager"])
@pytest.mark.parametrize("options, error, message", [
    (dict(window=0), ValueError, r"window must be >= 1 .* got 0"),
    (dict(window=-1), ValueError, r"window must be >= 1 .* got -1"),
    (dict(mem_offset=-1), ValueError, r"mem_offset must be >= 0 and < 2\*\*62, got -1"),
    (dict(mem_offset=1.0), TypeError, r"mem_offset must be an int, got 1.0"),
    (dict(kv_head_index=torch.tensor([-1, 0])), ValueError, r"kv_head_index values must lie in \[0, (n_head|Hk)=2\), "
                                                            r"got values in \[-1, 0\]"),
    (dict(kv_head_index=torch.tensor([0, 5])), ValueError, r"kv_head_index values must lie in \[0, (n_head|Hk)=2\)"),
    (dict(kv_head_index=torch.tensor([0, 1, 1])), ValueError,
     r"kv_head_index must have shape \[n_head=2\], got \(3,\)"),
    (dict(kv_head_index=torch.tensor([0.0, 1.0])), TypeError, r"kv_head_index must be an int32 or int64 tensor"),
    (dict(kv_head_index=[0, 1]), TypeError, r"kv_head_index must be an int32 or int64 tensor .* got list"),
], ids=["window=0", "window=-1", "mem_offset=-1", "mem_offset=1.0", "heads<0", "heads>=H", "heads_shape",
        "heads_float", "heads_list"])
def test_eager_path_checks_window_mem_offset_and_kv_head_index(layer, options, error, message):
    """The eager path (attention dropout, or a mask the op cannot express) made none of the op's checks: a window
    of 0 (without attn_mask: an all-NaN output), a negative mem_offset or head computed silently, a head past the
    last gave an IndexError."""
    w, mems, r, mask = small_segment()
    r = r[1:] if options.get("mem_offset") == -1 else r  # the row count that offset asks for
    with pytest.raises(error, match=message):
        layer(w, r, mask, mems, **options)


def test_refused_call_leaves_the_kv_cache_as_it_was():
    """The checks come before anything is projected: a refused call appends nothing to a kv_cache."""
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0).eval()
    w, mems, r, _ = small_segment()
    cache = KeyValueCache()
    with torch.no_grad(), pytest.raises(ValueError, match="window must be >= 1"):
        layer(w, r, None, mems, window=0, clamp_len=-1, kv_cache=cache)
    assert len(cache) == 0


META = torch.device("meta")


@pytest.mark.parametrize("case, error, message", [
    (lambda w, mems, r: (w[0], mems, r), ValueError,
     r"w must have shape \[qlen >= 1, bsz >= 1, d_model=8\], got \(2, 8\)"),
    (lambda w, mems, r: (w[..., :6], mems, r), ValueError, r"w must have shape .* got \(3, 2, 6\)"),
    (lambda w, mems, r: (w[:0], mems, r[:2]), ValueError, r"w must have shape \[qlen >= 1.* got \(0, 2, 8\)"),
    (lambda w, mems, r: (w.double(), mems.double(), r.double()), TypeError,
     r"w must have the layer's dtype torch.float32 .* got torch.float64"),
    (lambda w, mems, r: (w.long(), mems.long(), r), TypeError, r"w must have the layer's dtype .* got torch.int64"),
    (lambda w, mems, r: (w.to(META), mems.to(META), r.to(META)), ValueError,
     r"w is on meta but the layer's weights are on cpu"),
    (lambda w, mems, r: (w, mems[:, :1], r), ValueError,
     r"mems must have shape \[mlen, bsz=2, d_model=8\], got \(2, 1, 8\)"),
    (lambda w, mems, r: (w, mems[..., :6], r), ValueError, r"mems must have shape .* got \(2, 2, 6\)"),
    (lambda w, mems, r: (w, mems[0], r), ValueError, r"mems must have shape .* got \(2, 8\)"),
    (lambda w, mems, r: (w, mems.double(), r), TypeError, r"mems has dtype torch.float64 but w has torch.float32"),
    (lambda w, mems, r: (w, mems.bfloat16(), r), TypeError, r"mems has dtype torch.bfloat16 but w has torch.float32"),
    (lambda w, mems, r: (w, mems.to(META), r), ValueError, r"mems is on meta but w is on cpu"),
    (lambda w, mems, r: (w, mems, r[..., :6]), ValueError,
     r"r must have shape \[rlen, 1, d_model=8\] .* got \(5, 1, 6\)"),
    (lambda w, mems, r: (w, mems, r[:, 0]), ValueError, r"r must have shape .* got \(5, 8\)"),
    (lambda w, mems, r: (w, mems, r.double()), TypeError, r"r must have the layer's dtype .* got torch.float64"),
    (lambda w, mems, r: (w, mems, r.to(META)), ValueError, r"r is on meta but w is on cpu"),
    (lambda w, mems, r: (w, mems, r.numpy()), TypeError, r"r must be a torch.Tensor, got ndarray"),
], ids=["w_2d", "w_d_model", "qlen=0", "w_float64", "w_int", "w_device", "mems_batch", "mems_d_model", "mems_2d",
        "mems_float64", "mems_bfloat16", "mems_device", "r_d_model", "r_2d", "r_float64", "r_device", "r_numpy"])
def test_bad_w_mems_and_r_are_refused(case, error, message):
    """Such w, mems or r gave a RuntimeError from torch.cat or F.linear, an IndexError (qlen 0), or (mems of another
    float dtype, promoted by torch.cat) ran silently."""
    w, mems, r, _ = small_segment()
    w, mems, r = case(w, mems, r)
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0)
    with pytest.raises(error, match=message):
        layer(w, r, None, mems, window=None, clamp_len=-1)


def test_autocast_takes_16_bit_w_and_r():
    """Under autocast the projections cast w and r to its dtype: 16-bit w, r (with mems alike) are accepted."""
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0)
    w, mems, r, mask = small_segment()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(w.bfloat16(), r, mask, mems.bfloat16())
        assert torch.isfinite(layer(w, r.bfloat16(), mask, mems)).all()
    torch.testing.assert_close(out.float(), layer(w, r, mask, mems), rtol=0.05, atol=0.05)


def test_stated_window_is_not_read_from_attn_mask_on_the_eager_path():
    """With window stated, attn_mask is not read: the eager path (attention dropout) used it all the same, so it
    attended to what the stated window hides (as the fused path never does)."""
    layer = RelPartialLearnableMultiHeadAttn(2, 8, 4, dropout=0.0, dropatt=0.1).train()
    w, mems, r, mask = small_segment()
    outputs = []
    for attn_mask in (None, torch.zeros_like(mask)):  # no mask, and one that hides nothing
        torch.manual_seed(1)  # the same attention dropout
        with pytest.warns(UserWarning, match="attention dropout"):
            outputs.append(layer(w, r, attn_mask, mems, window=None, clamp_len=-1))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
