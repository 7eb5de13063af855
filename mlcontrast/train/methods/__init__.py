"""Training methods. Each is an ``nn.Module`` class with

- ``add_arguments(parser)`` (classmethod): its own CLI options, prefixed with its name;
- ``from_args(num_classes, args)`` (classmethod): the model from parsed CLI arguments;
- ``forward(images) → logits [B, C]``, which evaluation scores;
- ``training_loss(images, targets, *, epoch, progress) → (loss, parts)``, which also performs the method's
  non-gradient state updates (memory bank, prototypes) after the loss is computed and before backward;
  ``parts`` maps names to detached scalars, and its optional ``"pseudo"`` entry (``[B, C]``: 1 / 0 / -1 for
  pseudo-positive / pseudo-negative / none) feeds the pseudo-label precision and recall;
- optionally ``start_epoch(epoch, loader, device)`` (per-epoch work over an unshuffled training loader) and
  ``param_groups(weight_decay)`` (the optimizer's parameter groups).
"""

from __future__ import annotations

from mlcontrast.train.methods.bce import BCEBaseline
from mlcontrast.train.methods.hst import HST
from mlcontrast.train.methods.msupcon import MSupCon
from mlcontrast.train.methods.sadcl import SADCL
from mlcontrast.train.methods.trmml import TRMML

METHODS = {"sadcl": SADCL, "bce": BCEBaseline, "hst": HST, "trmml": TRMML, "msupcon": MSupCon}

__all__ = ["METHODS", "SADCL", "BCEBaseline", "HST", "TRMML", "MSupCon"]
