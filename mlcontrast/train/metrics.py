"""Multi-label metrics: VOC-style mAP, CP/CR/CF1/OP/OR/OF1 (all and top-3), pseudo-label quality.

All values are percentages (x100). Ground truth: a value > 0 is positive; 0 and -1 count as negative.
Scores may be logits (``threshold=0.0``, the default) or probabilities (``threshold=0.5``); a class is
predicted positive iff its score is >= the threshold (HST's ``utils/metrics.py`` rule).
"""

from __future__ import annotations

import numpy as np

__all__ = ["voc_ap", "average_precision_per_class", "mean_average_precision", "multilabel_metrics",
           "pseudo_label_counts", "pseudo_label_rates", "pseudo_label_metrics", "evaluate", "summarize"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_pair(scores: np.ndarray, targets: np.ndarray) -> None:
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be [N, C], got {scores.shape} and {targets.shape}")


def voc_ap(scores, gt) -> float:
    """All-point interpolated VOC AP of one class (a fraction in [0, 1]); NaN if the class has no positive.

    Images are ranked by ``argsort(-score, kind="stable")``, so tied scores keep their input order.
    """
    scores, gt = _np(scores).astype(np.float64).ravel(), _np(gt).ravel()
    npos = int((gt > 0).sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    pos = gt[order] > 0
    tp = np.cumsum(pos)
    fp = np.cumsum(~pos)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def average_precision_per_class(scores, targets) -> np.ndarray:
    """``[C]`` VOC APs x100; NaN for a class without any positive."""
    scores, targets = _np(scores), _np(targets)
    _check_pair(scores, targets)
    return np.array([voc_ap(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]) * 100.0


def mean_average_precision(scores, targets) -> float:
    """VOC-style mAP x100 over the classes that have at least one positive (NaN if none has)."""
    ap = average_precision_per_class(scores, targets)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if ap.size else float("nan")


def _prf(pred: np.ndarray, gt: np.ndarray, prefix: str, suffix: str) -> dict[str, float]:
    n_g = gt.sum(0).astype(np.float64)
    n_p = pred.sum(0).astype(np.float64)
    n_c = (pred & gt).sum(0).astype(np.float64)
    cp = float(np.mean(n_c / np.where(n_p == 0, 1.0, n_p)))
    cr = float(np.mean(n_c / np.where(n_g == 0, 1.0, n_g)))
    op = float(n_c.sum() / max(n_p.sum(), 1.0))
    orr = float(n_c.sum() / max(n_g.sum(), 1.0))
    cf1 = 2 * cp * cr / (cp + cr) if cp + cr > 0 else 0.0
    of1 = 2 * op * orr / (op + orr) if op + orr > 0 else 0.0
    # SADCL's utils/metric.py: the mean over classes of each class's F1, 0 for a class without a true positive
    # (its F1 = 2·N_c / (N_p + N_g) when N_c > 0)
    f1 = np.where(n_c > 0, 2 * n_c / np.maximum(n_p + n_g, 1.0), 0.0)
    cf1_pc = float(f1.mean()) if f1.size else 0.0
    out = {"CP": cp, "CR": cr, "CF1": cf1, "CF1_perclass": cf1_pc, "OP": op, "OR": orr, "OF1": of1}
    return {f"{prefix}{k}{suffix}": 100.0 * v for k, v in out.items()}


def multilabel_metrics(scores, targets, threshold: float = 0.0, top_k: int = 3) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 and their top-k forms (keys ``CP_top3`` ...), as percentages.

    Per class c: N_g = #positives, N_p = #predicted (taken as 1 when 0; N_g likewise), N_c = #correct.
    CP = mean_c N_c/N_p, CR = mean_c N_c/N_g, CF1 = 2·CP·CR/(CP+CR) (from the averaged CP and CR);
    CF1_perclass = mean_c F1_c with F1_c = 2·N_c/(N_p + N_g), 0 when N_c = 0 (SADCL's variant);
    OP = ΣN_c/ΣN_p, OR = ΣN_c/ΣN_g, OF1 = 2·OP·OR/(OP+OR). Top-k keeps each image's k highest scores
    (stable order on ties), still subject to score >= threshold.
    """
    scores, targets = _np(scores).astype(np.float64), _np(targets)
    _check_pair(scores, targets)
    gt = targets > 0
    pred = scores >= threshold
    out = _prf(pred, gt, "", "")
    k = min(top_k, scores.shape[1])
    top = np.zeros_like(pred)
    if scores.shape[0] and k:
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.put_along_axis(top, idx, True, axis=1)
    out.update(_prf(pred & top, gt, "", f"_top{top_k}"))
    return out


def pseudo_label_counts(pseudo, truth, partial) -> np.ndarray:
    """``[pseudo-positives, correct pseudo-positives, hidden true positives]`` on the unknown entries
    (``partial == -1``), as int64: counts add up over batches (and ranks) before they become rates.

    ``pseudo``: ``[N, C]`` 1 (pseudo-positive), 0 (pseudo-negative) or -1 (no pseudo-label);
    ``truth``: the withheld full labels (> 0 positive).
    """
    pseudo, truth, partial = _np(pseudo), _np(truth), _np(partial)
    if not (pseudo.shape == truth.shape == partial.shape):
        raise ValueError(f"pseudo, truth and partial must share one [N, C] shape, got "
                         f"{pseudo.shape}, {truth.shape}, {partial.shape}")
    unknown = partial == -1
    pp = unknown & (pseudo == 1)
    return np.array([pp.sum(), (pp & (truth > 0)).sum(), (unknown & (truth > 0)).sum()], dtype=np.int64)


def pseudo_label_rates(counts, empty_precision: float | None = 0.0) -> dict[str, float | None]:
    """Precision and recall (percentages) from :func:`pseudo_label_counts`; precision is ``empty_precision``
    without a single pseudo-positive, recall 0 without a hidden positive."""
    pp, tp, hidden = (float(v) for v in counts)
    return {
        "pseudo_precision": 100.0 * tp / pp if pp else empty_precision,
        "pseudo_recall": 100.0 * tp / max(hidden, 1.0),
    }


def pseudo_label_metrics(pseudo, truth, partial) -> dict[str, float]:
    """Quality of pseudo-labels on the entries that were unknown (``partial == -1``), as percentages.

    ``pseudo``: ``[N, C]`` 1 (pseudo-positive), 0 (pseudo-negative) or -1 (no pseudo-label);
    ``truth``: the withheld full labels (> 0 positive). pseudo_precision = correct pseudo-positives /
    pseudo-positives; pseudo_recall = correct pseudo-positives / hidden true positives (0 when empty).
    """
    return pseudo_label_rates(pseudo_label_counts(pseudo, truth, partial))


def evaluate(scores, targets, threshold: float = 0.0) -> dict[str, float]:
    """``{"mAP": ..., CP ... OF1_top3}`` for one evaluation pass."""
    out = {"mAP": mean_average_precision(scores, targets)}
    out.update(multilabel_metrics(scores, targets, threshold))
    return out


def _pick(rec: dict) -> tuple[str, dict]:
    """The better of an epoch's raw and EMA evaluations (by mAP; the raw one on a tie), as SADCL reports."""
    ema = rec.get("ema")
    if ema and ema["mAP"] > rec["mAP"]:
        return "ema", ema
    return "raw", rec


def summarize(history: list[dict], keys=("mAP", "CF1", "CF1_perclass", "OF1", "CF1_top3", "OF1_top3")) -> dict:
    """``{"last": ..., "best": ...}`` over the epoch records: the last epoch and the epoch of highest mAP, each
    ``{"epoch", "model" ("raw" or "ema"), <keys>}`` from the better of its raw and EMA evaluations. Published
    numbers are best-epoch ones; the last epoch is what a run without early stopping ends with."""
    if not history:
        return {}
    picked = []
    for rec in history:
        model, metrics = _pick(rec)
        row = {"epoch": rec["epoch"], "model": model}
        row.update({k: metrics.get(k) for k in keys})
        picked.append(row)
    finite = [r for r in picked if r["mAP"] == r["mAP"]] or picked
    best = max(finite, key=lambda r: (r["mAP"], -r["epoch"]))
    return {"last": picked[-1], "best": best}
