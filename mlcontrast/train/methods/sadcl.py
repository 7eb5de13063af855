"""SADCL: semantic-aware dual contrastive learning (research/seeds_methods.md §2).

Pipeline: timm backbone map → Query2Label-style decoder → label-level features H ``[B, C, d]`` →
group-wise linear classifier (logits) and a shared projector g applied to H, to the memory bank M and
to the class prototypes P. Loss:

    L = cls_weight · mean BCE  +  sscl_weight · SSCL  +  pscl_weight · PSCL

- SSCL: :func:`mlcontrast.multilabel_supcon_loss` on the two views ``stack([g(H), g(M)], 1)`` with the current
  targets, τ = 0.2 (the anchor-mask quirk of the released code with ``legacy_sadcl_mask=True``);
- PSCL: :func:`mlcontrast.prototype_nce_loss` of g(H) against g(P), τ = 0.07.

After the loss and before backward, without gradient: the memory slot ``M[b, c]`` is replaced by ``H[b, c]``
where ``targets[b, c] == 1`` and ``sigmoid(logit) > memory_threshold`` (0.8, strict), and the prototypes
(a :class:`mlcontrast.PrototypeBank`) move by EMA towards the mean of the positive label-level features.
The released code instead learns the prototypes by gradient and never updates them by EMA; that is
``legacy_learned_prototypes=True``. The memory bank is indexed by batch slot, as in the released code.

**Initialisation from files** (the released stage 2 starts from them; :mod:`mlcontrast.train.released_files`):
``--sadcl-init FILE`` copies a stage-1 Query2Label checkpoint's weights in by name (the projector, the prototypes
and the memory bank are new in stage 2); ``--sadcl-prototypes FILE`` loads the shipped ``[C, d]`` prototype
``.npy`` into the prototypes and every memory slot; ``--sadcl-build-prototypes`` instead averages the confident
positive label-level features of the training set before the first epoch (:func:`build_prototypes`, the
likely recipe of the unreleased generation script). Without them the prototypes start as Gaussian rows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from mlcontrast import PrototypeBank, multilabel_supcon_loss, prototype_nce_loss
from mlcontrast.train.argtypes import positive, unit_interval
from mlcontrast.train.models import Backbone, GroupWiseLinear, LabelDecoder, Projector, masked_bce
from mlcontrast.train.released_files import load_class_matrix, load_sadcl_state

__all__ = ["SADCL", "build_prototypes"]


class SADCL(nn.Module):
    makes_pseudo_labels = False
    #: set by the engine under torchrun, so SSCL contrasts every rank's label-level features (``sscl_scope``
    #: ``"local"``: each rank's own, as released)
    process_group = None

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet10t",
        feature_index: int = -1,
        weights: str | None = None,
        hidden_dim: int = 128,
        proj_dim: int = 64,
        heads: int = 4,
        enc_layers: int = 1,
        dec_layers: int = 2,
        dropout: float = 0.1,
        batch_size: int = 32,
        cls_weight: float = 1000.0,
        sscl_weight: float = 100.0,
        pscl_weight: float = 50.0,
        sscl_temperature: float = 0.2,
        pscl_temperature: float = 0.07,
        proto_momentum: float = 0.99,
        memory_threshold: float = 0.8,
        backend: str = "auto",
        legacy_sadcl_mask: bool = False,
        legacy_learned_prototypes: bool = False,
        sscl_scope: str = "global",
        build_prototypes_from_data: bool = False,
        prototype_threshold: float = 0.85,
        **_: object,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = Backbone(backbone, feature_index, weights)
        self.decoder = LabelDecoder(self.backbone.channels, num_classes, hidden_dim, heads, enc_layers, dec_layers,
                                    dropout=dropout)
        self.fc = GroupWiseLinear(num_classes, hidden_dim)
        self.proj = Projector(hidden_dim, proj_dim)
        # Label-level features leave a LayerNorm (row norm ~ sqrt(d)); the prototypes live in that space, so
        # they are kept un-normalised and start as Gaussian rows of that scale.
        init = torch.randn(num_classes, hidden_dim)
        self.legacy_learned_prototypes = legacy_learned_prototypes
        if legacy_learned_prototypes:
            self.learned_prototypes = nn.Parameter(init.clone())
        else:
            self.prototype_bank = PrototypeBank(num_classes, hidden_dim, momentum=proto_momentum, normalize=False,
                                                init=init, backend=backend)
        self.register_buffer("memory", init.unsqueeze(0).repeat(batch_size, 1, 1))
        self.cls_weight, self.sscl_weight, self.pscl_weight = cls_weight, sscl_weight, pscl_weight
        self.sscl_temperature, self.pscl_temperature = sscl_temperature, pscl_temperature
        self.memory_threshold, self.backend, self.legacy_sadcl_mask = memory_threshold, backend, legacy_sadcl_mask
        if sscl_scope not in ("global", "local"):
            raise ValueError(f"sscl_scope must be 'global' or 'local', got {sscl_scope!r}")
        self.sscl_scope = sscl_scope
        self.build_prototypes_from_data, self.prototype_threshold = build_prototypes_from_data, prototype_threshold

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("SADCL (--method sadcl)")
        g.add_argument("--sscl-weight", type=float, default=100.0)
        g.add_argument("--pscl-weight", type=float, default=50.0)
        g.add_argument("--sscl-temperature", type=positive(float), default=0.2)
        g.add_argument("--pscl-temperature", type=positive(float), default=0.07)
        g.add_argument("--proto-momentum", type=unit_interval, default=0.99, help="EMA momentum of the prototypes")
        g.add_argument("--memory-threshold", type=unit_interval, default=0.8,
                       help="a memory slot is replaced when its positive's probability exceeds this")
        g.add_argument("--legacy-sadcl-mask", action=argparse.BooleanOptionalAction, default=False,
                       help="the released SSCL code's anchor-mask quirk (seeds_methods.md §2.4)")
        g.add_argument("--legacy-learned-prototypes", action=argparse.BooleanOptionalAction, default=False,
                       help="as the released code: prototypes learned by gradient, no EMA update")
        g.add_argument("--sscl-scope", choices=["global", "local"], default="global",
                       help="under torchrun: global contrasts every rank's rows in SSCL (N processes train like "
                            "one with N times the batch, so results do not depend on the GPU count); local "
                            "contrasts each process's rows only, as the released code (per GPU)")
        g.add_argument("--sadcl-init", default=None, metavar="FILE",
                       help="local stage-1 checkpoint (the released Query2Label model_best.pth.tar, or a SADCL one): "
                            "its weights are copied in by name; every tensor must fit (shapes, names)")
        g.add_argument("--sadcl-prototypes", default=None, metavar="FILE",
                       help="local [C, hidden_dim] float .npy of class prototypes (the released "
                            "data/prototype/vis_prototype_embed_file_select_resnet101_448_<dataset>_085.npy); they "
                            "also fill every memory-bank slot")
        g.add_argument("--sadcl-build-prototypes", action=argparse.BooleanOptionalAction, default=False,
                       help="before the first epoch, set each class's prototype to the mean of its training "
                            "positives' label-level features scored above --sadcl-prototype-threshold (use after "
                            "--sadcl-init)")
        g.add_argument("--sadcl-prototype-threshold", type=unit_interval, default=0.85,
                       help="probability a positive must exceed to join --sadcl-build-prototypes' mean")

    @classmethod
    def from_args(cls, num_classes: int, args: argparse.Namespace) -> "SADCL":
        init, protos = getattr(args, "sadcl_init", None), getattr(args, "sadcl_prototypes", None)
        build = getattr(args, "sadcl_build_prototypes", False)
        if protos is not None and build:
            raise ValueError("--sadcl-prototypes and --sadcl-build-prototypes both set the prototypes; give one")
        model = cls(
            num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
            hidden_dim=args.hidden_dim, proj_dim=args.proj_dim, batch_size=args.batch_size, backend=args.backend,
            cls_weight=args.cls_weight, sscl_weight=args.sscl_weight, pscl_weight=args.pscl_weight,
            sscl_temperature=args.sscl_temperature, pscl_temperature=args.pscl_temperature,
            proto_momentum=args.proto_momentum, memory_threshold=args.memory_threshold,
            legacy_sadcl_mask=args.legacy_sadcl_mask, legacy_learned_prototypes=args.legacy_learned_prototypes,
            sscl_scope=getattr(args, "sscl_scope", "global"), build_prototypes_from_data=build,
            prototype_threshold=getattr(args, "sadcl_prototype_threshold", 0.85),
        )
        if init is not None:
            load_sadcl_state(model, init, option="--sadcl-init")
        if protos is not None:  # after the checkpoint: the file's prototypes win
            model.set_prototypes_(load_class_matrix(protos, option="--sadcl-prototypes", what="prototypes",
                                                    num_classes=num_classes, width=args.hidden_dim))
        return model

    @property
    def prototypes(self) -> torch.Tensor:
        return self.learned_prototypes if self.legacy_learned_prototypes else self.prototype_bank()

    @torch.no_grad()
    def set_prototypes_(self, prototypes: torch.Tensor, classes: torch.Tensor | None = None) -> None:
        """Set the prototypes ``[C, d]`` (only the rows of ``classes``, a ``[C]`` bool mask, when given) and
        the memory-bank slots of those classes, as the released model fills its bank from the prototype file."""
        target = self.learned_prototypes if self.legacy_learned_prototypes else self.prototype_bank.prototypes
        if prototypes.shape != target.shape:
            raise ValueError(f"prototypes must be {tuple(target.shape)}, got {tuple(prototypes.shape)}")
        rows = slice(None) if classes is None else classes.to(target.device)
        target.data[rows] = prototypes.to(target)[rows]
        self.memory[:, rows] = target.data[rows].to(self.memory.dtype)

    def start_epoch(self, epoch: int, loader, device) -> None:
        """``--sadcl-build-prototypes``: the prototypes from the training data, once, before epoch 0."""
        if self.build_prototypes_from_data and epoch == 0:
            build_prototypes(self, loader, self.prototype_threshold, device)

    def label_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.label_features(x))

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, progress: float = 0.0):
        h = self.label_features(x)  # [B, C, d]
        logits = self.fc(h)
        b = h.shape[0]
        if b > self.memory.shape[0]:
            raise ValueError(f"batch of {b} images exceeds the memory bank's {self.memory.shape[0]} slots")
        z = self.proj(h)
        zm = self.proj(self.memory[:b].clone())
        p_hat = self.proj(self.prototypes.clone())  # a copy: the EMA update below is in place
        l_cls = masked_bce(logits, targets)
        l_sscl = multilabel_supcon_loss(torch.stack([z, zm], 1), targets, temperature=self.sscl_temperature,
                                        backend=self.backend, legacy_sadcl=self.legacy_sadcl_mask,
                                        process_group=self.process_group if self.sscl_scope == "global" else None)
        l_pscl = prototype_nce_loss(z, p_hat, targets, temperature=self.pscl_temperature, backend=self.backend)
        loss = self.cls_weight * l_cls + self.sscl_weight * l_sscl + self.pscl_weight * l_pscl
        self.update_state_(h.detach(), logits.detach(), targets)
        parts = {"cls": l_cls.detach(), "sscl": l_sscl.detach(), "pscl": l_pscl.detach()}
        return loss, parts

    @torch.no_grad()
    def update_state_(self, h: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Memory-bank replacement (positives recognised with probability > threshold) and prototype EMA."""
        b = h.shape[0]
        hit = (targets == 1) & (torch.sigmoid(logits.float()) > self.memory_threshold)
        mem = self.memory[:b]
        mem[hit] = h[hit].to(mem.dtype)
        if not self.legacy_learned_prototypes:
            self.prototype_bank.update(h.float(), targets)


