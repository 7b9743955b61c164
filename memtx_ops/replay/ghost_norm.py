"""Per-example gradient norms of an output layer by the ghost-norm identity, without per-example gradients.

For a linear layer ``y_t = W x_t + b`` applied to the T tokens of one example whose loss has gradient ``g_t`` with
respect to ``y_t``, the example's weight gradient is ``sum_t g_t x_t^T`` (``[d_out, d_in]``) and

    ||sum_t g_t x_t^T||_F^2 = sum_{t,s} (g_t . g_s) (x_t . x_s),      ||sum_t g_t||^2 = sum_{t,s} g_t . g_s

so the squared norm of the weight and bias gradient is the sum of the elementwise product of the two T x T Gram
matrices ``G G^T`` and ``X X^T + 1``. Per example this costs O(T^2 (d_in + d_out)) time and O(T^2) memory, against
O(T d_in d_out) time and O(d_in d_out) memory for materialising the gradient: fewer multiply-adds when
T < d_in d_out / (d_in + d_out) (a large output layer over short examples), and never a ``[B, d_out, d_in]``
tensor. For the character LM of the example (T = 128, d_in = 128, d_out ~ 100) it does about 2.3x the
multiply-adds of materialising, a few MFLOP per example, small beside the model's step.

For the cross-entropy of logits ``z_t`` against ``y_t`` averaged over the example's T tokens the output gradient is
known in closed form, ``g_t = (softmax(z_t) - onehot(y_t)) / T`` (:func:`cross_entropy_logit_grads`): the norms come
from the forward pass's logits, with no backward pass of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def output_layer_grad_norms(inputs: Tensor, grad_outputs: Tensor, bias: bool = True) -> Tensor:
    """Per-example Frobenius norm of the gradient of ``y = x W^T (+ b)``: inputs ``x`` [B, T, d_in], output
    gradients [B, T, d_out] of each example's own loss -> ``[B]`` (weight and, with ``bias``, bias gradient)."""
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
    for name, t in (("inputs", inputs), ("grad_outputs", grad_outputs)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a float tensor [B, T, d], got {shape}")
    if inputs.shape[:2] != grad_outputs.shape[:2] or inputs.device != grad_outputs.device:
        raise ValueError(f"inputs [B, T, d_in] and grad_outputs [B, T, d_out] must share B and T and the device, got "
                         f"{tuple(inputs.shape)} on {inputs.device} and {tuple(grad_outputs.shape)} on "
                         f"{grad_outputs.device}")
    dtype = torch.promote_types(torch.promote_types(inputs.dtype, grad_outputs.dtype), torch.float32)
    x, g = inputs.detach().to(dtype), grad_outputs.detach().to(dtype)
    gram_x = x @ x.transpose(1, 2)
    if bias:
        gram_x = gram_x + 1
    squared = (gram_x * (g @ g.transpose(1, 2))).sum((1, 2))
    return squared.clamp_min(0).sqrt()


def cross_entropy_logit_grads(logits: Tensor, targets: Tensor) -> Tensor:
    """Gradient of each example's mean token cross-entropy with respect to its logits: logits [B, T, V], integer
    targets [B, T] on logits' device -> ``(softmax(logits) - onehot(targets)) / T`` [B, T, V] (float32 or wider; no
    graph). Every target must be a class in ``[0, V)`` (no ``ignore_index``); like the replay buffer's value checks,
    this is a ``torch._assert_async`` (a device-side assertion on CUDA, no host sync)."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor [B, T, V], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != tuple(logits.shape[:2]) \
            or targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor [B, T] = {tuple(logits.shape[:2])}, got "
                         + (f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, Tensor)
                            else type(targets).__name__))
    if targets.device != logits.device:
        raise ValueError(f"targets must be on logits' device {logits.device}, got {targets.device}")
    num_classes = logits.shape[2]
    targets = targets.long()
    torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                        f"cross_entropy_logit_grads: targets must be classes in [0, {num_classes}) (no ignore_index)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    grads = torch.softmax(logits.detach().to(dtype), dim=-1)
    grads.scatter_add_(-1, targets[..., None], torch.full_like(grads[..., :1], -1.0))
    return grads / logits.shape[1]
