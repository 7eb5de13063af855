"""A second, deliberately naive definition of every loss: Python loops over rows, float64.

Written from DESIGN.md independently of ``mlcontrast.reference`` and used only to check it. Every
function works on float64 copies of its inputs with ordinary autograd, so values and gradients can
both be compared. Slow: keep inputs to a few dozen rows.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8  # the eps of F.normalize, used for every cosine


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.clamp(torch.sqrt((v * v).sum()), min=EPS)


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


def _lse(values: list[torch.Tensor]) -> torch.Tensor:
    """log sum exp of a non-empty list of scalars."""
    stacked = torch.stack(values)
    m = stacked.max().detach()
    return m + torch.log(torch.exp(stacked - m).sum())


def _tied(value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``value`` in the autograd graph of ``inputs`` (a zero gradient where nothing contributes)."""
    return value + sum((0.0 * _f64(x).sum() for x in inputs if x.requires_grad), _zero())


def _reduce(rows: list[torch.Tensor], count: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.float64)
    total = sum(rows, _zero())
    if reduction == "sum":
        return total
    return total / max(count, 1)


def label_supcon(
    features, labels, temperature=0.1, base_temperature=None, reduction="mean", normalize=False, ref_features=None,
    ref_labels=None,
):  # fmt: skip
    """ℓ_i = (τ/τ_b)(LSE_{j∈A(i)} s_ij − mean_{p∈P(i)} s_ip), DESIGN.md §1; the ref rows with a label ≥ 0 join
    every A(i) and are never anchors (§10)."""
    n = features.shape[0]
    rows = label_supcon_rows(features if ref_features is None else torch.cat([features, ref_features]),
                             labels if ref_labels is None else torch.cat([labels, ref_labels]), temperature,
                             base_temperature, normalize, anchors=(0, n))  # fmt: skip
    tensors = (features,) if ref_features is None else (features, ref_features)
    return _tied(_reduce(rows, sum(int(v) >= 0 for v in labels.tolist()), reduction), *tensors)


def label_supcon_rows(
    features, labels, temperature=0.1, base_temperature=None, normalize=False, anchors=None, contrast_start=0,
    grad_stop=None,
):  # fmt: skip
    """The losses of the anchor rows ``anchors`` (all rows when None), as a list: A(i) = {j ≠ i : j ≥
    contrast_start, y_j ≥ 0}, P(i) its rows of label y_i. Row j enters the other anchors' sets through a copy
    that is detached when j ≥ grad_stop, and anchor i's own terms through z_i itself (the op's roles)."""
    tb = temperature if base_temperature is None else base_temperature
    z = [_f64(r) for r in features.unbind(0)]
    if normalize:
        z = [_unit(r) for r in z]
    stop = len(z) if grad_stop is None else grad_stop
    contrasted = [r if j < stop else r.detach() for j, r in enumerate(z)]
    y = [int(v) for v in labels.tolist()]
    start, end = (0, len(z)) if anchors is None else anchors
    rows = []
    for i in range(start, end):
        others = [j for j in range(contrast_start, len(z)) if j != i and y[j] >= 0]
        positives = [j for j in others if y[j] == y[i]]
        if y[i] < 0 or not positives:
            rows.append(_zero())
            continue
        lse = _lse([torch.dot(z[i], contrasted[j]) / temperature for j in others])
        mean_pos = sum((torch.dot(z[i], contrasted[p]) / temperature for p in positives), _zero()) / len(positives)
        rows.append((temperature / tb) * (lse - mean_pos))
    return rows


def supcon(features, labels=None, temperature=0.07, base_temperature=0.07, contrast_mode="all"):
    """SupContrast's SupConLoss: rows in view-major order (v, b), every other row in the denominator."""
    b, v = features.shape[:2]
    z, y = [], []
    for view in range(v):
        for sample in range(b):
            z.append(_f64(features[sample, view]).reshape(-1))
            y.append(sample if labels is None else int(labels[sample]))
    anchors = range(b) if contrast_mode == "one" else range(b * v)
    rows = []
    for i in anchors:
        others = [j for j in range(b * v) if j != i]
        positives = [j for j in others if y[j] == y[i]]
        if not positives:
            rows.append(_zero())
            continue
        lse = _lse([torch.dot(z[i], z[j]) / temperature for j in others])
        mean_log_prob = sum((torch.dot(z[i], z[p]) / temperature - lse for p in positives), _zero()) / len(positives)
        rows.append(-(temperature / base_temperature) * mean_log_prob)
    return _tied(sum(rows, _zero()) / len(rows), features)


