"""The training loop: data, model, AdamW + OneCycle, evaluation, JSON-lines metrics, atomic checkpoints, resume.

Determinism: every epoch reseeds the global RNGs and the shuffling generator from ``(seed, epoch)``, so a run
resumed from the checkpoint of epoch k continues exactly as the uninterrupted run (the checkpoint also holds
the RNG states, the optimizer, the scheduler and the method's buffers: prototypes and memory bank).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from mlcontrast.train.data import build_datasets
from mlcontrast.train.methods import build_method
from mlcontrast.train.metrics import evaluate

__all__ = ["run", "save_checkpoint_atomic", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
_DIGITS_DEFAULTS = {"backbone": "resnet10t", "feature_index": 2}
_FILE_DEFAULTS = {"backbone": "resnet50", "feature_index": -1}


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


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args = argparse.Namespace(**vars(args))
    defaults = _DIGITS_DEFAULTS if args.dataset == "digits" else _FILE_DEFAULTS
    if args.backbone is None:
        args.backbone = defaults["backbone"]
    if args.feature_index is None:
        args.feature_index = defaults["feature_index"] if args.backbone == defaults["backbone"] else -1
    if getattr(args, "threads", None) is None:
        args.threads = 1 if args.dataset == "digits" else 0
    if args.output is None:
        args.output = str(Path("runs") / f"{args.method}-{args.dataset}")
    return args


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


@torch.no_grad()
def _predict(model, loader, device, progress: bool):
    from tqdm import tqdm

    model.eval()
    logits = []
    for x, _ in tqdm(loader, desc="eval", leave=False, disable=not progress):
        logits.append(model(x.to(device)).float().cpu())
    return torch.cat(logits).numpy()


def run(args: argparse.Namespace, stop_after_epoch: int | None = None) -> dict:
    """Train and evaluate as the CLI does; returns ``{"history": [epoch records], "step_losses": [...]}``.

    ``stop_after_epoch`` ends the run after that epoch's checkpoint (to simulate an interruption in tests).
    """
    from tqdm import tqdm

    args = _resolve(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    _seed_all(args.seed)

    train_set, test_set = build_datasets(args.dataset, args.data_root, args.img_size, args.seed)
    if args.known_ratio < 1.0:
        train_set.apply_partial_labels(args.known_ratio, seed=args.partial_seed)
    test_truth = test_set.full_targets
    if args.limit_train is not None:
        train_set = Subset(train_set, range(min(args.limit_train, len(train_set))))
    if args.limit_test is not None:
        test_truth = test_truth[: args.limit_test]
        test_set = Subset(test_set, range(min(args.limit_test, len(test_set))))
    steps = len(train_set) // args.batch_size
    if steps == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images")
    num_classes = test_truth.shape[1]

    model = build_method(
        args.method, num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
        hidden_dim=args.hidden_dim, proj_dim=args.proj_dim, batch_size=args.batch_size, backend=args.backend,
        cls_weight=args.cls_weight, sscl_weight=args.sscl_weight, pscl_weight=args.pscl_weight,
        sscl_temperature=args.sscl_temperature, pscl_temperature=args.pscl_temperature,
        proto_momentum=args.proto_momentum, memory_threshold=args.memory_threshold,
        legacy_sadcl_mask=args.legacy_sadcl_mask, legacy_learned_prototypes=args.legacy_learned_prototypes,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps,
                                                    pct_start=0.2)

    start_epoch, history, step_losses = 0, [], []
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        ckpt_path = Path(args.resume)
        if ckpt_path.is_dir():
            ckpt_path = ckpt_path / CHECKPOINT_NAME
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["method"] != args.method:
            raise ValueError(f"--resume: checkpoint {ckpt_path} is a {ckpt['method']!r} run, not {args.method!r}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, step_losses = ckpt["epoch"], ckpt["history"], ckpt["step_losses"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True) + "\n")
    with open(out / "metrics.jsonl", "w") as f:  # rewritten from the checkpoint's history on resume
        for rec in history:
            f.write(json.dumps(rec) + "\n")

    progress = not args.no_progress
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        _seed_all(_epoch_seed(args.seed, epoch))
        gen = torch.Generator().manual_seed(_epoch_seed(args.seed, epoch))
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=gen,
                            num_workers=args.num_workers)
        model.train()
        total, parts_sum = 0.0, {}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not progress)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss, parts = model.training_loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            step_losses.append(value)
            total += value
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{value:.3f}")
        eval_loader = DataLoader(test_set, batch_size=max(args.batch_size, 64), shuffle=False,
                                 num_workers=args.num_workers)
        scores = _predict(model, eval_loader, device, progress)
        rec = {"epoch": epoch + 1, "loss": total / steps}
        rec.update({f"loss_{k}": v / steps for k, v in parts_sum.items()})
        rec.update(evaluate(scores, test_truth))
        rec["lr"] = scheduler.get_last_lr()[0]
        rec["time_s"] = time.time() - t0
        history.append(rec)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {rec['loss']:.4f} mAP {rec['mAP']:.2f} CF1 {rec['CF1']:.2f} "
                       f"OF1 {rec['OF1']:.2f} ({rec['time_s']:.1f} s)")
        state = {
            "method": args.method, "epoch": epoch + 1, "args": vars(args), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
            "step_losses": step_losses,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        save_checkpoint_atomic(state, out / CHECKPOINT_NAME)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return {"history": history, "step_losses": step_losses, "model": model}
