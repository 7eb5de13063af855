"""What the engine builds around the model: the optimizer and its schedule (with an optional constant
warm-up), which parts train, the model EMA, mixed precision and early stopping (each one option of
``mlcontrast-train``)."""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn as nn

from mlcontrast.train.models import Backbone

__all__ = ["build_optimizer", "ConstantWarmup", "configure_backbones", "ModelEMA", "autocast", "grad_scaler",
           "should_stop", "STOP_RULES"]


def build_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """``(optimizer, scheduler, per_epoch)``: ``per_epoch`` says the scheduler steps once per epoch (StepLR, as
    HST) rather than once per optimizer step (OneCycle and cosine).

    ``--warmup-epochs W`` (> 0) trains the first W epochs at the constant ``--warmup-lr`` and wraps the
    schedule in :class:`ConstantWarmup`; with W = 0 (the default) the schedule is returned as is.

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
    per_epoch = sched == "step"
    warmup = getattr(args, "warmup_epochs", 0) or 0
    if warmup > 0:
        steps = warmup if per_epoch else warmup * steps_per_epoch
        scheduler = ConstantWarmup(optimizer, scheduler, steps, args.warmup_lr)
    return optimizer, scheduler, per_epoch


class ConstantWarmup:
    """The first ``steps`` scheduler steps train at the constant ``lr``; the wrapped schedule runs underneath
    unchanged, so after the warm-up the learning rate is the schedule's at that position, not its start
    (the constant warm-up of the author's DualCoOp, ``optim/lr_scheduler.py:35-54,135-143`` with
    ``warmup_recount = False``, ``config_opt.py:182``).

    Before each step the schedule's own last learning rates go back into the optimizer, because the
    chainable schedules (StepLR, the cosine) compute the next rate from the current one.

    Args:
        optimizer: the optimizer whose ``param_groups`` get the learning rates.
        schedule: the wrapped scheduler (stepped on every :meth:`step`, the warm-up included).
        steps: warm-up length in scheduler steps (epochs × steps per epoch for a per-iteration schedule).
        lr: the constant warm-up learning rate (DualCoOp: 1e-5).
    """

    def __init__(self, optimizer, schedule, steps: int, lr: float) -> None:
        self.optimizer, self.schedule, self.steps, self.lr = optimizer, schedule, steps, lr
        self.count = 0
        self._apply()

    def _apply(self) -> None:
        lrs = self.schedule.get_last_lr() if self.count >= self.steps else [self.lr] * len(self.optimizer.param_groups)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def step(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.schedule.get_last_lr()):
            group["lr"] = lr
        self.schedule.step()
        self.count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"count": self.count, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.schedule.load_state_dict(state["schedule"])
        self._apply()


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

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current state (``--model-ema-start``: the releases build a
        new ModelEma at that epoch, SADCL ``main_worker.py:199-200``, DualCoOp ``main_worker.py:118-119``)."""
        self.module.load_state_dict(model.state_dict())

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


def _first_best(scores: list[float]) -> int:
    """The first index reaching the maximum, or -1 when none is above 0 (as the releases' ``best_* = 0``
    initial values with strict ``>`` updates)."""
    best, where = 0.0, -1
    for i, v in enumerate(scores):
        if v > best:  # NaN and -inf never update
            best, where = v, i
    return where


#: ``--early-stop-rule`` choices
STOP_RULES = ("best", "sadcl")


def should_stop(history: list[dict], patience: int | None, rule: str = "best", ema_expected: bool = False) -> bool:
    """Early stopping after the epochs of ``history`` (the epoch records so far).

    - ``best``: stop once the best epoch (by the better of raw and EMA mAP) lies more than ``patience``
      epochs back.
    - ``sadcl``: the released rule (SADCL ``code/lib_sadcl/main_worker.py:292-301``; the author's DualCoOp
      ``main_worker.py:201-206`` has the same): stop once *both* that best epoch and the raw model's own
      best epoch lie more than ``patience`` epochs back, *and* the last EMA mAP is below the best EMA mAP
      so far. Without ``--model-ema`` the EMA clause is skipped; with ``ema_expected`` (an EMA that starts
      later) an epoch without an EMA evaluation never stops, as the releases' 0 never lies below their 0.
    """
    if not patience or not history:
        return False
    last = len(history) - 1
    if rule == "best":
        scores = [_score(rec) for rec in history]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first epoch reaching the maximum
        return last - best > patience
    if rule != "sadcl":
        raise ValueError(f"unknown early-stop rule {rule!r}; choose from {STOP_RULES}")
    best = _first_best([_score(rec) for rec in history])
    raw_best = _first_best([rec["mAP"] for rec in history])
    if best < 0 or last - max(best, raw_best) <= patience:
        return False
    emas = [rec["ema"]["mAP"] for rec in history if "ema" in rec]
    if "ema" not in history[-1]:
        return not (ema_expected or emas)
    return len(history) > 1 and emas[-1] < max([0.0, *(v for v in emas if v == v)])
