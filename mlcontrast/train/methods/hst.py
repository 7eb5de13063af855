"""HST: heterogeneous semantic transfer for multi-label recognition with partial labels
(research/seeds_methods.md §3).

Targets: 1 positive, 0 negative, -1 unknown (the released code uses 1 / -1 / 0; every formula below is
written in this package's encoding).

**Model** (§3.1, scaled by ``hidden_dim`` = d). Backbone map → 1×1 conv + BN to d channels, X ``[B, d, H, W]``.
Semantic decoupling with class embeddings x_c (a frozen ``[C, E]`` table from ``--hst-word-vectors``,
else a learned one): e_cu = fc4(fc3(tanh(fc1(X_u) ⊙ fc2(x_c)))), α_c = softmax_u(e_c·), f_c = Σ_u α_cu X_u —
the label-level features f ``[B, C, d]``. A GGNN (3 steps) over A_in = G, A_out = Gᵀ with
G[i, j] = #(y_i = 1 ∧ y_j = 1) / #(y_i = 1) counted on the *partial* training labels (known positives only),
diagonal 1, gives h. Logits: o_c = tanh(W[h_c; f_c]), ŷ_c = ⟨w_c, o_c⟩ + b_c. IST pair head over the
P = C(C−1)/2 pairs i < j: g = W_g f (d → d/2), u_ij = W_2 ReLU(W_1[g_i; g_j]) of width d', q_ij = ⟨v_ij, u_ij⟩ + β_ij.
W_1 is applied to g once per class and its two halves are gathered per pair, so the head holds
``[B, P, d']`` activations and never a ``[B, P, d]`` concatenation. Thresholds θ_intra, θ_inter are scalars.
Prototypes p_ck (K per class) come from k-means over f of the known positives (below).

**Scores and pseudo-labels.** R_b[i, j] = σ(q_b,ij) (symmetric, diagonal 1); with the known positives K⁺_b,
s^IST_bc = Σ_{j∈K⁺_b} R_b[c, j] / max(1, |K⁺_b|) and s^CST_bc = mean_k cos(f_bc, p_ck) (eps 1e-9).
DTL: ψ = clamp(s − θ, 0, 1), whose gradient passes on the closed interval, as torch 1.7's clamp did for the
released code (so s = θ still reaches θ; :func:`dtl_psi` makes that explicit, recent torch blocks it).
Pseudo-targets ỹ = y on known entries; an unknown entry becomes 1 where ψ (detached) > 0 and stays unknown
otherwise: HST makes no pseudo-negatives.

**Loss** (§3.5), r = ``progress`` in epoch 0 (linear ramp) and 1 after, E = ``generate_label_epoch``:

    L = BCE_k(ŷ, y) + 10·r·ASL(q, t) + 0.05·r·L_inst(f, y) + ½·λ_θ·(θ_intra² + θ_inter²)
      + [epoch ≥ E] · ( BCE_k(ŷ, ỹ^IST) + 0.1·BCE_k(ψ^IST, y) )
      + [epoch ≥ E and prototypes exist] · ( BCE_k(ŷ, ỹ^CST) + 0.1·BCE_k(ψ^CST, y) + 0.05·L_proto )

- BCE_k: mean BCE with logits over the known entries of its own target (ψ is used as a logit, as released).
- ASL(q, t): asymmetric loss on the pair logits, γ+ = 1, γ− = 2, clip 0.05, eps 1e-8, focal weight not
  detached; pair target t_ij = 1 when y_i = y_j = 1, 0 when y_i or y_j is a known negative, and the pair is
  ignored otherwise (an unknown entry says nothing about the pair). The released code counts every pair
  with an unknown entry as a negative: ``legacy_cooc_unknown_negative=True`` (``--legacy-hst-cooc-unknown-negative``).
  Mean over the pairs that have a target.
- L_inst: over the image pairs i < j of the batch and each class c, d = cos(f_ic, f_jc); PP pairs (both
  positive) cost 1 − d, PN pairs (one positive, one known negative) cost 1 + d. When |PP| = n > 0 the PN
  terms are mined: 2n drawn at random (``torch.randperm`` on the global RNG, which the engine reseeds per
  epoch) then the n largest, concatenated (repeats allowed); L_inst is the mean of the kept terms. The
  released code also pushes negative–negative pairs apart (NN, 1 + d, mined the same way); two images
  that both lack class c have no reason to disagree about it, so that is ``legacy_neg_neg_push=True``.
- L_proto = mean over (b, c) of classes with prototypes of 1 − σ_bc·s^CST_bc with σ = +1 for a known positive,
  −1 for a known negative, 0 for unknown (constant 1: no gradient): pulls positives to their prototypes and
  pushes negatives off. The released code has the opposite sign (1 + σ·s), which pushes positives away:
  ``legacy_sign=True`` (``--legacy-hst-sign``).

**θ and weight decay** (§3.4). θ = 1 and s ≤ 1 make ψ = 0 nearly everywhere, so θ only moves through the
released optimiser's *coupled* L2 decay (Adam adds wd·θ to the gradient and normalises it: θ walks down by
about lr per step). The engine's AdamW decouples decay, which would leave θ at 1 for ever; so
:meth:`param_groups` puts θ in a group without decay and the loss carries the explicit term ½·λ_θ·θ²
(λ_θ = ``theta_decay``, 5e-4 as released), whose gradient λ_θ·θ Adam then normalises exactly like the
released L2. θ starts at ``theta_init`` (1.0 as released).

**Prototypes** (§3.3). At the start of epoch e with e ≥ E and e % E == 0, :meth:`start_epoch` runs the
model in eval mode over the unshuffled training loader (training transforms, as released), collects f of
the known positives per class and runs sklearn ``KMeans`` with k = min(K, #features) (k-means++, n_init 10,
``random_state`` from (seed, epoch, class)); classes without a known positive get no prototype and take
no part in the CST terms. The prototypes, their mask and a "prototypes exist" flag are buffers (saved in
the checkpoint), as is the adjacency G and its "ready" flag: G comes from ``train_targets`` when the
builder has them (``args.train_targets``), else from the loader's dataset at the first :meth:`start_epoch`.

**Differences from the released code** (besides the three legacy flags): the backbone trains whole (the
released one freezes all but layer4 of an ImageNet ResNet-101; here it starts from random weights); the
digits scale uses d = 128, d/2 = 64 for g and SD, d' = d and a learned 64-d class embedding when no file is
given; the released test loader drops its last partial batch, the engine does not. HST's terms are cosine
margins, ASL and BCE with no SupCon/NCE form, so no public mlcontrast loss applies; ``backend`` is kept for
the interface only.

**Defaults for the 15-epoch digits run.** E = 3 (``--hst-generate-label-epoch``; released 5 of 20 epochs):
pseudo-labels from epoch 3, prototypes at epochs 3, 6, 9, 12 (0-based). θ starts at 1.0 as released: by
epoch 3 the L2 term has walked it to about 0.95, DTL then takes both to about 0.46 by the end; the
pseudo-labels reach precision ≈ 99 % and recall ≈ 99 % by epoch 7 and 97.6 % / 99.9 % in the last epoch
(test mAP 99.5 at 50 % known labels). Starting at 0.8 gave more pseudo-positives early but a precision that
sank to 82 % and a lower CF1 (95.1 against 97.7), so 1.0 stays the default (``--hst-theta-init``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlcontrast.train.argtypes import positive
from mlcontrast.train.models import Backbone, GroupWiseLinear, asymmetric_loss_terms, masked_bce
from mlcontrast.train.released_files import load_class_matrix

__all__ = [
    "HST", "SemanticDecoupling", "GGNN", "CooccurrenceHead", "cooccurrence_adjacency", "ist_scores",
    "cst_scores", "dtl_psi", "pseudo_targets", "pair_targets", "asymmetric_pair_loss", "instance_loss",
    "prototype_loss", "kmeans_prototypes",
]

COS_EPS = 1e-9


# ---------------------------------------------------------------------------------------------- model pieces


class SemanticDecoupling(nn.Module):
    """Class-guided attention pooling: ``[B, d, H, W]`` → label-level features ``[B, C, d]``."""

    def __init__(self, num_classes: int, dim: int, inter_dim: int, embed_dim: int = 64,
                 embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        if embeddings is not None:
            if embeddings.dim() != 2 or embeddings.shape[0] != num_classes:
                raise ValueError(f"class embeddings must be [C={num_classes}, E], got {tuple(embeddings.shape)}")
            # Frozen, like the released GloVe vectors; a buffer so the checkpoint carries it.
            self.register_buffer("embeddings", embeddings.float().clone())
            embed_dim = embeddings.shape[1]
        else:
            self.embeddings = nn.Parameter(torch.randn(num_classes, embed_dim))
        self.fc1 = nn.Linear(dim, inter_dim, bias=False)
        self.fc2 = nn.Linear(embed_dim, inter_dim, bias=False)
        self.fc3 = nn.Linear(inter_dim, inter_dim)
        self.fc4 = nn.Linear(inter_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, U, d]
        joint = torch.tanh(self.fc1(x)[:, None] * self.fc2(self.embeddings)[None, :, None])  # [B, C, U, i]
        alpha = torch.softmax(self.fc4(self.fc3(joint)).squeeze(-1), dim=-1)  # [B, C, U]
        return alpha @ x


class GGNN(nn.Module):
    """Gated graph network over the classes: ``steps`` GRU-style updates of h ``[B, C, d]`` along A_in = G
    and A_out = Gᵀ."""

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.w = nn.Linear(2 * dim, 3 * dim)  # W_z, W_r, W of the aggregated messages a = [G h; Gᵀ h]
        self.u_zr = nn.Linear(dim, 2 * dim)  # U_z, U_r
        self.u = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        adj = adj.to(h.dtype)
        for _ in range(self.steps):
            a = torch.cat([adj @ h, adj.t() @ h], dim=-1)
            wz, wr, wh = self.w(a).chunk(3, dim=-1)
            uz, ur = self.u_zr(h).chunk(2, dim=-1)
            z, r = torch.sigmoid(wz + uz), torch.sigmoid(wr + ur)
            h_new = torch.tanh(wh + self.u(r * h))
            h = (1 - z) * h + z * h_new
        return h


class CooccurrenceHead(nn.Module):
    """IST pair head: label-level features ``[B, C, d]`` → co-occurrence logits q ``[B, P]`` over pairs i < j.

    u_ij = W_2 ReLU(W_1 [g_i; g_j] + b_1) + b_2 with g = W_g f. W_1 [g_i; g_j] = W_1ᴸ g_i + W_1ᴿ g_j, so each
    half is applied once per class and gathered per pair: peak memory ``[B, P, width]``.
    """

    def __init__(self, num_classes: int, dim: int, width: int) -> None:
        super().__init__()
        half = max(1, dim // 2)
        self.reduce = nn.Linear(dim, half)
        self.fc1 = nn.Linear(2 * half, width)
        self.fc2 = nn.Linear(width, width)
        pi, pj = torch.triu_indices(num_classes, num_classes, offset=1)
        self.register_buffer("pair_i", pi, persistent=False)
        self.register_buffer("pair_j", pj, persistent=False)
        self.out = GroupWiseLinear(pi.numel(), width)
        self.half = half

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        g = self.reduce(f)
        w_left, w_right = self.fc1.weight[:, : self.half], self.fc1.weight[:, self.half :]
        left, right = g @ w_left.t(), g @ w_right.t()  # [B, C, width] each
        u = left[:, self.pair_i] + right[:, self.pair_j] + self.fc1.bias
        return self.out(self.fc2(F.relu(u)))


# ---------------------------------------------------------------------------------------------- scores, targets


def cooccurrence_adjacency(targets: torch.Tensor) -> torch.Tensor:
    """G[i, j] = #(y_i = 1 ∧ y_j = 1) / #(y_i = 1) over the rows of partial ``targets`` ``[N, C]``; diagonal 1.

    Only known positives count (unknown -1 and negative 0 alike are not positives). A class without a known
    positive gets a zero row (except the diagonal)."""
    kp = (torch.as_tensor(targets) == 1).double()
    both = kp.t() @ kp
    adj = both / both.diagonal().clamp(min=1.0)[:, None]
    adj.fill_diagonal_(1.0)
    return adj.float()


def ist_scores(q: torch.Tensor, targets: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor) -> torch.Tensor:
    """s^IST ``[B, C]`` = Σ_{j known positive} R[c, j] / max(1, #known positives), R = σ(q) symmetric, diag 1.

    Sums over the P pairs with ``index_add`` (no ``[B, C, C]`` matrix). A known positive that is its image's
    only one scores exactly 1 (its diagonal term; the others are multiplied by 0)."""
    kp = (targets == 1).to(q.dtype)
    r = torch.sigmoid(q)
    s = kp.clone()  # the diagonal R[c, c] = 1
    s = s.index_add(1, pair_i, r * kp[:, pair_j]).index_add(1, pair_j, r * kp[:, pair_i])
    return s / kp.sum(1, keepdim=True).clamp(min=1.0)


def cst_scores(f: torch.Tensor, prototypes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s^CST ``[B, C]`` = mean over the valid prototypes k of class c of cos(f_bc, p_ck); 0 for a class without any.

    ``prototypes`` ``[C, K, d]``, ``mask`` ``[C, K]`` bool (k-means may give a class fewer than K centres)."""
    fn = F.normalize(f.float(), dim=-1, eps=COS_EPS)
    pn = F.normalize(prototypes.float(), dim=-1, eps=COS_EPS)
    cos = torch.einsum("bcd,ckd->bck", fn, pn)
    m = mask.to(cos.dtype)
    return (cos * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def dtl_psi(s: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Differentiable pseudo-label ψ = clamp(s − θ, 0, 1), with the gradient passed on the closed interval.

    The released code relies on torch 1.7's clamp backward, which lets the gradient through where s − θ equals
    a bound; recent torch blocks it there (scalar bounds), which would freeze θ = 1 even where s = 1. So the
    value is the clamp and the gradient is 1 exactly where 0 ≤ s − θ ≤ 1."""
    x = s - theta
    inside = (x >= 0) & (x <= 1)
    return torch.where(inside, x, x.detach().clamp(0.0, 1.0))


def pseudo_targets(targets: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Known entries kept; an unknown entry becomes 1 where ψ > 0, else stays -1 (no pseudo-negatives)."""
    return torch.where(targets >= 0, targets, torch.where(psi.detach() > 0, 1, -1).to(targets.dtype))


def pair_targets(targets: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor,
                 unknown_as_negative: bool = False) -> torch.Tensor:
    """Co-occurrence targets ``[B, P]``: 1 if both classes are positive, 0 if either is a known negative,
    -1 (ignored) otherwise; with ``unknown_as_negative`` (released code) every pair not known 1–1 is 0."""
    yi, yj = targets[:, pair_i], targets[:, pair_j]
    both = (yi == 1) & (yj == 1)
    if unknown_as_negative:
        return both.to(targets.dtype)
    neg = (yi == 0) | (yj == 0)
    return torch.where(both, 1, torch.where(neg, 0, -1)).to(targets.dtype)


def asymmetric_pair_loss(q: torch.Tensor, t: torch.Tensor, gamma_pos: float = 1.0, gamma_neg: float = 2.0,
                         clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """ASL on logits q with targets t in {1, 0, -1 (ignored)}, mean over the entries with a target (0 if none).

    Positive: −(1 − p)^γ+ log p. Negative: p_m = max(p − clip, 0), −p_m^γ− log(1 − p_m). The focal weight is
    part of the graph (not detached), as released."""
    known = (t >= 0).float()
    loss = asymmetric_loss_terms(q, t, gamma_pos, gamma_neg, clip, eps)
    return loss.sum() / known.sum().clamp(min=1.0)


def _mine(terms: torch.Tensor, n: int) -> torch.Tensor:
    """Up to 2n terms drawn at random, then the n largest (repeats allowed): the released hard mining."""
    if terms.numel() == 0:
        return terms
    rand = terms[torch.randperm(terms.numel(), device=terms.device)[: 2 * n]]
    hard = terms.topk(min(n, terms.numel())).values
    return torch.cat([rand, hard])


def instance_loss(f: torch.Tensor, targets: torch.Tensor, neg_neg_push: bool = False) -> torch.Tensor:
    """Cross-image instance loss over image pairs i < j of the batch, per class c, d = cos(f_ic, f_jc).

    PP (both positive): 1 − d. PN (one positive, one known negative): 1 + d. NN (both known negative): 1 + d,
    only with ``neg_neg_push`` (released). With n = |PP| > 0, PN and NN are mined by :func:`_mine`; with n = 0
    they are kept whole. Mean over the kept terms, 0 when there is none."""
    fn = F.normalize(f.float(), dim=-1, eps=COS_EPS)
    b = f.shape[0]
    i, j = torch.triu_indices(b, b, offset=1, device=f.device)
    d = torch.einsum("icd,jcd->cij", fn, fn)[:, i, j].t()  # per-class Gram [C, B, B] → [pairs, C]
    yi, yj = targets[i], targets[j]
    pp = (yi == 1) & (yj == 1)
    pn = ((yi == 1) & (yj == 0)) | ((yi == 0) & (yj == 1))
    terms_pp, terms_pn = 1 - d[pp], 1 + d[pn]
    terms_nn = (1 + d[(yi == 0) & (yj == 0)]) if neg_neg_push else d.new_zeros(0)
    n = terms_pp.numel()
    if n > 0:
        terms_pn, terms_nn = _mine(terms_pn, n), _mine(terms_nn, n)
    terms = torch.cat([terms_pp, terms_pn, terms_nn])
    return terms.mean() if terms.numel() else d.sum() * 0.0


def prototype_loss(s: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, legacy_sign: bool = False
                   ) -> torch.Tensor:
    """mean over (b, c ∈ valid) of 1 − σ_bc s_bc, σ = +1 / −1 / 0 for positive / negative / unknown.

    ``legacy_sign`` uses 1 + σ s (the released sign, which pushes positives away from their prototypes)."""
    sign = (targets == 1).to(s.dtype) - (targets == 0).to(s.dtype)
    if legacy_sign:
        sign = -sign
    terms = (1 - sign * s)[:, valid]
    return terms.mean() if terms.numel() else s.sum() * 0.0


def kmeans_prototypes(features: torch.Tensor, k: int, random_state: int) -> torch.Tensor:
    """Centres ``[min(k, N), d]`` of sklearn k-means (k-means++, n_init 10) over ``features`` ``[N, d]``."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    k = min(k, features.shape[0])
    x = features.detach().double().cpu().numpy()
    with threadpool_limits(limits=max(1, torch.get_num_threads())):
        km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=random_state).fit(x)
    return torch.from_numpy(km.cluster_centers_).float()


def _dataset_targets(dataset) -> torch.Tensor | None:
    """The partial ``[N, C]`` targets of a dataset (through ``Subset`` wrappers), or None if it has none."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        inner = _dataset_targets(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    t = getattr(dataset, "targets", None)
    if t is None:
        return None
    t = torch.as_tensor(np.asarray(t)).long()
    return t if t.dim() == 2 else None


# ---------------------------------------------------------------------------------------------- the method


class HST(nn.Module):
    makes_pseudo_labels = True

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet10t",
        feature_index: int = -1,
        weights: str | None = None,
        hidden_dim: int = 128,
        embed_dim: int = 64,
        class_embeddings: torch.Tensor | None = None,
        sd_dim: int | None = None,
        pair_dim: int | None = None,
        ggnn_steps: int = 3,
        num_prototypes: int = 10,
        generate_label_epoch: int = 3,
        theta_init: float = 1.0,
        theta_decay: float = 5e-4,
        cooc_weight: float = 10.0,
        intra_bce_weight: float = 0.1,
        inter_bce_weight: float = 0.1,
        instance_weight: float = 0.05,
        prototype_weight: float = 0.05,
        train_targets=None,
        seed: int = 0,
        backend: str = "auto",
        legacy_sign: bool = False,
        legacy_neg_neg_push: bool = False,
        legacy_cooc_unknown_negative: bool = False,
        **_: object,
    ) -> None:
        super().__init__()
        if generate_label_epoch < 1:
            raise ValueError(f"generate_label_epoch must be >= 1, got {generate_label_epoch}")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        self.num_classes = c = num_classes
        sd_dim = sd_dim or max(1, hidden_dim // 2)
        pair_dim = pair_dim or hidden_dim
        self.backbone = Backbone(backbone, feature_index, weights)
        self.change_channel = nn.Sequential(nn.Conv2d(self.backbone.channels, hidden_dim, 1, bias=False),
                                            nn.BatchNorm2d(hidden_dim))
        self.sd = SemanticDecoupling(c, hidden_dim, sd_dim, embed_dim, class_embeddings)
        self.ggnn = GGNN(hidden_dim, ggnn_steps)
        self.fuse = nn.Linear(2 * hidden_dim, hidden_dim)
        self.fc = GroupWiseLinear(c, hidden_dim)
        self.cooc = CooccurrenceHead(c, hidden_dim, pair_dim)
        self.theta_intra = nn.Parameter(torch.tensor(float(theta_init)))
        self.theta_inter = nn.Parameter(torch.tensor(float(theta_init)))
        # State that a resumed run needs: the graph, the prototypes and whether each exists yet.
        self.register_buffer("adjacency", torch.eye(c))
        self.register_buffer("adjacency_ready", torch.tensor(False))
        self.register_buffer("prototypes", torch.zeros(c, num_prototypes, hidden_dim))
        self.register_buffer("prototype_mask", torch.zeros(c, num_prototypes, dtype=torch.bool))
        self.register_buffer("has_prototypes", torch.tensor(False))
        if train_targets is not None:
            self.set_adjacency_(train_targets)
        self.num_prototypes, self.generate_label_epoch = num_prototypes, generate_label_epoch
        self.theta_decay = theta_decay
        self.cooc_weight, self.intra_bce_weight, self.inter_bce_weight = cooc_weight, intra_bce_weight, inter_bce_weight
        self.instance_weight, self.prototype_weight = instance_weight, prototype_weight
        self.seed, self.backend = seed, backend
        self.legacy_sign, self.legacy_neg_neg_push = legacy_sign, legacy_neg_neg_push
        self.legacy_cooc_unknown_negative = legacy_cooc_unknown_negative

    # ------------------------------------------------------------------ CLI

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("HST (heterogeneous semantic transfer, partial labels)")
        g.add_argument("--hst-word-vectors", "--hst-class-embeddings", dest="hst_class_embeddings", default=None,
                       metavar="FILE", help="local [C, E] float .npy of frozen class word vectors, E setting the "
                       "width (released: GloVe [C, 300], data/coco/vectors.npy of the repo's data.zip); default: "
                       "a learned table of --hst-embed-dim")
        g.add_argument("--hst-embed-dim", type=positive(int), default=64,
                       help="width of the learned class-embedding table")
        g.add_argument("--hst-sd-dim", type=positive(int), default=None,
                       help="intermediate width of semantic decoupling (default: hidden_dim / 2)")
        g.add_argument("--hst-pair-dim", type=positive(int), default=None,
                       help="width d' of the IST pair head (default: hidden_dim)")
        g.add_argument("--hst-ggnn-steps", type=positive(int), default=3)
        g.add_argument("--hst-prototypes", type=positive(int), default=10, help="k-means prototypes per class (K)")
        g.add_argument("--hst-generate-label-epoch", type=positive(int), default=3,
                       help="E: pseudo-labels and the CST terms from epoch E (0-based); prototypes recomputed "
                            "at every epoch e >= E with e %% E == 0 (released: 5 of 20 epochs)")
        g.add_argument("--hst-theta-init", type=float, default=1.0, help="initial θ_intra and θ_inter")
        g.add_argument("--hst-theta-decay", type=float, default=5e-4,
                       help="coupled (Adam-L2) decay on θ, as a ½·λ·θ² loss term")
        g.add_argument("--hst-cooc-weight", type=float, default=10.0, help="weight of the IST pair ASL")
        g.add_argument("--hst-intra-bce-weight", type=float, default=0.1, help="weight of DTL on ψ^IST")
        g.add_argument("--hst-inter-bce-weight", type=float, default=0.1, help="weight of DTL on ψ^CST")
        g.add_argument("--hst-instance-weight", type=float, default=0.05, help="weight of the instance loss")
        g.add_argument("--hst-prototype-weight", type=float, default=0.05, help="weight of the prototype loss")
        g.add_argument("--legacy-hst-sign", action=argparse.BooleanOptionalAction, default=False,
                       help="released prototype-loss sign 1 + y·s (pushes positives away from their prototypes)")
        g.add_argument("--legacy-hst-neg-neg-push", action=argparse.BooleanOptionalAction, default=False,
                       help="released instance loss: negative-negative pairs are pushed apart too")
        g.add_argument("--legacy-hst-cooc-unknown-negative", action=argparse.BooleanOptionalAction, default=False,
                       help="released pair targets: a pair with an unknown entry counts as not co-occurring")

    @classmethod
    def from_args(cls, num_classes: int, args: argparse.Namespace) -> "HST":
        path = getattr(args, "hst_class_embeddings", None)
        emb = None if path is None else load_class_matrix(path, option="--hst-word-vectors", num_classes=num_classes,
                                                            what="class embeddings")
        return cls(
            num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
            hidden_dim=args.hidden_dim, embed_dim=args.hst_embed_dim, class_embeddings=emb, sd_dim=args.hst_sd_dim,
            pair_dim=args.hst_pair_dim, ggnn_steps=args.hst_ggnn_steps, num_prototypes=args.hst_prototypes,
            generate_label_epoch=args.hst_generate_label_epoch, theta_init=args.hst_theta_init,
            theta_decay=args.hst_theta_decay, cooc_weight=args.hst_cooc_weight,
            intra_bce_weight=args.hst_intra_bce_weight, inter_bce_weight=args.hst_inter_bce_weight,
            instance_weight=args.hst_instance_weight, prototype_weight=args.hst_prototype_weight,
            train_targets=getattr(args, "train_targets", None), seed=args.seed, backend=args.backend,
            legacy_sign=args.legacy_hst_sign, legacy_neg_neg_push=args.legacy_hst_neg_neg_push,
            legacy_cooc_unknown_negative=args.legacy_hst_cooc_unknown_negative,
        )

    def param_groups(self, weight_decay: float) -> list[dict]:
        """θ without the optimizer's (decoupled) decay: its coupled L2 is the ½·λ_θ·θ² term of the loss."""
        thetas = [self.theta_intra, self.theta_inter]
        ids = {id(p) for p in thetas}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "weight_decay": weight_decay}, {"params": thetas, "weight_decay": 0.0}]

    # ------------------------------------------------------------------ forward

    def label_features(self, x: torch.Tensor) -> torch.Tensor:
        """f ``[B, C, d]``: the semantic-decoupling output (what the CST terms and the prototypes use)."""
        return self.sd(self.change_channel(self.backbone(x)))

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        h = self.ggnn(f, self.adjacency)
        return self.fc(torch.tanh(self.fuse(torch.cat([h, f], dim=-1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.label_features(x))

    # ------------------------------------------------------------------ per-epoch state

    @torch.no_grad()
    def set_adjacency_(self, targets) -> None:
        t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
        if t.dim() != 2 or t.shape[1] != self.num_classes:
            raise ValueError(f"train_targets must be [N, C={self.num_classes}], got {tuple(t.shape)}")
        self.adjacency.copy_(cooccurrence_adjacency(t.long()))
        self.adjacency_ready.fill_(True)

    def prototype_epoch(self, epoch: int) -> bool:
        e = self.generate_label_epoch
        return epoch >= e and epoch % e == 0

    def start_epoch(self, epoch: int, loader, device) -> None:
        if not bool(self.adjacency_ready):
            targets = _dataset_targets(loader.dataset) if hasattr(loader, "dataset") else None
            if targets is None:  # no targets attribute: read them off the loader
                targets = torch.cat([y for _, y in loader])
            self.set_adjacency_(targets)
        if self.prototype_epoch(epoch):
            self.compute_prototypes_(loader, device, epoch)

    @torch.no_grad()
    def compute_prototypes_(self, loader, device, epoch: int) -> None:
        """k-means prototypes of every class over f of its known positives (eval mode; mode restored)."""
        was_training = self.training
        self.eval()
        feats, classes = [], []
        for x, y in loader:
            f = self.label_features(x.to(device)).float().cpu()
            b_idx, c_idx = (y == 1).nonzero(as_tuple=True)
            feats.append(f[b_idx, c_idx])
            classes.append(c_idx)
        self.train(was_training)
        feats, classes = torch.cat(feats), torch.cat(classes)
        protos = torch.zeros_like(self.prototypes, device="cpu")
        mask = torch.zeros_like(self.prototype_mask, device="cpu")
        for c in range(self.num_classes):
            fc = feats[classes == c]
            if fc.shape[0] == 0:
                continue
            state = (self.seed * 1_000_003 + epoch * 7919 + c) % 2**31
            centres = kmeans_prototypes(fc, self.num_prototypes, state)
            protos[c, : centres.shape[0]] = centres
            mask[c, : centres.shape[0]] = True
        self.prototypes.copy_(protos)
        self.prototype_mask.copy_(mask)
        self.has_prototypes.fill_(bool(mask.any()))

    # ------------------------------------------------------------------ loss

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, progress: float = 0.0):
        """The loss of the module docstring. ``parts``: each term unweighted (0 while inactive), the current
        θ_intra and θ_inter (logged as ``loss_theta_*`` to follow DTL) and ``pseudo`` (1 where an unknown entry
        is a pseudo-positive of IST or CST this step, -1 elsewhere)."""
        f = self.label_features(x)
        logits = self.classify(f)
        q = self.cooc(f)
        y = targets.long()
        ramp = float(progress) if epoch == 0 else 1.0
        zero = logits.new_zeros(()).float()

        l_cls = masked_bce(logits, y)
        pt = pair_targets(y, self.cooc.pair_i, self.cooc.pair_j, self.legacy_cooc_unknown_negative)
        l_cooc = asymmetric_pair_loss(q, pt)
        l_inst = instance_loss(f, y, self.legacy_neg_neg_push)
        l_theta = 0.5 * self.theta_decay * (self.theta_intra.square() + self.theta_inter.square())
        loss = l_cls + ramp * (self.cooc_weight * l_cooc + self.instance_weight * l_inst) + l_theta

        l_ist_cls = l_dtl_intra = l_cst_cls = l_dtl_inter = l_proto = zero
        pseudo = torch.full_like(y, -1)
        if epoch >= self.generate_label_epoch:
            # IST: co-occurrence with the image's known positives.
            psi_ist = dtl_psi(ist_scores(q.float(), y, self.cooc.pair_i, self.cooc.pair_j), self.theta_intra)
            y_ist = pseudo_targets(y, psi_ist)
            l_ist_cls = masked_bce(logits, y_ist)
            l_dtl_intra = masked_bce(psi_ist, y)
            loss = loss + l_ist_cls + self.intra_bce_weight * l_dtl_intra
            pseudo = torch.where((y < 0) & (y_ist == 1), 1, pseudo)
            if bool(self.has_prototypes):
                # CST: similarity to the class prototypes; classes without prototypes take no part.
                valid = self.prototype_mask.any(-1)
                s_cst = cst_scores(f, self.prototypes, self.prototype_mask)
                psi_cst = dtl_psi(s_cst, self.theta_inter) * valid
                y_cst = pseudo_targets(y, psi_cst)
                y_valid = torch.where(valid, y, -1)
                l_cst_cls = masked_bce(logits, y_cst)
                l_dtl_inter = masked_bce(psi_cst, y_valid)
                l_proto = prototype_loss(s_cst, y, valid, self.legacy_sign)
                loss = loss + l_cst_cls + self.inter_bce_weight * l_dtl_inter + self.prototype_weight * l_proto
                pseudo = torch.where((y < 0) & (y_cst == 1), 1, pseudo)

        parts = {
            "cls": l_cls.detach(), "cooc": l_cooc.detach(), "inst": l_inst.detach(),
            "ist_cls": l_ist_cls.detach(), "dtl_intra": l_dtl_intra.detach(),
            "cst_cls": l_cst_cls.detach(), "dtl_inter": l_dtl_inter.detach(), "proto": l_proto.detach(),
            "theta_intra": self.theta_intra.detach().clone(), "theta_inter": self.theta_inter.detach().clone(),
            "pseudo": pseudo,
        }
        return loss, parts
