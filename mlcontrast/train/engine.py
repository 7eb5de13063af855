"""The training loop: data, model, optimizer and schedule (:mod:`mlcontrast.train.optim`), mixed precision,
gradient accumulation, model EMA, evaluation, JSON-lines metrics, a best/last summary, early stopping, atomic
checkpoints, resume.

Determinism: every epoch reseeds the global RNGs and the shuffling generator from ``(seed, epoch)`` (plus
the rank under ``torchrun``), so a run resumed from the checkpoint of epoch k continues exactly as the
uninterrupted run (the checkpoint holds the model with the method's buffers, such as prototypes and memory
bank, the optimizer, the scheduler, the model EMA and the fp16 gradient scaler).

Distributed: under ``torchrun`` each process trains its shard (``DistributedSampler``) through
DistributedDataParallel, the methods' contrastive losses get ``process_group`` so every rank's rows join the
contrast set, buffers follow rank 0 (DDP's default), and rank 0 evaluates and writes metrics and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from mlcontrast.train.config import build_method, resolve_args
from mlcontrast.train.data import build_datasets
from mlcontrast.train.metrics import evaluate, pseudo_label_counts, pseudo_label_rates, summarize
from mlcontrast.train.optim import ModelEMA, autocast, build_optimizer, configure_backbones, grad_scaler, should_stop

__all__ = ["run", "resolve_args", "save_checkpoint_atomic", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**31


def save_checkpoint_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the checkpoint ordinary permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _device(name: str) -> torch.device:
    """The ``--device``; under torchrun, ``cuda`` without an index is the process's ``LOCAL_RANK`` GPU."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


@torch.no_grad()
def _predict(model, loader, device, progress: bool, amp: str | None = None):
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    logits = []
    for x, _ in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with autocast(amp, device):
            logits.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(logits).numpy()


class _WithTruth(Dataset):
    """``(image, partial targets, withheld full targets)``: the truth scores the pseudo-labels."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x, y, torch.from_numpy(self.base.full_targets[index].astype(np.int64))


class _TrainingStep(nn.Module):
    """Makes ``training_loss`` the ``forward`` that DistributedDataParallel wraps (its hooks run in forward)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, x, targets, epoch: int, progress: float):
        return self.method.training_loss(x, targets, epoch=epoch, progress=progress)


