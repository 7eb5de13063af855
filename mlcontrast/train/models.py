"""Model pieces: timm backbones, the Query2Label-style label-level decoder, the group-wise classifier.

Backbones are built with ``pretrained=False`` unless a local weights file is given (no hub access at run time).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Backbone", "PositionEmbeddingSine", "LabelDecoder", "GroupWiseLinear", "Projector", "masked_bce",
           "asymmetric_loss_terms"]


class Backbone(nn.Module):
    """A timm model returning one spatial feature map ``[B, channels, H, W]`` (``features_only``).

    Args:
        name: any timm model name that supports ``features_only`` (e.g. ``resnet10t``, ``resnet50``).
        feature_index: which stage of ``features_only`` to return (-1: the last, stride 32; 2 on a ResNet:
            stride 8, which keeps a 4×4 map on 32-px inputs).
        weights: optional local weights file (a timm/torchvision state dict of the full model); without it
            the backbone starts from random weights.
    """

    def __init__(self, name: str = "resnet10t", feature_index: int = -1, weights: str | None = None) -> None:
        super().__init__()
        import timm

        kwargs = dict(features_only=True, out_indices=(feature_index,))
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"backbone weights file not found: {weights}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        else:
            kwargs.update(pretrained=False)
        try:
            self.body = timm.create_model(name, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm backbone {name!r}") from e
            raise
        self.channels = self.body.feature_info.channels()[-1]
        self.reduction = self.body.feature_info.reduction()[-1]
        self.pool = 1
        self.eval_norms: list[nn.Module] = []  # BatchNorms held in eval mode by :meth:`configure`

    def stages(self) -> list[str]:
        """Names of the body's top-level children (``conv1``, ``bn1``, ..., ``layer4`` on a ResNet)."""
        return [name for name, _ in self.body.named_children()]

    def configure(self, train_layers: str = "all", bn_mode: str = "train", pool: int = 1) -> None:
        """Which parts train, how BatchNorm behaves, and an optional average pool after the map.

        Args:
            train_layers: ``"all"``, ``"none"`` or comma-separated top-level stage names (``"layer4"``,
                ``"layer2,layer3,layer4"``): the other stages get ``requires_grad=False``.
            bn_mode: ``"train"`` (BatchNorm of the trained stages in train mode, of the frozen ones in eval
                mode: HST's ``backbone.eval(); layer4.train()``), ``"frozen"`` (every BatchNorm in eval mode with
                its affine parameters frozen too: DETR's FrozenBatchNorm2d, as SADCL) — frozen stages never
                update their statistics.
            pool: kernel and stride of an average pool after the map (HST: 2, a 7×7 grid at 448 px).
        """
        stages = self.stages()
        if train_layers == "all":
            trained = set(stages)
        elif train_layers == "none":
            trained = set()
        else:
            trained = {s.strip() for s in train_layers.split(",") if s.strip()}
            unknown = trained - set(stages)
            if unknown:
                raise ValueError(f"--train-layers: unknown backbone stage(s) {sorted(unknown)}; this backbone has "
                                 f"{stages}")
        if bn_mode not in ("train", "frozen"):
            raise ValueError(f"bn_mode must be 'train' or 'frozen', got {bn_mode!r}")
        self.eval_norms = []
        for name, child in self.body.named_children():
            child.requires_grad_(name in trained)
            for m in child.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (bn_mode == "frozen" or name not in trained):
                    m.requires_grad_(False)
                    self.eval_norms.append(m)
        self.pool = pool
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for m in self.eval_norms:  # statistics stay as loaded, whatever the model's mode
            m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)[-1]
        return F.avg_pool2d(x, self.pool) if self.pool > 1 else x


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised 2-D sine encoding: ``dim/2`` features for y and ``dim/2`` for x."""

    def __init__(self, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the position-encoding width must be even, got {dim}")
        self.half, self.temperature = dim // 2, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        eps, scale = 1e-6, 2 * math.pi
        y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
        x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
        y_embed = y_embed / (h + eps) * scale
        x_embed = x_embed / (w + eps) * scale
        i = torch.arange(self.half, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.half)
        px, py = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=-1).flatten(2)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=-1).flatten(2)
        pos = torch.cat((py, px), dim=-1).permute(2, 0, 1)  # [dim, H, W]
        return pos.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)


class _PostNormLayer(nn.Module):
    """Attention then FFN, each followed by dropout, a residual and a LayerNorm (DETR's post-norm layer)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def _residuals(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))


class _EncoderLayer(_PostNormLayer):
    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        return self._residuals(x, self.attn(q, q, x, need_weights=False)[0])


class _DecoderLayer(_PostNormLayer):
    """Cross-attention then FFN, post-norm; no self-attention (Query2Label's ``rm_self_attn_dec``)."""

    def forward(self, tgt, query_pos, memory, pos):
        return self._residuals(tgt, self.attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0])


