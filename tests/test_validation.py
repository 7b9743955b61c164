"""Bad inputs fail with a ValueError/TypeError naming the argument, before any kernel runs."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import memtx_ops
from helpers import Case, make_inputs


def good(**over):
    q, k, v, r, u, vb = (t.detach() for t in make_inputs(Case(B=2, H=4, Hk=2, L=6, M=4, D=16), torch.float32))
    args = dict(q=q, k=k, v=v, r=r, u=u, vb=vb)
    args.update(over)
    return args


def call(args, **kwargs):
    q, k, v, r, u, vb = (args[n] for n in ("q", "k", "v", "r", "u", "vb"))
    return memtx_ops.rel_memory_attention(q, k, v, r, u, vb, **kwargs)


def test_good_inputs_run():
    assert call(good(), backend="reference").shape == (2, 4, 6, 16)


T = torch.randn
BAD_TENSORS = [
    ("q rank", dict(q=T(4, 6, 16)), ValueError, r"q must have shape \[B, H, L, D\]"),
    ("k rank", dict(k=T(2, 2, 10)), ValueError, r"k must have shape"),
    ("r rank", dict(r=T(2, 10, 16, 1)), ValueError, r"r must have shape \[Hk, R, D\]"),
    ("u rank", dict(u=T(4 * 16)), ValueError, r"u must have shape \[H, D\]"),
    ("batch mismatch", dict(k=T(3, 2, 10, 16), v=T(3, 2, 10, 16)), ValueError, r"k has batch 3 but q has batch 2"),
    ("head dim mismatch", dict(k=T(2, 2, 10, 8), v=T(2, 2, 10, 8)), ValueError, r"k has head dim 8 but q has 16"),
    ("K < L", dict(k=T(2, 2, 5, 16), v=T(2, 2, 5, 16)), ValueError, r"K = M \+ L >= L"),
    ("v shape", dict(v=T(2, 2, 11, 16)), ValueError, r"v must have the shape of k"),
    ("H not multiple of Hk", dict(k=T(2, 3, 10, 16), v=T(2, 3, 10, 16), r=T(3, 10, 16)), ValueError,
     r"H must be a multiple of Hk"),
    ("r heads", dict(r=T(4, 10, 16)), ValueError, r"r must have shape \[Hk=2, R, D=16\]"),
    ("r empty", dict(r=T(2, 0, 16)), ValueError, r"r must have at least one row"),
    ("u shape", dict(u=T(2, 16)), ValueError, r"u must have shape \[H=4, D=16\]"),
    ("vb shape", dict(vb=T(4, 8)), ValueError, r"vb must have shape \[H=4, D=16\]"),
    ("mixed dtype", dict(v=T(2, 2, 10, 16, dtype=torch.float64)), TypeError, r"v has dtype torch.float64"),
    ("int dtype", dict(q=torch.ones(2, 4, 6, 16, dtype=torch.int32)), TypeError, r"q must be float16"),
    ("not a tensor", dict(u=[[0.0] * 16] * 4), TypeError, r"u must be a torch.Tensor"),
    ("meta device", dict(vb=T(4, 16, device="meta")), ValueError, r"vb is on meta"),
]


@pytest.mark.parametrize("name,over,error,match", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_tensor(name, over, error, match, backend):
    with pytest.raises(error, match=match):
        call(good(**over), backend=backend)


BAD_OPTIONS = [
    ("index length", dict(kv_head_index=torch.tensor([0, 1])), ValueError, r"kv_head_index must have shape \[H=4\]"),
    ("index dtype", dict(kv_head_index=torch.tensor([0.0, 1, 0, 1])), TypeError, r"kv_head_index must have dtype"),
    ("index range", dict(kv_head_index=torch.tensor([0, 1, 2, 1])), ValueError, r"values must lie in \[0, Hk=2\)"),
    ("index negative", dict(kv_head_index=torch.tensor([0, -1, 0, 1])), ValueError, r"values must lie in"),
    ("index list", dict(kv_head_index=[0, 1, 0, 1]), TypeError, r"kv_head_index must be an integer tensor"),
    ("index on meta", dict(kv_head_index=torch.tensor([0, 1, 0, 1], device="meta")), ValueError,
     r"kv_head_index is on meta but q is on cpu"),
    ("window 0", dict(window=0), ValueError, r"window must be >= 1"),
    ("window float", dict(window=2.5), TypeError, r"window must be an int"),
    ("mem_offset < 0", dict(mem_offset=-1), ValueError, r"mem_offset must be >= 0"),
    ("mem_offset 2**63", dict(mem_offset=2**63), ValueError, r"mem_offset must be >= 0 and < 2\*\*62, got 9223"),
    ("window 2**62", dict(window=2**62), ValueError, r"window must be >= 1 .* and < 2\*\*62"),
    ("scale str", dict(scale="0.1"), TypeError, r"scale must be a float"),
    ("scale nan", dict(scale=float("nan")), ValueError, r"scale must be a finite float > 0"),
    ("scale inf", dict(scale=float("inf")), ValueError, r"scale must be a finite float > 0"),
    ("scale 0", dict(scale=0.0), ValueError, r"scale must be a finite float > 0 .*got 0.0"),
    ("scale negative", dict(scale=-0.125), ValueError, r"scale must be a finite float > 0 .*got -0.125"),
    ("backend", dict(backend="tpu"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("name,kwargs,error,match", BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_bad_option(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        call(good(), **kwargs)


@pytest.mark.parametrize("kind", ["meta", "fake"])
def test_index_without_values_is_not_value_checked(kind):
    """kv_head_index on the meta device or fake (shape propagation) has no values to check: the call gives the
    output's shape instead of failing to read them."""
    args, index = good(), torch.tensor([1, 0, 0, 1])
    if kind == "meta":
        out = call({n: t.to("meta") for n, t in args.items()}, kv_head_index=index.to("meta"))
    else:
        with FakeTensorMode() as mode:
            out = call({n: mode.from_tensor(t) for n, t in args.items()}, kv_head_index=mode.from_tensor(index))
    assert out.shape == (2, 4, 6, 16)


def test_unsupported_head_dim_names_the_limit():
    args = good(q=T(1, 1, 2, 512), k=T(1, 1, 2, 512), v=T(1, 1, 2, 512), r=T(1, 2, 512), u=T(1, 512), vb=T(1, 512))
    with pytest.raises(ValueError, match=r"head dim D=512 is not supported .*D <= 256"):
        call(args, backend="cpu")
    assert call(args, backend="reference").shape == (1, 1, 2, 512)


def test_backend_dtype_not_supported():
    args = {n: t.double() for n, t in good().items()}  # the Triton kernels take no float64 (here: interpreted)
    with pytest.raises(TypeError, match=r"backend 'triton' supports dtypes float16, bfloat16, float32; got float64"):
        call(args, backend="triton")


def test_backend_on_wrong_device_says_why():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: .*runs on cuda tensors"):
        call(good(), backend="cuda")


def test_checks_run_before_any_kernel(monkeypatch):
    from memtx_ops.backends import BACKENDS

    monkeypatch.setattr(BACKENDS["cpu"], "forward", lambda *a: pytest.fail("kernel launched"))
    with pytest.raises(ValueError):
        call(good(), backend="cpu", window=-3)