@torch.no_grad()
def build_prototypes(model: SADCL, loader, score_thr: float = 0.85, device: str | torch.device = "cpu") -> torch.Tensor:
    """Average the confident positive label-level features per class (§2.2's likely "select … 085" recipe).

    For every (b, c) with ``targets[b, c] == 1`` and ``sigmoid(logit) > score_thr``, H[b, c] joins class c's mean.
    The means replace the model's prototypes (and the memory-bank slots of those classes); classes without any
    such feature keep their prototype. Returns the ``[C, d]`` prototypes.
    """
    was_training = model.training
    model.eval()
    c, d = model.num_classes, model.fc.weight.shape[1]
    sums = torch.zeros(c, d, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for x, y in loader:
        h = model.label_features(x.to(device)).float().cpu()
        logits = model.fc(h.to(device)).float().cpu()
        keep = ((y == 1) & (torch.sigmoid(logits) > score_thr)).to(torch.float64)  # [B, C]
        sums += torch.einsum("bc,bcd->cd", keep, h.double())
        counts += keep.sum(0)
    present = counts > 0
    protos = model.prototypes.detach().clone().cpu()
    protos[present] = (sums[present] / counts[present, None]).to(protos.dtype)
    model.set_prototypes_(protos, present)
    model.train(was_training)
    return protos
