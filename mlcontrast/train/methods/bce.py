"""The BCE baseline: backbone → global average pool → linear classifier, BCE on the known labels."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from mlcontrast.train.models import Backbone, masked_bce

__all__ = ["BCEBaseline"]


class BCEBaseline(nn.Module):
    """``loss = cls_weight · mean BCE`` over known entries (targets -1 are ignored)."""

    makes_pseudo_labels = False

    def __init__(self, num_classes: int, backbone: str = "resnet10t", feature_index: int = -1,
                 weights: str | None = None, cls_weight: float = 1000.0, **_: object) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, feature_index, weights)
        self.fc = nn.Linear(self.backbone.channels, num_classes)
        self.cls_weight = cls_weight

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """No options of its own: ``--cls-weight`` and the model options are common."""

    @classmethod
    def from_args(cls, num_classes: int, args: argparse.Namespace) -> "BCEBaseline":
        return cls(num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
                   cls_weight=args.cls_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean((2, 3)))

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, progress: float = 0.0):
        loss = self.cls_weight * masked_bce(self(x), targets)
        return loss, {"cls": loss.detach()}
