"""What the engine builds around the model: the optimizer and its schedule, which parts train, the model
EMA, mixed precision and early stopping (each one option of ``mlcontrast-train``)."""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn as nn

from mlcontrast.train.models import Backbone

__all__ = ["build_optimizer", "configure_backbones", "ModelEMA", "autocast", "grad_scaler", "should_stop"]


def build_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """``(optimizer, scheduler, per_epoch)``: ``per_epoch`` says the scheduler steps once per epoch (StepLR, as
    HST) rather than once per optimizer step (OneCycle and cosine).

    ``adamw`` decouples the weight decay; ``adam`` and ``sgd`` (momentum 0.9) add it to the gradient (L2).
    Only parameters with ``requires_grad`` are optimised (frozen stages stay out, as in both releases).
    """
    groups = model.param_groups(args.weight_decay) if hasattr(model, "param_groups") else \
        [p for p in model.parameters() if p.requires_grad]
    name = getattr(args, "optimizer", "adamw")
    if name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif name == "adam":
        optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    total = args.epochs * steps_per_epoch
    sched = getattr(args, "scheduler", "onecycle")
    if sched == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total,
                                                        pct_start=getattr(args, "pct_start", 0.2))
    elif sched == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    elif sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.step_gamma)
    else:
        raise ValueError(f"unknown scheduler {sched!r}")
    return optimizer, scheduler, sched == "step"


def configure_backbones(model: nn.Module, args: argparse.Namespace) -> None:
    """Apply ``--train-layers``, ``--bn-mode`` and ``--feature-pool`` to every timm :class:`Backbone` of the
    method (a frozen CLIP tower has none and freezes itself)."""
    train_layers = getattr(args, "train_layers", "all")
    bn_mode = getattr(args, "bn_mode", "train")
    pool = getattr(args, "feature_pool", 1)
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    if not backbones:
        if train_layers != "all" or bn_mode != "train" or pool != 1:
            raise ValueError("--train-layers / --bn-mode / --feature-pool need a timm backbone; this method has "
                             "none (a frozen CLIP encoder)")
        return
    for b in backbones:
        b.configure(train_layers, bn_mode, pool)


class ModelEMA:
    """An exponential moving average of a model's whole ``state_dict`` (parameters and floating buffers such
    as BatchNorm statistics and memory banks; other buffers are copied), as SADCL's ModelEma:
    ``ema ← decay·ema + (1 − decay)·model`` after every optimizer step.

    Args:
        model: the model to follow (a deep copy, in eval mode, is kept in :attr:`module`).
        decay: the EMA decay in (0, 1), e.g. 0.9998.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mine = self.module.state_dict()
        for key, value in model.state_dict().items():
            ema = mine[key]
            if ema.is_floating_point():
                ema.mul_(self.decay).add_(value.detach().to(ema.dtype), alpha=1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str | None, device: torch.device):
    """``torch.autocast`` for ``--amp bf16|fp16`` on the device's type; a no-op context without ``--amp``."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def grad_scaler(amp: str | None, device: torch.device):
    """A ``GradScaler`` for fp16 (whose small gradients underflow without scaling); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def _score(rec: dict) -> float:
    """An epoch's mAP: the better of the raw and the EMA model's; NaN never counts as best."""
    scores = [v for v in (rec["mAP"], rec.get("ema", {}).get("mAP")) if v is not None and v == v]
    return max(scores, default=float("-inf"))


def should_stop(history: list[dict], patience: int | None) -> bool:
    """Early stopping, as SADCL: stop once the best epoch (by the better of raw and EMA mAP) lies more than
    ``patience`` epochs back. ``history`` holds the epoch records so far."""
    if not patience or not history:
        return False
    scores = [_score(rec) for rec in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first epoch reaching the maximum
    return len(scores) - 1 - best > patience