def _collective_device(group, device: torch.device) -> torch.device:
    """Where the tensors of ``group``'s collectives must live: NCCL takes only CUDA tensors (the training
    ``device`` when it is one, else the process's ``LOCAL_RANK`` GPU); gloo and the others take CPU tensors."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if backend != "nccl":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class _Dist:
    """Process-group facts: one process unless ``torchrun`` set ``WORLD_SIZE`` > 1."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.group, self.owned = 0, None, False
        self.device = torch.device("cpu")  # of the collectives' tensors
        if self.world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                self.owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.group = dist.group.WORLD
            self.device = _collective_device(self.group, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (through a copy on the backend's device)."""
        if self.world > 1:
            on_device = t.to(self.device)
            torch.distributed.all_reduce(on_device, group=self.group)
            t.copy_(on_device)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.group)

    def close(self) -> None:
        if self.owned:
            torch.distributed.destroy_process_group()


def _load_checkpoint(path: str, method: str, device: torch.device) -> dict:
    ckpt_path = Path(path)
    if ckpt_path.is_dir():
        ckpt_path = ckpt_path / CHECKPOINT_NAME
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {ckpt_path}")
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    if ckpt["method"] != method:
        raise ValueError(f"--resume: checkpoint {ckpt_path} is a {ckpt['method']!r} run, not {method!r}")
    return ckpt


def run(args: argparse.Namespace, stop_after_epoch: int | None = None) -> dict:
    """Train and evaluate as the CLI does; returns ``{"history": [epoch records], "step_losses": [...]}``.

    ``stop_after_epoch`` ends the run after that epoch's checkpoint (to simulate an interruption in tests).
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains its shard with DistributedDataParallel;
    rank 0 evaluates and writes the files, and the logged losses are means over the ranks.
    """
    args = resolve_args(args)
    device = _device(args.device)
    dist = _Dist(device)
    try:
        return _run(args, device, dist, stop_after_epoch)
    finally:
        dist.close()


def _run(args, device, dist: _Dist, stop_after_epoch):
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    _seed_all(args.seed)

    train_set, test_set = build_datasets(args.dataset, args.data_root, args.img_size, args.seed,
                                         augment=getattr(args, "augment", "flip"))
    if args.known_ratio < 1.0:
        train_set.apply_partial_labels(args.known_ratio, seed=args.partial_seed)
    test_truth = test_set.full_targets
    class_names = list(train_set.classes)
    train_plain, train_truth = train_set, _WithTruth(train_set)
    if args.limit_train is not None:
        keep = range(min(args.limit_train, len(train_set)))
        train_plain, train_truth = Subset(train_set, keep), Subset(train_truth, keep)
    if args.limit_test is not None:
        test_truth = test_truth[: args.limit_test]
        test_set = Subset(test_set, range(min(args.limit_test, len(test_set))))
    per_rank = len(train_plain) // dist.world
    steps = per_rank // args.batch_size
    accumulate = getattr(args, "accumulate", 1)
    opt_steps = steps // accumulate  # optimizer steps per epoch; trailing micro-batches that fill none are skipped
    if opt_steps == 0:
        raise ValueError(f"--batch-size {args.batch_size} × --accumulate {accumulate} exceeds the {per_rank} "
                         f"training images of each of {dist.world} process(es)")
    num_classes = test_truth.shape[1]
    amp = getattr(args, "amp", None)

    # the method also sees the class names and the partial training targets (label co-occurrence statistics)
    margs = argparse.Namespace(**vars(args), class_names=class_names,
                               train_targets=train_set.targets[: len(train_plain)])
    model = build_method(args.method, num_classes, margs).to(device)
    configure_backbones(model, args)
    from_checkpoint = getattr(args, "sadcl_init", None) is not None  # a stage-1 checkpoint holds the backbone
    if getattr(args, "recipe", "digits") == "paper" and args.weights is None and not from_checkpoint and dist.main:
        print("mlcontrast-train: warning: --recipe paper starts from ImageNet weights in the releases; without "
              "--weights the backbone starts from random weights", file=sys.stderr)
    ema = ModelEMA(model, args.model_ema) if getattr(args, "model_ema", None) else None  # before process_group
    if dist.world > 1:
        model.process_group = dist.group
    optimizer, scheduler, per_epoch = build_optimizer(model, args, opt_steps)
    scaler = grad_scaler(amp, device)

    start_epoch, history, step_losses = 0, [], []
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        ckpt = _load_checkpoint(args.resume, args.method, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError("--resume: the checkpoint has no model EMA; resume without --model-ema")
            ema.load_state_dict(ckpt["ema"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, step_losses = ckpt["epoch"], ckpt["history"], ckpt["step_losses"]
    if dist.main:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
        with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
            for rec in history:
                f.write(json.dumps(rec) + "\n")

    step_fn: nn.Module = _TrainingStep(model)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # a method whose loss leaves some parameters unused in some steps says so (DDP must then search)
        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=getattr(model, "has_unused_parameters", False))
    progress = not args.no_progress and dist.main
    partial = args.known_ratio < 1.0
    stop_rule = {"patience": getattr(args, "early_stop", None), "rule": getattr(args, "early_stop_rule", "best"),
                 "ema_expected": ema is not None}
    ema_start = getattr(args, "model_ema_start", 0) or 0
    for epoch in range(start_epoch, args.epochs):
        if should_stop(history, **stop_rule) or (getattr(args, "stop_on_nan", False) and _nan_loss(history)):
            break  # a resumed run that had already stopped
        t0 = time.time()
        epoch_seed = _epoch_seed(args.seed, epoch)
        _seed_all(epoch_seed + dist.rank)
        if hasattr(model, "start_epoch"):
            plain = DataLoader(train_plain, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
            model.start_epoch(epoch, plain, device)
            model.train()
        # the EMA restarts from the model here and follows it from now on (after start_epoch's changes)
        ema_now = ema if ema is not None and epoch >= ema_start else None
        if ema_now is not None and epoch == ema_start:
            ema.reset(model)
        if dist.world > 1:
            sampler = DistributedSampler(train_truth, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                         seed=epoch_seed, drop_last=True)
            loader = DataLoader(train_truth, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                num_workers=args.num_workers)
        else:
            gen = torch.Generator().manual_seed(epoch_seed)
            loader = DataLoader(train_truth, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                generator=gen, num_workers=args.num_workers)
        model.train()
        sums = torch.zeros(0, dtype=torch.float64)  # loss, then one slot per part, summed over steps
        part_names: list[str] = []
        pseudo = torch.zeros(3, dtype=torch.float64)
        micro = opt_steps * accumulate
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not progress, total=micro)
        for i, (x, y, truth) in enumerate(bar):
            if i >= micro:
                break
            x, y = x.to(device), y.to(device)
            boundary = (i + 1) % accumulate == 0
            # under DDP only the last micro-batch of a step all-reduces the gradients
            sync = step_fn.no_sync() if dist.world > 1 and not boundary else contextlib.nullcontext()
            with sync:
                with autocast(amp, device):
                    loss, parts = step_fn(x, y, epoch, i / steps)
                scaled = loss / accumulate
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            parts = dict(parts)
            labels = parts.pop("pseudo", None)
            if labels is not None and partial:
                pseudo += torch.from_numpy(pseudo_label_counts(labels, truth, y))
            if boundary:
                _optimizer_step(optimizer, scaler)
                if not per_epoch:
                    scheduler.step()
                if ema_now is not None:
                    ema_now.update(model)
            if not part_names:
                part_names = list(parts)
                sums = torch.zeros(1 + len(part_names), dtype=torch.float64)
            values = torch.tensor([float(loss.detach())] + [float(parts[k]) for k in part_names],
                                  dtype=torch.float64)
            values = dist.sum_(values) / dist.world
            step_losses.append(float(values[0]))
            sums += values
            bar.set_postfix(loss=f"{float(values[0]):.3f}")
        if per_epoch:
            scheduler.step()
        dist.sum_(pseudo)
        if dist.main:
            rec = {"epoch": epoch + 1, "loss": float(sums[0]) / micro}
            rec.update({f"loss_{k}": float(v) / micro for k, v in zip(part_names, sums[1:])})
            if partial and getattr(model, "makes_pseudo_labels", False):
                # precision is undefined (null) in an epoch without a single pseudo-positive
                rec.update(pseudo_label_rates(pseudo, empty_precision=None), pseudo_positives=int(pseudo[0]))
            rec.update(_evaluate(model, ema_now, test_set, test_truth, args, device, progress))
            rec["lr"] = scheduler.get_last_lr()[0]
            rec["time_s"] = time.time() - t0
            history.append(rec)
            _write_epoch(out, rec, history, progress)
            state = {
                "method": args.method, "epoch": epoch + 1, "args": vars(args), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                "step_losses": step_losses, "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            save_checkpoint_atomic(state, out / CHECKPOINT_NAME)
        nan = dist.main and getattr(args, "stop_on_nan", False) and _nan_loss(history)
        stop = torch.tensor([float(dist.main and (nan or should_stop(history, **stop_rule)))])
        dist.sum_(stop)  # rank 0 decides; the other ranks follow
        dist.barrier()  # the other ranks wait for the evaluation and the checkpoint
        if stop.item() > 0:
            if nan:
                print(f"mlcontrast-train: stopped after epoch {epoch + 1}: the training loss is NaN", file=sys.stderr)
            elif progress:
                tqdm.write(f"early stop after epoch {epoch + 1}: no better mAP for {args.early_stop} epochs")
            break
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return {"history": history, "step_losses": step_losses, "model": model, "ema": ema,
            "summary": summarize(history)}


def _nan_loss(history: list[dict]) -> bool:
    """The last epoch's mean training loss is NaN (``--stop-on-nan``; SADCL exits on a NaN loss in a step,
    ``code/lib_sadcl/engine.py:100-130``, or in validation, ``main_worker.py:280-289``)."""
    return bool(history) and math.isnan(history[-1]["loss"])


def _optimizer_step(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, then adapts the scale
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _evaluate(model, ema, test_set, test_truth, args, device, progress: bool) -> dict:
    """The raw model's test metrics, and under ``--model-ema`` the EMA model's in ``"ema"``."""
    amp = getattr(args, "amp", None)
    loader = DataLoader(test_set, batch_size=max(args.batch_size, 64), shuffle=False, num_workers=args.num_workers)
    out = evaluate(_predict(model, loader, device, progress, amp), test_truth)
    if ema is not None:
        out["ema"] = evaluate(_predict(ema.module, loader, device, progress, amp), test_truth)
    return out


def _write_epoch(out: Path, rec: dict, history: list[dict], progress: bool) -> None:
    """Append the epoch to ``metrics.jsonl``, rewrite ``summary.json`` (last and best epoch), report."""
    from tqdm import tqdm

    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    (out / "summary.json").write_text(json.dumps(summarize(history), indent=2) + "\n")
    if progress:
        extra = (f" pseudo P/R {rec['pseudo_precision'] or 0:.1f}/{rec['pseudo_recall']:.1f}"
                 if "pseudo_precision" in rec else "")
        if "ema" in rec:
            extra += f" EMA mAP {rec['ema']['mAP']:.2f}"
        tqdm.write(f"epoch {rec['epoch']}: loss {rec['loss']:.4f} mAP {rec['mAP']:.2f} CF1 {rec['CF1']:.2f} "
                   f"OF1 {rec['OF1']:.2f}{extra} ({rec['time_s']:.1f} s)")
