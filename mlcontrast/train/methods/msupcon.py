"""MSupCon: BCE on the known labels plus an image-level multi-hot supervised contrastive loss.

Pipeline: timm backbone map → global average pool → embedding e ``[B, channels]``, which feeds

- a linear classifier (the logits that evaluation scores), trained with the mean BCE on the known labels;
- an MLP projection head g: ``channels → hidden_dim → ReLU → proj_dim``, whose L2-normalised output is
  contrasted with :func:`mlcontrast.multihot_supcon_loss` (one row per image, its multi-hot targets):

    L = cls_weight · mean BCE  +  msupcon_weight · multihot_supcon_loss(normalize(g(e)), targets)

with the Jaccard positives by default (an image is a positive of another when their label sets overlap by
at least ``msupcon_threshold`` of their union, weighted by that overlap). Unknown entries (-1, partial labels)
count as absent for the contrastive loss, as the contract of ``multihot_supcon_loss`` says, and are ignored by
the BCE. Under ``torchrun`` the engine sets ``process_group``, so every rank's images join the contrast set.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from mlcontrast import multihot_supcon_loss
from mlcontrast.train.argtypes import positive, ratio
from mlcontrast.train.models import Backbone, masked_bce

__all__ = ["MSupCon"]

POSITIVES = ("jaccard", "any", "all", "mulsupcon")


class MSupCon(nn.Module):
    """``loss = cls_weight · mean BCE + msupcon_weight · multihot_supcon_loss`` (see the module docstring).

    Args:
        num_classes: C, the width of the targets and logits.
        backbone, feature_index, weights: the timm backbone (:class:`~mlcontrast.train.models.Backbone`).
        hidden_dim, proj_dim: widths of the projection head's hidden layer and output.
        cls_weight: weight of the mean BCE over known entries.
        msupcon_weight, msupcon_temperature, msupcon_threshold, msupcon_positives: the contrastive term's
            weight and :func:`mlcontrast.multihot_supcon_loss`'s ``temperature``, ``threshold`` and ``positives``.
        backend: the mlcontrast backend of the contrastive loss.

    Example:
        >>> m = MSupCon(5, backbone="test_resnet", feature_index=2, hidden_dim=32, proj_dim=16)
        >>> loss, parts = m.training_loss(torch.randn(4, 3, 32, 32), torch.tensor([[1, 0, 1, 0, -1]] * 4))
        >>> sorted(parts)
        ['cls', 'msupcon']
    """

    makes_pseudo_labels = False
    #: set by the engine under torchrun, so the contrastive loss contrasts every rank's images
    process_group = None

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet10t",
        feature_index: int = -1,
        weights: str | None = None,
        hidden_dim: int = 128,
        proj_dim: int = 64,
        cls_weight: float = 1000.0,
        msupcon_weight: float = 1.0,
        msupcon_temperature: float = 0.1,
        msupcon_threshold: float = 0.5,
        msupcon_positives: str = "jaccard",
        backend: str = "auto",
        **_: object,
    ) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, feature_index, weights)
        self.fc = nn.Linear(self.backbone.channels, num_classes)
        self.head = nn.Sequential(nn.Linear(self.backbone.channels, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, proj_dim))
        self.cls_weight, self.msupcon_weight = cls_weight, msupcon_weight
        self.temperature, self.threshold, self.positives = msupcon_temperature, msupcon_threshold, msupcon_positives
        self.backend = backend

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("MSupCon (--method msupcon; also --cls-weight, --hidden-dim, --proj-dim)")
        g.add_argument("--msupcon-weight", type=float, default=1.0, help="weight of the multi-hot SupCon term")
        g.add_argument("--msupcon-temperature", type=positive(float), default=0.1)
        g.add_argument("--msupcon-threshold", type=ratio, default=0.5,
                       help="least Jaccard overlap of two images' label sets that makes them positives")
        g.add_argument("--msupcon-positives", choices=POSITIVES, default="jaccard",
                       help="which images are positives of an anchor (see mlcontrast.multihot_supcon_loss)")

    @classmethod
    def from_args(cls, num_classes: int, args: argparse.Namespace) -> "MSupCon":
        return cls(
            num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
            hidden_dim=args.hidden_dim, proj_dim=args.proj_dim, cls_weight=args.cls_weight,
            msupcon_weight=args.msupcon_weight, msupcon_temperature=args.msupcon_temperature,
            msupcon_threshold=args.msupcon_threshold, msupcon_positives=args.msupcon_positives,
            backend=args.backend,
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone embedding ``[B, channels]``."""
        return self.backbone(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, progress: float = 0.0):
        e = self.embed(x)
        l_cls = masked_bce(self.fc(e), targets)
        # normalize=True: the loss L2-normalises the projections (SupCon's unit hypersphere).
        l_con = multihot_supcon_loss(self.head(e), targets, temperature=self.temperature,
                                     positives=self.positives, threshold=self.threshold, normalize=True,
                                     process_group=self.process_group, backend=self.backend)
        loss = self.cls_weight * l_cls + self.msupcon_weight * l_con
        return loss, {"cls": l_cls.detach(), "msupcon": l_con.detach()}
