"""TRM-ML's losses and its pseudo-label rule (the method: :mod:`mlcontrast.train.methods.trmml`).

- :func:`partial_asl`: DualCoOp's partial-label asymmetric loss, the classification term L_cls;
- :func:`distill_kl`: the knowledge-distillation term L_kd from CLIP's zero-shot logits;
- :func:`pseudo_labels`: the multimodal-prototype rule that labels the unknown entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlcontrast.train.models import asymmetric_loss_terms

__all__ = ["partial_asl", "distill_kl", "pseudo_labels"]


def partial_asl(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                gamma_pos: float = 1.0, gamma_neg: float = 2.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """DualCoOp's partial-label asymmetric loss: targets 1 / 0 count, -1 is ignored; sum / B.

    ``weights`` (optional, ``[B, C]``) scales each entry's term (pseudo-labels).
    """
    loss = asymmetric_loss_terms(logits, targets, gamma_pos, gamma_neg, clip, eps, detach_focal=True)
    if weights is not None:
        loss = loss * weights
    return loss.sum() / logits.shape[0]


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) over the class axis, mean over the rows."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=1)
    p_t = F.softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_s, p_t, reduction="sum") * t * t / student.shape[0]


@torch.no_grad()
def pseudo_labels(regions: torch.Tensor, visual_protos: torch.Tensor, text_protos: torch.Tensor,
                  targets: torch.Tensor, pos_threshold: float, inter_threshold: float, temperature: float,
                  neg_threshold: float | None = None) -> torch.Tensor:
    """``[B, C]`` pseudo-labels of the unknown entries: 1 positive, 0 negative, -1 none (known entries: -1).

    a_bc = ½ (cos(R_bc, v_c) + cos(R_bc, t_c)); e_bc = C · softmax_c(a_b· / temperature). Positive when
    a > pos_threshold and e > inter_threshold; negative when a < neg_threshold (if given) and not positive.
    """
    r = F.normalize(regions.float(), dim=-1)
    a = 0.5 * ((r * F.normalize(visual_protos.float(), dim=-1)).sum(-1)
               + (r * F.normalize(text_protos.float(), dim=-1)).sum(-1))
    e = torch.softmax(a / temperature, dim=1) * a.shape[1]
    unknown = targets == -1
    out = torch.full_like(targets, -1)
    pos = unknown & (a > pos_threshold) & (e > inter_threshold)
    out[pos] = 1
    if neg_threshold is not None:
        out[unknown & ~pos & (a < neg_threshold)] = 0
    return out
