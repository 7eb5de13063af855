r"""Temperatures given as tensors (a learnable :math:`\tau`, e.g. ``log_t.exp()``), on every backend.

The fused ops take the temperature as a number. A 0-dim tensor temperature reaches them without a host
sync and gets its exact gradient in two ways, neither of which needs an N x N matrix:

* Pairwise losses (label_supcon and the losses built on it, multihot_supcon), where
  :math:`s_{ij} = z_i \cdot z_j / \tau`: the rows are scaled by :math:`\tau^{-1/2}` and the op runs at
  temperature 1, so :math:`s_{ij}` is unchanged and autograd differentiates the scaling: an O(N D) product
  and its backward, exact by construction. The factor :math:`\tau / \tau_{base}` multiplies the rows'
  losses afterwards.
* Prototype losses, whose kernels normalise the rows themselves (a scaling would cancel): the op runs at
  ``float(temperature)`` and the loss gets :math:`(\tau - \operatorname{sg}(\tau))\, \partial L/\partial\tau`,
  zero in value, whose gradient is the exact :math:`\partial L / \partial \tau =
  -\frac{1}{\tau}\sum G \odot s` (G = dL/ds, from the op's saved statistics and the O(B C) logits).
"""

from __future__ import annotations

import math

import torch

from mlcontrast._base import NORM_EPS, compute_dtype

__all__ = ["Temperature", "check_temperature", "is_tensor", "learned", "number", "pair_scaled", "row_scale",
           "prototype_ce_derivative", "prototype_nce_derivative", "straight_through"]

#: A temperature: a positive number, or a 0-dim floating tensor (which may require grad).
Temperature = float | torch.Tensor


def is_tensor(temperature: Temperature) -> bool:
    return isinstance(temperature, torch.Tensor)


def check_temperature(value: Temperature, name: str = "temperature", tensor_ok: bool = True) -> None:
    """A finite number > 0, or (``tensor_ok``) a 0-dim floating tensor whose value is > 0 (its value is
    read, a host sync, only when not compiling)."""
    if isinstance(value, torch.Tensor) and tensor_ok:
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (or a number), got {value.dtype}")
        if value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not torch.compiler.is_compiling():
            number = float(value.detach())
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name} must be finite and > 0, got {number}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or a 0-dim floating tensor" if tensor_ok else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def learned(temperature: Temperature) -> bool:
    """Whether ``temperature`` is learned: a tensor that requires grad."""
    return is_tensor(temperature) and temperature.requires_grad


def row_scale(
    rows: torch.Tensor, temperature: torch.Tensor, base_temperature: Temperature
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""For a tensor temperature: the scale :math:`\tau^{-1/2}` of the ``rows`` (in their compute dtype, on their
    device) and the factor :math:`\tau/\tau_{base}` of their losses (None when ``base_temperature`` is the
    temperature itself, the default)."""
    tau = temperature.to(device=rows.device, dtype=compute_dtype(rows.dtype))
    factor = None if base_temperature is temperature else tau / base_temperature
    return tau.rsqrt(), factor


def number(temperature: Temperature) -> float:
    """The temperature as a Python float (a host sync for a tensor)."""
    return float(temperature.detach()) if is_tensor(temperature) else float(temperature)


def pair_scaled(
    rows: torch.Tensor, temperature: Temperature, base_temperature: Temperature
) -> tuple[torch.Tensor, float, float, torch.Tensor | None]:
    r"""What a pairwise fused op (:math:`s_{ij} = z_i \cdot z_j / \tau`) is called with:
    ``(rows, temperature, base_temperature, factor)``; multiply its per-row losses by ``factor`` unless None.

    For a number: the rows and both temperatures as they are. For a tensor: the rows times
    :math:`\tau^{-1/2}` (in their dtype), temperatures 1 and 1, and ``factor`` :math:`= \tau/\tau_{base}`
    (None when ``base_temperature`` is the temperature itself, the default).
    """
    if not is_tensor(temperature):
        return rows, float(temperature), float(base_temperature), None
    scale, factor = row_scale(rows, temperature, base_temperature)
    return rows * scale, 1.0, 1.0, factor


def straight_through(value: torch.Tensor, temperature: Temperature, derivative: torch.Tensor) -> torch.Tensor:
    """``value`` plus :math:`(\\tau - \\operatorname{sg}(\\tau))` ``derivative``: the same value, and the gradient
    ``derivative`` (:math:`\\partial\\,\\text{value} / \\partial\\tau`, same shape as ``value``) for a tensor
    temperature that requires grad; ``value`` itself otherwise."""
    if not learned(temperature):
        return value
    tau = temperature.to(device=value.device, dtype=value.dtype)
    return value + (tau - tau.detach()) * derivative.detach().to(value.dtype)


def prototype_nce_derivative(
    stats: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    r""":math:`\partial L / \partial \tau` of ``prototype_nce`` from its saved statistics (``stats`` ``[2, C]``:
    the LSE over each class's positives and known entries; ``logits`` ``[B, C]``): with P the number of
    positives, :math:`G_{bc} = -\frac{1}{P}\big([t_{bc} = 1]\, e^{s_{bc} - \text{LSE}^+_c}
    - [t_{bc} \ge 0]\, e^{s_{bc} - \text{LSE}^K_c}\big)` and :math:`\partial L/\partial\tau = -\frac{1}{\tau}
    \sum_{bc} G_{bc} s_{bc}` (0 without positives)."""
    positive, known = targets == 1, targets >= 0
    share_pos = torch.where(positive, (logits - stats[0]).exp(), 0.0)
    share_known = torch.where(known, (logits - stats[1]).exp(), 0.0)
    count = positive.sum().clamp(min=1).to(logits.dtype)
    grad_logits = (share_known - share_pos) / count
    return -(grad_logits * logits).sum() / temperature.to(logits.dtype)


def prototype_ce_derivative(
    features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, lse: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    r"""The ``[N]`` :math:`\partial \ell_i / \partial \tau` of ``prototype_ce``'s rows:
    :math:`-\frac{1}{\tau}\big(\sum_c p_{ic} s_{ic} - s_{i y_i}\big)` with :math:`p = \operatorname{softmax}(s)`
    from the op's ``lse``; 0 on ignored rows. It recomputes the ``[N, C]`` logits (one more N C D product)."""
    dtype = lse.dtype
    tau = temperature.detach().to(device=lse.device, dtype=dtype)
    unit = torch.nn.functional.normalize
    z = unit(features.detach().to(dtype), dim=-1, eps=NORM_EPS)
    logits = z @ unit(prototypes.detach().to(dtype), dim=-1, eps=NORM_EPS).T / tau
    expected = ((logits - lse[:, None]).exp() * logits).sum(dim=1)
    valid = labels >= 0
    target = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, -(expected - target) / tau, 0.0)