class LabelDecoder(nn.Module):
    """Query2Label-style SARL: ``[B, Cin, H, W]`` map → label-level features ``[B, C, d]``.

    1×1 input projection to ``d``, sine positions, ``enc_layers`` post-norm encoder layers, ``dec_layers``
    decoder layers without self-attention fed with tgt = 0 and C learnable queries as query positions,
    then a final LayerNorm.
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 128, heads: int = 4, enc_layers: int = 1,
                 dec_layers: int = 2, ffn_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        ffn_dim = ffn_dim or 4 * dim
        self.input_proj = nn.Identity() if in_channels == dim else nn.Conv2d(in_channels, dim, 1)
        self.pos = PositionEmbeddingSine(dim)
        self.encoder = nn.ModuleList(_EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(dec_layers))
        self.query_embed = nn.Embedding(num_classes, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(fmap)
        pos = self.pos(x).flatten(2).transpose(1, 2)  # [B, HW, d]
        x = x.flatten(2).transpose(1, 2)
        for layer in self.encoder:
            x = layer(x, pos)
        q = self.query_embed.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        tgt = torch.zeros_like(q)
        for layer in self.decoder:
            tgt = layer(tgt, q, x, pos)
        return self.norm(tgt)


class GroupWiseLinear(nn.Module):
    """One weight vector per class: ``logit[b, c] = <W_c, H[b, c]> + b_c`` (init U(±1/√d))."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_classes).uniform_(-bound, bound))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * self.weight).sum(-1) + self.bias


class Projector(nn.Module):
    """SADCL's shared projector: ``d → d → ReLU → d_p`` with biases, no norm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def asymmetric_loss_terms(logits: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 1.0, gamma_neg: float = 2.0,
                          clip: float = 0.05, eps: float = 1e-8, detach_focal: bool = False) -> torch.Tensor:
    """Per-entry asymmetric loss (ASL) on logits with targets 1 / 0 / -1 (ignored: its term is 0), in fp32.

    Positive: −(1 − p)^γ+ log p. Negative: with p_m = max(p − clip, 0), −p_m^γ− log(1 − p_m): easy negatives
    drop out. ``detach_focal`` keeps the focal weights out of the graph (DualCoOp's ASL); HST's keeps them in.
    """
    p = torch.sigmoid(logits.float())
    pos, neg = (targets == 1).float(), (targets == 0).float()
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    log_pos = torch.log(p.clamp(min=eps))
    log_neg = torch.log((1 - p_neg).clamp(min=eps))
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_focal):
        focal_pos, focal_neg = (1 - p).pow(gamma_pos), p_neg.pow(gamma_neg)
    return -(pos * log_pos * focal_pos + neg * log_neg * focal_neg)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE over the known entries (targets 0 or 1; -1 entries are ignored); 0 if none is known.

    ``weights`` (optional, ``[B, C]``) scales each entry's term; the mean still divides by the known count.
    """
    known = (targets >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits.float(), (targets > 0).float(), reduction="none")
    scale = known if weights is None else known * weights
    return (loss * scale).sum() / known.sum().clamp(min=1.0)
