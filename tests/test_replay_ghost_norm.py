"""The ghost-norm priority: per-example output-layer gradient norms from two Gram matrices equal the norms of the
materialised per-example gradients (float64), and the closed-form cross-entropy logit gradients equal autograd's."""

import pytest
import torch
import torch.nn.functional as F

from memtx_ops.replay import cross_entropy_logit_grads, output_layer_grad_norms


def per_example_output_grads(x, targets, weight, bias):
    """Autograd, one example at a time: the gradient of the example's mean token cross-entropy of
    ``x W^T + b`` with respect to W and b -> list of (dW, db)."""
    grads = []
    for xb, yb in zip(x, targets):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = F.cross_entropy(F.linear(xb, w, b), yb)
        grads.append(torch.autograd.grad(loss, (w, b)))
    return grads


@pytest.mark.parametrize("B,T,d_in,d_out", [(3, 1, 4, 5), (4, 17, 8, 11), (2, 64, 32, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_ghost_norms_equal_materialised_per_example_gradients(B, T, d_in, d_out, bias):
    gen = torch.Generator().manual_seed(B * T + d_out)
    x = torch.randn(B, T, d_in, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, d_out, (B, T), generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
    b = torch.randn(d_out, generator=gen, dtype=torch.float64)
    logits = F.linear(x, weight, b)
    norms = output_layer_grad_norms(x, cross_entropy_logit_grads(logits, targets), bias=bias)
    want = torch.stack([(dw.pow(2).sum() + (db.pow(2).sum() if bias else 0)).sqrt()
                        for dw, db in per_example_output_grads(x, targets, weight, b)])
    assert norms.shape == (B,) and norms.dtype == torch.float64
    torch.testing.assert_close(norms, want, rtol=1e-10, atol=0)


def test_cross_entropy_logit_grads_equal_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (3, 9), generator=gen)
    per_example = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    (want,) = torch.autograd.grad(per_example.sum(), logits)  # examples do not mix: row b is d loss_b / d logits_b
    torch.testing.assert_close(cross_entropy_logit_grads(logits, targets), want, rtol=1e-12, atol=1e-15)


def test_float32_inputs_give_float32_norms_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 32, 16, generator=gen), torch.randn(4, 32, 24, generator=gen)
    got = output_layer_grad_norms(x, g)
    want = output_layer_grad_norms(x.double(), g.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="inputs must be a float tensor"):
        output_layer_grad_norms(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="share B and T"):
        output_layer_grad_norms(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        cross_entropy_logit_grads(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        cross_entropy_logit_grads(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_bad_targets_and_bias_raise_naming_them():
    """Targets on another device than the logits (meta targets dropped the one-hot term), complex targets (1+5j
    became class 1), targets outside [0, V) (ignore_index -100: scatter_add_'s error) and a bias that is no bool
    are refused by name."""
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="targets must be on logits' device cpu, got meta"):
        cross_entropy_logit_grads(logits, torch.zeros(1, 2, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        cross_entropy_logit_grads(logits, torch.tensor([[1 + 5j, 0j]]))
    for bad in (-100, -1, 3):
        with pytest.raises(RuntimeError, match=r"targets must be classes in \[0, 3\)"):
            cross_entropy_logit_grads(logits, torch.tensor([[0, bad]]))
    with pytest.raises(TypeError, match="bias must be a bool"):
        output_layer_grad_norms(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), bias="no")
