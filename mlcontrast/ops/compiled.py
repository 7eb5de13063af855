"""Fake (meta) kernels and autograd formulas of the compiled ops ``torch.ops.mlcontrast.*``.

The schemas live in ``csrc/ops.cpp`` and the kernels in ``csrc/cpu`` and ``csrc/cuda``. Registering
the fake kernels lets ``torch.compile`` trace calls without running them, and registering autograd
here (rather than wrapping the calls in ``autograd.Function``) keeps the ops composable with
``torch.compile(fullgraph=True)``. Every backward saves only O(N) statistics besides the inputs.
"""

from __future__ import annotations

import torch

from mlcontrast._backends import EXTENSION_ERROR
from mlcontrast._base import compute_dtype

_LIB = "mlcontrast"


def _fake_label_supcon(features, labels, temperature, base_temperature, anchor_start=0, anchor_stop=None):
    n = features.shape[0]
    dtype = compute_dtype(features.dtype)
    return features.new_empty(n, dtype=dtype), features.new_empty(n, dtype=dtype)


def _fake_label_supcon_backward(
    grad_rows, features, labels, lse, temperature, base_temperature, anchor_start=0, anchor_stop=None
):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _fake_prototype_nce(features, prototypes, targets, temperature):
    dtype = compute_dtype(features.dtype)
    return features.new_empty((), dtype=dtype), features.new_empty((2, prototypes.shape[0]), dtype=dtype)


def _fake_prototype_nce_backward(grad, features, prototypes, targets, stats, temperature):
    return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(prototypes, memory_format=torch.contiguous_format)


def _fake_prototype_ce(features, labels, prototypes, temperature):
    return _fake_label_supcon(features, labels, temperature, temperature)


def _fake_prototype_ce_backward(grad_rows, features, labels, prototypes, lse, temperature):
    return torch.empty_like(features, memory_format=torch.contiguous_format), torch.empty_like(prototypes, memory_format=torch.contiguous_format)


def _fake_update_prototypes_(prototypes, features, labels, momentum, normalize):
    return None


def _setup_label_supcon(ctx, inputs, output):
    features, labels, ctx.temperature, ctx.base_temperature, ctx.anchor_start, ctx.anchor_stop = inputs
    ctx.save_for_backward(features, labels, output[1])


def _backward_label_supcon(ctx, grad_rows, grad_lse):
    features, labels, lse = ctx.saved_tensors
    grad = torch.ops.mlcontrast.label_supcon_backward(
        grad_rows, features, labels, lse, ctx.temperature, ctx.base_temperature, ctx.anchor_start, ctx.anchor_stop
    )
    return grad, None, None, None, None, None


def _setup_prototype_nce(ctx, inputs, output):
    features, prototypes, targets, ctx.temperature = inputs
    ctx.save_for_backward(features, prototypes, targets, output[1])


def _backward_prototype_nce(ctx, grad, grad_stats):
    features, prototypes, targets, stats = ctx.saved_tensors
    grad_features, grad_prototypes = torch.ops.mlcontrast.prototype_nce_backward(
        grad, features, prototypes, targets, stats, ctx.temperature
    )
    return grad_features, grad_prototypes, None, None


def _setup_prototype_ce(ctx, inputs, output):
    features, labels, prototypes, ctx.temperature = inputs
    ctx.save_for_backward(features, labels, prototypes, output[1])


def _backward_prototype_ce(ctx, grad_rows, grad_lse):
    features, labels, prototypes, lse = ctx.saved_tensors
    grad_features, grad_prototypes = torch.ops.mlcontrast.prototype_ce_backward(
        grad_rows, features, labels, prototypes, lse, ctx.temperature
    )
    return grad_features, None, grad_prototypes, None


def _register() -> bool:
    if EXTENSION_ERROR is not None:
        return False
    fakes = {
        "label_supcon": _fake_label_supcon,
        "label_supcon_backward": _fake_label_supcon_backward,
        "prototype_nce": _fake_prototype_nce,
        "prototype_nce_backward": _fake_prototype_nce_backward,
        "prototype_ce": _fake_prototype_ce,
        "prototype_ce_backward": _fake_prototype_ce_backward,
        "update_prototypes_": _fake_update_prototypes_,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{_LIB}::{name}", fake)
    autograd = {
        "label_supcon": (_backward_label_supcon, _setup_label_supcon),
        "prototype_nce": (_backward_prototype_nce, _setup_prototype_nce),
        "prototype_ce": (_backward_prototype_ce, _setup_prototype_ce),
    }
    for name, (backward, setup) in autograd.items():
        torch.library.register_autograd(f"{_LIB}::{name}", backward, setup_context=setup)
    return True


REGISTERED = _register()