def multilabel_supcon(features, targets, temperature=0.2, base_temperature=None, legacy_sadcl=False):
    """SADCL's SSCL. Rows (v, b, c) with targets[b, c] = 1, label c; mean over V * sum(targets == 1).

    legacy_sadcl: row (v, b, c) is an anchor only if also targets[(v*B + b) // V, c] = 1.
    """
    tb = temperature if base_temperature is None else base_temperature
    if features.dim() == 3:
        features = features.unsqueeze(1)
    b, v, c, _ = features.shape
    members = []  # (key, unit feature, class)
    for view in range(v):
        for sample in range(b):
            for cls in range(c):
                if int(targets[sample, cls]) == 1:
                    members.append(((view, sample, cls), _unit(_f64(features[sample, view, cls])), cls))
    total = _zero()
    for i, ((view, sample, cls), zi, yi) in enumerate(members):
        if legacy_sadcl and int(targets[(view * b + sample) // v, cls]) != 1:
            continue
        others = [j for j in range(len(members)) if j != i]
        positives = [j for j in others if members[j][2] == yi]
        if not positives:
            continue
        lse = _lse([torch.dot(zi, members[j][1]) / temperature for j in others])
        mean_pos = sum((torch.dot(zi, members[p][1]) / temperature for p in positives), _zero()) / len(positives)
        total = total + (temperature / tb) * (lse - mean_pos)
    return _tied(total / max(len(members), 1), features)


def prototype_nce(features, prototypes, targets, temperature=0.07):
    """SADCL's PSCL: −(1/Σ|P_c|) Σ_{c : K_c ≠ ∅} (LSE_{P_c} s − LSE_{K_c} s), empty LSE = 0."""
    b, c, _ = features.shape
    total, n_pos = _zero(), 0
    for cls in range(c):
        p = _unit(_f64(prototypes[cls]))
        known = [r for r in range(b) if int(targets[r, cls]) >= 0]
        positive = [r for r in range(b) if int(targets[r, cls]) == 1]
        n_pos += len(positive)
        if not known:
            continue
        s = {r: torch.dot(_unit(_f64(features[r, cls])), p) / temperature for r in known}
        lse_pos = _lse([s[r] for r in positive]) if positive else _zero()
        total = total + (lse_pos - _lse([s[r] for r in known]))
    if n_pos == 0:
        return _tied(_zero(), features, prototypes)
    return _tied(-total / n_pos, features, prototypes)


def prototype_ce(features, labels, prototypes, temperature=0.1):
    """Mean over rows with labels ≥ 0 of −log softmax_c(cos(z_i, p_c)/τ)[labels_i]."""
    units = [_unit(_f64(p)) for p in prototypes.unbind(0)]
    total, count = _zero(), 0
    for i in range(features.shape[0]):
        yi = int(labels[i])
        if yi < 0:
            continue
        zi = _unit(_f64(features[i]))
        logits = [torch.dot(zi, p) / temperature for p in units]
        total = total + _lse(logits) - logits[yi]
        count += 1
    return _tied(total / max(count, 1), features, prototypes)


def multihot_supcon(
    features,
    targets,
    temperature=0.1,
    base_temperature=None,
    positives="jaccard",
    threshold=0.5,
    reduction="mean",
    normalize=False,
    ref_features=None,
    ref_targets=None,
):
    """DESIGN.md §9/§10, row by row: label sets as Python sets, the ref rows appended to the contrast set."""
    tb = temperature if base_temperature is None else base_temperature
    rows = list(features.unbind(0)) + ([] if ref_features is None else list(ref_features.unbind(0)))
    z = [_unit(_f64(r)) if normalize else _f64(r) for r in rows]
    all_targets = targets.tolist() + ([] if ref_targets is None else ref_targets.tolist())
    sets = [{c for c, v in enumerate(row) if int(v) == 1} for row in all_targets]
    out, count = [], 0
    for i in range(features.shape[0]):
        others = [j for j in range(len(z)) if j != i]
        s = {j: torch.dot(z[i], z[j]) / temperature for j in others}
        lse = _lse([s[j] for j in others]) if others else None
        if positives == "mulsupcon":
            row = _zero()
            for c in sorted(sets[i]):
                pos = [p for p in others if c in sets[p]]
                if pos:
                    row = row + lse - sum((s[p] for p in pos), _zero()) / len(pos)
                    count += 1
            out.append((temperature / tb) * row)
            continue
        weights = {}
        for j in others:
            o, u = len(sets[i] & sets[j]), len(sets[i] | sets[j])
            if positives == "jaccard":
                w = o / u if u else 0.0
                if w > 0 and w >= threshold:
                    weights[j] = w
            elif positives == "any" and o > 0:
                weights[j] = 1.0
            elif positives == "all" and sets[i] and sets[j] == sets[i]:
                weights[j] = 1.0
        if not weights:
            out.append(_zero())
            continue
        count += 1
        total = sum((w * (lse - s[j]) for j, w in weights.items()), _zero())
        out.append((temperature / tb) * total / len(weights))
    inputs = (features,) if ref_features is None else (features, ref_features)
    return _tied(_reduce(out, count, reduction), *inputs)


@torch.no_grad()
def update_prototypes_(prototypes, features, labels, momentum=0.99, normalize=True):
    """p_c ← m p_c + (1 − m) mean of the rows of class c, for present classes; in place, computed in fp64."""
    for cls in range(prototypes.shape[0]):
        rows = [i for i in range(features.shape[0]) if int(labels[i]) == cls]
        if not rows:
            continue
        mean = sum((_f64(features[i]) for i in rows), torch.zeros(features.shape[1], dtype=torch.float64)) / len(rows)
        updated = momentum * _f64(prototypes[cls]) + (1 - momentum) * mean
        if normalize:
            updated = _unit(updated)
        prototypes[cls] = updated.to(prototypes.dtype)
    return prototypes


def logsumexp_scalars(*values: float) -> float:
    """log Σ exp for plain floats, for the hand-worked expectations."""
    m = max(values)
    return m + math.log(sum(math.exp(x - m) for x in values))
