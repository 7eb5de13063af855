r"""TRM-ML: text-region matching for multi-label recognition with missing labels (research/trmml.md).

TRM-ML's code was never released and only the paper's abstract, its Figure 2 caption and third-party
summaries could be read, so this is a reconstruction (research/seeds_methods.md §4.3). Verified: frozen CLIP
image and text encoders; learnable category queries, one cross-attention and a simple MLP give one region
feature per category; each region is matched one to one with its category's text feature; multimodal
contrastive learning; visual + text category prototypes estimate the unknown labels; "knowledge
distillation for cross-modal alignment" (one summary only). Everything else is a choice, made a flag.

Pipeline, for an image b and a class c (D: CLIP's embedding width, or ``--hidden-dim`` without CLIP):

- image tokens X_b ``[HW, D]``. With ``--trmml-clip-checkpoint`` (open_clip, frozen, always in eval mode):
  ResNet CLIP: the last stage's map, each location through the attention pool's v_proj then c_proj
  (DualCoOp's dense features, §4.2); ViT CLIP: the patch tokens through ln_post and proj. The global
  embedding g_b is CLIP's own pooled image feature (positional embeddings resized bicubically when the
  input grid differs from CLIP's). Inputs are re-normalised from the loader's mean/std to CLIP's.
  Without a checkpoint (the embedded digits dataset): a trained timm tower (:class:`Backbone`), its map
  projected to D per location, stands in for CLIP, and the text table is learned (``uses_clip`` is False,
  and the constructor says so on stderr).
- text features T_c ``[C, D]``, unit rows: CLIP's text encoder on the hand-crafted prompt
  ``--trmml-prompt`` ("a photo of a {}.") with the dataset's class names, computed once (a buffer);
  without CLIP a learned table, L2-normalised.
- category-aware regions: queries Q ``[C, D]`` initialised from T; R_b = Q + MHA(LN(Q), LN(X_b), LN(X_b)),
  then R_b ← R_b + MLP(LN(R_b)) with MLP = Linear(D, D), ReLU, Linear(D, D) (the DETR-style "simple MLP").
- one-to-one matching logits: ŷ_bc = κ · cos(R_bc, T_c), κ = exp(s) learnable, s initialised to
  log ``--trmml-logit-scale`` and clamped to ≤ log 100 (CLIP's bound).

Loss (y: the partial targets; y' = y with the pseudo-labels written into unknown entries):

    L = w_cls · L_cls(ŷ, y') + w_kd · L_kd + w_mcl · L_mcl (+ w_proto · L_proto)

- L_cls, ``--trmml-cls-loss``: ``asl`` (default): DualCoOp's partial asymmetric loss (§4.2): for positives
  (1 − p)^γ+ · log p, for negatives p_m^γ− · log(1 − p_m) with p_m = max(p − clip, 0), focal weights without
  gradient, γ+ = 1, γ− = 2, clip 0.05, summed over the labelled entries and divided by B; pseudo-labelled
  entries weigh ``--trmml-pseudo-weight``. ``bce``: the weighted mean BCE over the labelled entries.
- L_kd, ``--trmml-kd``: ``kl`` (trmml.md §5, the author's DistillKL, T = 4): T² · KL(softmax(t/T) ‖
  softmax(ŷ/T)) over the classes, mean over the batch, with the frozen CLIP zero-shot logits
  t_bc = CLIP-logit-scale · cos(g_b, T_c) as the teacher. ``cos`` (§4.3 option B): mean of 1 − cos(R_bc, T_c)
  over the positive entries of y'. ``auto`` (default) is ``kl`` with CLIP and ``none`` without: without a
  frozen CLIP there is no teacher, and option B would only repeat what L_mcl already pulls.
- L_mcl (multimodal contrastive): :func:`mlcontrast.label_supcon_loss` (features L2-normalised, τ =
  ``--trmml-mcl-temperature``) over the rows {R_bc : y'_bc = 1} ∪ {T_c}, class ids as labels: a region is
  pulled towards the same class's regions of other images and towards its text feature, and pushed from
  the other classes' regions and texts; the text rows are anchors too. ``--trmml-mcl-text present``
  (default) adds T_c only for the classes that have a region row (every text row then has a positive),
  ``all`` adds every class. The known-negative regions {R_bc : y'_bc = 0} join too, labelled C + c: each
  class's "c is absent" regions form a class of their own, pushed from T_c and from c's positive regions.
  Without them (``--trmml-mcl-no-negatives``) the term only pulls class c's regions, which all share c's
  query, towards T_c, so every image's logit for c rises; with few known labels the ASL on the known
  negatives, saturated, cannot pull them back (at 10 % known labels the classifier then predicts every
  class everywhere). Under torchrun the text rows come from rank 0 only, so the ranks together contrast
  exactly the set one process would.
- L_proto (optional, ``--trmml-proto-weight``, default 0): SADCL's PSCL, :func:`mlcontrast.prototype_nce_loss`
  of R against the visual prototypes with the targets y'.

Multimodal prototypes and pseudo-labels (no gradient):

- visual prototypes V ``[C, D]``: a :class:`mlcontrast.PrototypeBank` (unit rows, initialised from T), moved
  after each step by v_c ← normalise(m · v_c + (1 − m) · mean_b R̂_bc) over the *known* positives (R̂: unit
  rows), m = ``--trmml-proto-momentum`` (0.99, the value SADCL declares); text prototypes are T.
- from epoch ``--trmml-warmup-epochs`` on (0-based epochs ≥ E_w), every unknown entry (y_bc = −1) gets
  intra-category score a_bc = ½ (cos(R_bc, v_c) + cos(R_bc, T_c)) and inter-category score
  e_bc = C · softmax_c(a_b· / τ_p) (the softmax relative to the uniform 1/C, so one threshold fits any C).
  Pseudo-positive when a_bc > θ_a and e_bc > θ_e; pseudo-negative when a_bc < θ_neg (off by default).
  The rule is checked on the batch's known entries too: a step makes pseudo-positives only when at least
  ``--trmml-pseudo-min-precision`` (0.9) of the known entries the rule flags are known positives, so an
  early, unreliable rule (few known labels) does not teach the classifier its mistakes.
  They are returned as ``parts["pseudo"]`` (1 / 0 / −1).

The frozen CLIP image tower is held outside the registered submodules: it is rebuilt from the checkpoint
file, so it stays out of ``state_dict`` (and of the training checkpoints and DDP's broadcasts); ``.to()``
still moves it. The text encoder is dropped once T is computed.

Defaults, none of them from the paper (the paper's values were not found): 8 heads, dropout 0, κ₀ = 20,
ASL, w_cls = w_mcl = w_kd = 1, τ_mcl = 0.1, KD T = 4, m = 0.99, E_w = 3, θ_a = 0.6, θ_e = 1, τ_p = 0.1,
no pseudo-negatives, pseudo weight 1, pseudo-label precision gate 0.9, known negatives in L_mcl, w_proto = 0.
Measured on digits (15 epochs, CPU) before the last two were added, at 50 % known labels: test mAP 99.76 /
CF1 98.24 / OF1 98.23, pseudo-positive precision / recall 99.7 / 99.9 by the last epoch;
``--trmml-proto-weight 1`` gave 99.79 / 97.55 / 97.49 (no gain, so it is off); no pseudo-labels
(``--trmml-warmup-epochs 15``), 99.68 / 97.38 / 97.32. At 10 % known labels that version collapsed (mAP 26:
the saturation above, then pseudo-labels of 24 % precision); README's training table has the current figures.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlcontrast import PrototypeBank, label_supcon_loss, prototype_nce_loss
from mlcontrast.train.argtypes import non_negative_int, positive, unit_interval
from mlcontrast.train.data import EMBEDDED
from mlcontrast.train.methods.trmml_encoders import INPUT_NORMS, ClipImageTower, TimmTower, load_clip
from mlcontrast.train.methods.trmml_losses import distill_kl, partial_asl, pseudo_labels
from mlcontrast.train.models import masked_bce

__all__ = ["TRMML", "RegionLearner", "partial_asl", "pseudo_labels", "distill_kl"]

_MAX_LOG_SCALE = math.log(100.0)
_MIN_LOG_TEMPERATURE = math.log(0.01)  # the same bound for a learned τ


# ---------------------------------------------------------------- the region learner


class RegionLearner(nn.Module):
    """Category-aware region learning: C queries cross-attend over the image tokens, then a residual MLP.

    ``tokens [B, N, D] → regions [B, C, D]``. Pre-norm (LayerNorm on the queries, the tokens and the MLP input),
    so the queries' scale (initialised from unit text rows) and the tokens' scale do not matter.
    """

    def __init__(self, num_classes: int, dim: int, heads: int = 8, dropout: float = 0.0,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the region width {dim} is not divisible by --trmml-heads {heads}")
        init = torch.randn(num_classes, dim) / math.sqrt(dim) if init is None else init
        self.queries = nn.Parameter(init.detach().clone().float())
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        kv = self.norm_kv(tokens)
        r = self.queries + self.attn(q, kv, kv, need_weights=False)[0]
        return r + self.mlp(self.norm_mlp(r))


# ---------------------------------------------------------------- the method


class TRMML(nn.Module):
    """TRM-ML as the module docstring describes: image tokens → category regions → text-region logits, trained
    with L_cls + L_kd + L_mcl (+ L_proto) and multimodal-prototype pseudo-labels."""

    makes_pseudo_labels = True
    #: set by the engine under torchrun, so the multimodal contrastive loss contrasts every rank's rows
    process_group = None

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet10t",
        feature_index: int = -1,
        weights: str | None = None,
        hidden_dim: int = 128,
        class_names: list[str] | None = None,
        clip_model: str = "RN101",
        clip_checkpoint: str | None = None,
        prompt: str = "a photo of a {}.",
        input_norm: str = "imagenet",
        heads: int = 8,
        dropout: float = 0.0,
        logit_scale: float = 20.0,
        learn_scale: bool = True,
        cls_loss: str = "asl",
        cls_weight: float = 1.0,
        asl_gamma_pos: float = 1.0,
        asl_gamma_neg: float = 2.0,
        asl_clip: float = 0.05,
        kd: str = "auto",
        kd_weight: float = 1.0,
        kd_temperature: float = 4.0,
        mcl_weight: float = 1.0,
        mcl_temperature: float = 0.1,
        mcl_learn_temperature: bool = False,
        mcl_text: str = "present",
        mcl_negatives: bool = True,
        proto_momentum: float = 0.99,
        proto_weight: float = 0.0,
        proto_temperature: float = 0.07,
        warmup_epochs: int = 3,
        pseudo_threshold: float = 0.6,
        pseudo_inter_threshold: float = 1.0,
        pseudo_temperature: float = 0.1,
        pseudo_neg_threshold: float | None = None,
        pseudo_min_precision: float = 0.9,
        pseudo_weight: float = 1.0,
        backend: str = "auto",
        quiet: bool = False,
        **_: object,
    ) -> None:
        super().__init__()
        if cls_loss not in ("asl", "bce"):
            raise ValueError(f"--trmml-cls-loss must be 'asl' or 'bce', got {cls_loss!r}")
        if kd not in ("auto", "kl", "cos", "none"):
            raise ValueError(f"--trmml-kd must be auto, kl, cos or none, got {kd!r}")
        if mcl_text not in ("present", "all"):
            raise ValueError(f"--trmml-mcl-text must be 'present' or 'all', got {mcl_text!r}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"--trmml-input-norm must be one of {sorted(INPUT_NORMS)}, got {input_norm!r}")
        self.num_classes = num_classes
        self.uses_clip = clip_checkpoint is not None
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")

        if self.uses_clip:
            clip, tokenizer = load_clip(clip_model, clip_checkpoint)
            with torch.no_grad():
                prompts = [prompt.format(n.replace("_", " ")) for n in names]
                text = F.normalize(clip.encode_text(tokenizer(prompts)).float(), dim=-1)
            self.register_buffer("text_features", text)
            self.clip_logit_scale = float(clip.logit_scale.detach().exp())
            tower = ClipImageTower(clip.visual, input_norm)
            del clip  # the text tower is no longer needed
            # outside the registered modules: frozen weights stay out of state_dict, optimizer and DDP
            object.__setattr__(self, "_clip_tower", tower)
            self.image_tower = None
            dim = text.shape[1]
            kd = "kl" if kd == "auto" else kd
        else:
            if kd == "kl":
                raise ValueError("--trmml-kd kl needs a frozen CLIP teacher (--trmml-clip-checkpoint)")
            kd = "none" if kd == "auto" else kd
            object.__setattr__(self, "_clip_tower", None)
            dim = hidden_dim
            self.image_tower = TimmTower(backbone, feature_index, weights, dim)
            self.text_table = nn.Parameter(F.normalize(torch.randn(num_classes, dim), dim=-1))
            if not quiet:
                print(f"trmml: no --trmml-clip-checkpoint: a trained timm tower ({backbone}) and a learned class-text "
                      f"table [{num_classes}, {dim}] stand in for CLIP's frozen encoders; knowledge distillation: "
                      f"{kd}", file=sys.stderr)
        text0 = self.text_protos().detach()
        self.regions = RegionLearner(num_classes, dim, heads, dropout, init=text0)
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learn_scale)
        self.prototype_bank = PrototypeBank(num_classes, dim, momentum=proto_momentum, normalize=True, init=text0,
                                            backend=backend)
        self.kd, self.kd_weight, self.kd_temperature = kd, kd_weight, kd_temperature
        self.cls_loss, self.cls_weight = cls_loss, cls_weight
        self.asl = dict(gamma_pos=asl_gamma_pos, gamma_neg=asl_gamma_neg, clip=asl_clip)
        self.mcl_weight, self.mcl_temperature, self.mcl_text = mcl_weight, mcl_temperature, mcl_text
        if mcl_learn_temperature:  # τ = exp(s), s learned; label_supcon_loss gives s its exact gradient
            self.mcl_log_temperature = nn.Parameter(torch.tensor(math.log(mcl_temperature)))
        self.mcl_negatives = mcl_negatives
        self.proto_weight, self.proto_temperature = proto_weight, proto_temperature
        self.warmup_epochs, self.pseudo_weight = warmup_epochs, pseudo_weight
        self.pseudo_threshold, self.pseudo_inter_threshold = pseudo_threshold, pseudo_inter_threshold
        self.pseudo_temperature, self.pseudo_neg_threshold = pseudo_temperature, pseudo_neg_threshold
        self.pseudo_min_precision = pseudo_min_precision
        self.backend = backend

    # ------------------------------------------------------------ CLI

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("TRM-ML (--method trmml)")
        g.add_argument("--trmml-clip-model", default="RN101",
                       help="open_clip architecture name, or a local .json model config")
        g.add_argument("--trmml-clip-checkpoint", default=None,
                       help="local open_clip checkpoint file: frozen CLIP encoders (pip install open_clip_torch); "
                            "without it a trained timm tower and a learned text table stand in")
        g.add_argument("--trmml-prompt", default="a photo of a {}.", help="hand-crafted prompt, {} = class name")
        g.add_argument("--trmml-input-norm", choices=["auto", *INPUT_NORMS], default="auto",
                       help="the mean/std the loader normalised with (re-normalised to CLIP's); auto: half on "
                            "the embedded datasets (digits, mnist_mosaic), else imagenet")
        g.add_argument("--trmml-heads", type=positive(int), default=8, help="cross-attention heads")
        g.add_argument("--trmml-dropout", type=unit_interval, default=0.0, help="dropout of the region learner")
        g.add_argument("--trmml-logit-scale", type=positive(float), default=20.0,
                       help="initial κ of the matching logits κ·cos(R, T)")
        g.add_argument("--trmml-fixed-scale", action="store_true", help="keep κ fixed (default: learned)")
        g.add_argument("--trmml-cls-loss", choices=["asl", "bce"], default="asl",
                       help="partial asymmetric loss (sum / B) or mean BCE on the labelled entries")
        g.add_argument("--trmml-cls-weight", type=float, default=1.0)
        g.add_argument("--trmml-asl-gamma-pos", type=float, default=1.0)
        g.add_argument("--trmml-asl-gamma-neg", type=float, default=2.0)
        g.add_argument("--trmml-asl-clip", type=unit_interval, default=0.05)
        g.add_argument("--trmml-kd", choices=["auto", "kl", "cos", "none"], default="auto",
                       help="knowledge distillation: kl from CLIP's zero-shot logits (T = --trmml-kd-temperature), "
                            "cos: 1 - cos(R, T) on positives; auto: kl with CLIP, none without")
        g.add_argument("--trmml-kd-weight", type=float, default=1.0)
        g.add_argument("--trmml-kd-temperature", type=positive(float), default=4.0)
        g.add_argument("--trmml-mcl-weight", type=float, default=1.0, help="weight of the multimodal contrastive loss")
        g.add_argument("--trmml-mcl-temperature", type=positive(float), default=0.1)
        g.add_argument("--trmml-mcl-learn-temperature", action="store_true",
                       help="learn τ_mcl (as exp(s), initialised to --trmml-mcl-temperature, kept ≥ 0.01)")
        g.add_argument("--trmml-mcl-text", choices=["present", "all"], default="present",
                       help="text rows in the contrast set: classes with a region row, or all classes")
        g.add_argument("--trmml-mcl-no-negatives", action="store_true",
                       help="leave the known-negative regions out of the contrast set (default: each class's "
                            "negative regions form a class of their own, pushed from its text and positives)")
        g.add_argument("--trmml-proto-momentum", type=unit_interval, default=0.99,
                       help="EMA momentum of the visual prototypes")
        g.add_argument("--trmml-proto-weight", type=float, default=0.0,
                       help="weight of the PSCL-style region-to-visual-prototype NCE (0: off)")
        g.add_argument("--trmml-proto-temperature", type=positive(float), default=0.07)
        g.add_argument("--trmml-warmup-epochs", type=non_negative_int, default=3,
                       help="epochs before pseudo-labelling starts")
        g.add_argument("--trmml-pseudo-threshold", type=float, default=0.6,
                       help="θ_a: pseudo-positive needs a = ½(cos(R, v) + cos(R, T)) above it")
        g.add_argument("--trmml-pseudo-inter-threshold", type=float, default=1.0,
                       help="θ_e: … and C·softmax over classes of a/τ_p above it (1 = uniform)")
        g.add_argument("--trmml-pseudo-temperature", type=positive(float), default=0.1, help="τ_p")
        g.add_argument("--trmml-pseudo-neg-threshold", type=float, default=None,
                       help="pseudo-negative when a is below it (default: no pseudo-negatives)")
        g.add_argument("--trmml-pseudo-weight", type=float, default=1.0, help="loss weight of pseudo-labelled entries")
        g.add_argument("--trmml-pseudo-min-precision", type=unit_interval, default=0.9,
                       help="make pseudo-positives in a step only if the rule's precision on the batch's known labels "
                            "reaches this (0: always)")

    @classmethod
    def from_args(cls, num_classes: int, args: argparse.Namespace) -> "TRMML":
        norm = args.trmml_input_norm
        if norm == "auto":
            norm = "half" if getattr(args, "dataset", None) in EMBEDDED else "imagenet"
        return cls(
            num_classes, backbone=args.backbone, feature_index=args.feature_index, weights=args.weights,
            hidden_dim=args.hidden_dim, class_names=getattr(args, "class_names", None),
            clip_model=args.trmml_clip_model, clip_checkpoint=args.trmml_clip_checkpoint, prompt=args.trmml_prompt,
            input_norm=norm, heads=args.trmml_heads, dropout=args.trmml_dropout,
            logit_scale=args.trmml_logit_scale, learn_scale=not args.trmml_fixed_scale,
            cls_loss=args.trmml_cls_loss, cls_weight=args.trmml_cls_weight, asl_gamma_pos=args.trmml_asl_gamma_pos,
            asl_gamma_neg=args.trmml_asl_gamma_neg, asl_clip=args.trmml_asl_clip, kd=args.trmml_kd,
            kd_weight=args.trmml_kd_weight, kd_temperature=args.trmml_kd_temperature,
            mcl_weight=args.trmml_mcl_weight, mcl_temperature=args.trmml_mcl_temperature,
            mcl_learn_temperature=args.trmml_mcl_learn_temperature,
            mcl_text=args.trmml_mcl_text, mcl_negatives=not args.trmml_mcl_no_negatives,
            proto_momentum=args.trmml_proto_momentum,
            proto_weight=args.trmml_proto_weight, proto_temperature=args.trmml_proto_temperature,
            warmup_epochs=args.trmml_warmup_epochs, pseudo_threshold=args.trmml_pseudo_threshold,
            pseudo_inter_threshold=args.trmml_pseudo_inter_threshold,
            pseudo_temperature=args.trmml_pseudo_temperature, pseudo_neg_threshold=args.trmml_pseudo_neg_threshold,
            pseudo_min_precision=args.trmml_pseudo_min_precision,
            pseudo_weight=args.trmml_pseudo_weight, backend=args.backend,
        )

    # ------------------------------------------------------------ model

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._clip_tower is not None:  # the unregistered frozen tower moves with the model
            self._clip_tower._apply(fn, recurse)
        return self

    @property
    def clip_tower(self) -> nn.Module | None:
        return self._clip_tower

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=_MAX_LOG_SCALE).exp()

    @property
    def mcl_tau(self) -> float | torch.Tensor:
        """τ of L_mcl: the number, or exp(s) (≥ 0.01, CLIP's bound on its scale) when it is learned."""
        log_t = getattr(self, "mcl_log_temperature", None)
        return self.mcl_temperature if log_t is None else log_t.clamp(min=_MIN_LOG_TEMPERATURE).exp()

    @property
    def visual_protos(self) -> torch.Tensor:
        return self.prototype_bank()

    def text_protos(self) -> torch.Tensor:
        """T ``[C, D]``, unit rows (frozen CLIP text features, or the learned table)."""
        return self.text_features if self.uses_clip else F.normalize(self.text_table, dim=-1)

    def encode_image(self, x: torch.Tensor):
        """``(tokens [B, N, D], global [B, D])``; no gradient on the CLIP path."""
        return self._clip_tower(x) if self.uses_clip else self.image_tower(x)

    def match(self, regions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One-to-one text-region logits κ · cos(R_bc, T_c) ``[B, C]``."""
        return self.logit_scale * (F.normalize(regions, dim=-1) * F.normalize(text, dim=-1)).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encode_image(x)
        return self.match(self.regions(tokens), self.text_protos())

    # ------------------------------------------------------------ training

    def contrast_set(self, regions: torch.Tensor, text: torch.Tensor, positives: torch.Tensor,
                     negatives: torch.Tensor | None = None):
        """``(rows [N, D], labels [N])`` of the multimodal contrastive loss: the region features at the positive
        entries (label c), at the negative entries when given (label C + c), then the text rows (every class,
        or those with a positive region row: on every rank, under a group)."""
        b, c = positives.nonzero(as_tuple=True)
        rows, labels = [regions[b, c]], [c]
        if negatives is not None:
            nb, nc = negatives.nonzero(as_tuple=True)
            rows.append(regions[nb, nc])
            labels.append(nc + self.num_classes)
        if self.mcl_text == "all":
            keep = torch.ones(self.num_classes, dtype=torch.bool, device=text.device)
        else:
            counts = positives.sum(0)
            if self.process_group is not None:
                counts = counts.clone()
                torch.distributed.all_reduce(counts, group=self.process_group)
            keep = counts > 0
        if self.process_group is not None and torch.distributed.get_rank(self.process_group) != 0:
            keep = torch.zeros_like(keep)  # one copy of T in the cross-rank set (rank 0's)
        cls = keep.nonzero().flatten()
        rows.append(text[cls])
        labels.append(cls)
        return torch.cat(rows).float(), torch.cat(labels)

    def pseudo_labels(self, regions: torch.Tensor, protos: torch.Tensor, text: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
        """The pseudo-label rule on the unknown entries, gated by its own precision on the known ones.

        The rule is applied to every entry; where the batch's known labels say that fewer than
        ``pseudo_min_precision`` of its known-entry positives are right (or it flags no known entry), the model
        is not ready and this step makes no pseudo-positives. With few known labels (10 %), the prototypes of
        the first epochs flag most entries, and training on those pseudo-labels collapses the classifier.
        """
        everywhere = pseudo_labels(regions, protos, text, torch.full_like(targets, -1), self.pseudo_threshold,
                                   self.pseudo_inter_threshold, self.pseudo_temperature, self.pseudo_neg_threshold)
        unknown = targets == -1
        pseudo = torch.where(unknown, everywhere, torch.full_like(targets, -1))
        if self.pseudo_min_precision > 0:
            flagged = (everywhere == 1) & ~unknown
            right = (flagged & (targets == 1)).sum()
            if not bool(flagged.any()) or bool(right < self.pseudo_min_precision * flagged.sum()):
                pseudo = torch.where(pseudo == 1, torch.full_like(pseudo, -1), pseudo)
        return pseudo

    def training_loss(self, x: torch.Tensor, targets: torch.Tensor, *, epoch: int = 0, progress: float = 0.0):
        tokens, g = self.encode_image(x)
        r = self.regions(tokens)  # [B, C, D]
        text = self.text_protos()
        logits = self.match(r, text)
        protos = self.visual_protos.clone()  # a copy: the EMA update below is in place

        pseudo = torch.full_like(targets, -1)
        if epoch >= self.warmup_epochs:
            pseudo = self.pseudo_labels(r.detach(), protos, text.detach(), targets)
        y = torch.where(pseudo >= 0, pseudo, targets)  # known labels plus pseudo-labels
        w = torch.where(pseudo >= 0, self.pseudo_weight, 1.0).to(logits.dtype)

        if self.cls_loss == "asl":
            l_cls = partial_asl(logits, y, w, **self.asl)
        else:
            l_cls = masked_bce(logits, y, w)
        loss = self.cls_weight * l_cls
        parts = {"cls": l_cls.detach()}

        if self.kd != "none":
            if self.kd == "kl":
                teacher = self.clip_logit_scale * F.normalize(g, dim=-1) @ text.t()
                l_kd = distill_kl(logits, teacher, self.kd_temperature)
            else:
                pos = (y == 1).float()
                cos = (F.normalize(r, dim=-1) * text).sum(-1)
                l_kd = ((1 - cos) * pos).sum() / pos.sum().clamp(min=1.0)
            loss = loss + self.kd_weight * l_kd
            parts["kd"] = l_kd.detach()

        rows, labels = self.contrast_set(r, text, y == 1, (y == 0) if self.mcl_negatives else None)
        l_mcl = label_supcon_loss(rows, labels, temperature=self.mcl_tau, normalize=True,
                                  backend=self.backend, process_group=self.process_group)
        loss = loss + self.mcl_weight * l_mcl
        parts["mcl"] = l_mcl.detach()
        if isinstance(self.mcl_tau, torch.Tensor):
            parts["mcl_tau"] = self.mcl_tau.detach()

        if self.proto_weight:
            l_proto = prototype_nce_loss(r, protos, y, temperature=self.proto_temperature, backend=self.backend)
            loss = loss + self.proto_weight * l_proto
            parts["proto"] = l_proto.detach()

        self.update_prototypes_(r.detach(), targets)
        parts["pseudo"] = pseudo
        return loss, parts

    @torch.no_grad()
    def update_prototypes_(self, regions: torch.Tensor, targets: torch.Tensor) -> None:
        """EMA of the unit region features at the *known* positives (targets == 1); pseudo-labels never move it."""
        self.prototype_bank.update(F.normalize(regions.float(), dim=-1), (targets == 1).long())
