"""TRM-ML's image encoders (the method: :mod:`mlcontrast.train.methods.trmml`): each maps images to dense
tokens ``[B, N, D]`` and a global embedding ``[B, D]``.

- :class:`ClipImageTower`: a frozen open_clip image encoder (ResNet: DualCoOp's dense features through the
  attention pool's v_proj and c_proj; ViT: the patch tokens through ln_post and proj), inputs re-normalised
  from the loader's mean/std to CLIP's; :func:`load_clip` reads the model from a local checkpoint;
- :class:`TimmTower`: the stand-in without CLIP, a trained timm map projected to D per location.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlcontrast.train.models import Backbone

__all__ = ["INPUT_NORMS", "ClipImageTower", "TimmTower", "load_clip"]

INPUT_NORMS = {  # (mean, std) of the data loaders' normalisations, and CLIP's own
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


class TimmTower(nn.Module):
    """The stand-in image encoder without CLIP: a trained timm map, each location projected to ``dim``."""

    def __init__(self, backbone: str, feature_index: int, weights: str | None, dim: int) -> None:
        super().__init__()
        self.backbone = Backbone(backbone, feature_index, weights)
        self.proj = nn.Linear(self.backbone.channels, dim)

    def forward(self, x: torch.Tensor):
        tokens = self.proj(self.backbone(x).flatten(2).transpose(1, 2))  # [B, HW, D]
        return tokens, tokens.mean(1)


def _resize_grid_pos(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1 + h·w, W]`` positional embedding (class slot first, square h = w) → the slot plus ``grid``."""
    n = pos.shape[0] - 1
    side = int(round(math.sqrt(n)))
    if (side, side) == tuple(grid):
        return pos
    if side * side != n:
        raise ValueError(f"cannot resize a non-square positional grid of {n} cells")
    spatial = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    spatial = F.interpolate(spatial, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], spatial.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)])


class ClipImageTower(nn.Module):
    """Frozen open_clip image encoder → dense tokens ``[B, HW, D]`` and the global embedding ``[B, D]``."""

    def __init__(self, visual: nn.Module, input_norm: str) -> None:
        super().__init__()
        self.visual = visual
        self.visual.requires_grad_(False)
        self.resnet = hasattr(visual, "attnpool")
        if not self.resnet:
            for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"):
                if not hasattr(visual, name):
                    raise ValueError(f"unsupported open_clip image tower {type(visual).__name__}: no {name}")
            if getattr(visual, "attn_pool", None) is not None or getattr(visual, "proj", None) is None:
                raise ValueError("unsupported open_clip ViT: attentional pooling or no output projection")
        elif visual.attnpool is None:
            raise ValueError("unsupported open_clip ResNet without its attention pool")
        (m_in, s_in), (m_clip, s_clip) = INPUT_NORMS[input_norm], INPUT_NORMS["clip"]
        scale = torch.tensor(s_in) / torch.tensor(s_clip)
        shift = (torch.tensor(m_in) - torch.tensor(m_clip)) / torch.tensor(s_clip)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True):  # frozen: BatchNorm statistics and dropout stay in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        x = x * self.scale + self.shift  # the loader's normalisation → CLIP's
        return self._resnet(x) if self.resnet else self._vit(x)

    def _resnet(self, x: torch.Tensor):
        v = self.visual
        x = x.to(v.conv1.weight.dtype)
        fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [B, Cin, h, w]
        pool = v.attnpool
        seq = fmap.flatten(2).transpose(1, 2)  # [B, hw, Cin]
        tokens = pool.c_proj(pool.v_proj(seq))  # DualCoOp's dense features
        pos = _resize_grid_pos(pool.positional_embedding, fmap.shape[-2:])
        seq = torch.cat([seq.mean(1, keepdim=True), seq], 1) + pos.unsqueeze(0).to(seq.dtype)
        seq = seq.transpose(0, 1)  # [1 + hw, B, Cin]
        g, _ = F.multi_head_attention_forward(
            query=seq[:1], key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return tokens.float(), g[0].float()

    def _vit(self, x: torch.Tensor):
        v = self.visual
        x = v.conv1(x.to(v.conv1.weight.dtype))  # [B, W, gh, gw]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + _resize_grid_pos(v.positional_embedding, grid).unsqueeze(0).to(x.dtype)
        x = v.transformer(v.ln_pre(x))
        pooled, _ = v._pool(x)  # CLIP's own pooling and final norm (class token or mean)
        tokens = v.ln_post(x[:, 1:]) @ v.proj
        return tokens.float(), (pooled @ v.proj).float()


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("TRM-ML's CLIP encoders need open_clip: pip install open_clip_torch") from e
    return open_clip


def load_clip(model_name: str, checkpoint: str):
    """``(model, tokenizer)`` of open_clip from a local checkpoint file; ``model_name`` is a built-in
    open_clip architecture (``RN101``, ``ViT-B-16`` …) or a local JSON model config (a file ending .json)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--trmml-clip-checkpoint: file not found: {checkpoint}")
    open_clip = _open_clip()
    name = model_name
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"--trmml-clip-model: config file not found: {name}")
        open_clip.add_model_config(Path(name))
        name = Path(name).stem
    elif name not in open_clip.list_models():
        raise ValueError(f"--trmml-clip-model: unknown open_clip architecture {name!r}")
    model = open_clip.create_model(name, pretrained=str(checkpoint), device="cpu")
    return model.float().eval(), open_clip.get_tokenizer(name)
