"""Training methods: each is an ``nn.Module`` with ``forward(images) → logits [B, C]`` and
``training_loss(images, targets) → (loss, parts)``, which also performs the method's non-gradient state
updates (memory bank, prototypes) after the loss is computed and before backward."""

from __future__ import annotations

from mlcontrast.train.methods.bce import BCEBaseline
from mlcontrast.train.methods.sadcl import SADCL

METHODS = {"sadcl": SADCL, "bce": BCEBaseline}

__all__ = ["METHODS", "SADCL", "BCEBaseline", "build_method"]


def build_method(name: str, num_classes: int, **kwargs):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name](num_classes, **kwargs)
