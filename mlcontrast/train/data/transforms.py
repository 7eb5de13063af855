"""Training and test transforms of the file datasets (``--augment``).

- ``flip``: Resize(S, S) → horizontal flip (the digits-scale default);
- ``multiscale_crop``: SADCL's ``--crop`` pipeline: Resize(S + 64) → a multi-scale crop (side scales
  {1, .875, .75, .66, .5} of the shorter side, width and height scales at most 2 apart, the crop placed
  at one of 13 fixed grid offsets) → Resize(S, S) bilinear → flip;
- ``choice_crop``: HST's pipeline: Resize(512, 512) bicubic → a random crop whose side is drawn from
  {512, 448, 384, 320, 256} → Resize(S, S) bicubic → flip;
- ``autoaugment_crop``: the pipeline of the author's DualCoOp (``yu-gi-oh-leilei/DualCoop``@018e7c5,
  ``dataset/transforms/transforms.py:220-257``, ``config/dualcoop/*_SGD.yaml``: INPUT.TRANSFORMS), the TRM-ML
  guess: either RandomResizedCrop(S, scale 0.5–1) bicubic or Resize(S, S) + :class:`Cutout` (0.4) → an
  AutoAugment policy → flip. Its ``MLC_Policy`` draws one of the ImageNet and CIFAR-10 AutoAugment
  sub-policies (``autoaugment.py:10-75``); here torchvision's AutoAugment draws one of the two policies, then
  a sub-policy (grey fill 128, as there). torchvision's magnitude table is not DualCoOp's own.

Test images are resized to S × S (bicubic for ``choice_crop`` and ``autoaugment_crop``, as HST and DualCoOp;
bilinear otherwise). Written from the settings of the released code, not from its source.
"""

from __future__ import annotations

import random
from typing import Callable

__all__ = ["AUGMENTS", "build_transform", "MultiScaleCrop", "Cutout"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("flip", "multiscale_crop", "choice_crop", "autoaugment_crop")


class MultiScaleCrop:
    """Crop a PIL image at one of a few scales and fixed grid positions, then resize to ``size`` × ``size``.

    Args:
        size: output side.
        scales: crop side as fractions of the image's shorter side.
        max_distort: the width and height scale indices differ by at most this much.
        interpolation: a PIL resampling filter for the final resize.
    """

    def __init__(self, size: int, scales=(1.0, 0.875, 0.75, 0.66, 0.5), max_distort: int = 2,
                 interpolation=None) -> None:
        from PIL import Image

        self.size, self.scales, self.max_distort = size, tuple(scales), max_distort
        self.interpolation = Image.BILINEAR if interpolation is None else interpolation

    def _crop_size(self, w: int, h: int) -> tuple[int, int]:
        sides = [int(min(w, h) * s) for s in self.scales]
        sides = [self.size if abs(s - self.size) < 3 else s for s in sides]  # snap near-output sides
        pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides)
                 if abs(i - j) <= self.max_distort]
        return random.choice(pairs)

    @staticmethod
    def _offsets(w: int, h: int, cw: int, ch: int) -> list[tuple[int, int]]:
        """The 13 grid positions: corners, centre, edge midpoints and the four quarter points."""
        sx, sy = (w - cw) // 4, (h - ch) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                (1, 1), (3, 1), (1, 3), (3, 3)]
        return [(gx * sx, gy * sy) for gx, gy in grid]

    def __call__(self, img):
        w, h = img.size
        cw, ch = self._crop_size(w, h)
        x, y = random.choice(self._offsets(w, h, cw, ch))
        return img.crop((x, y, x + cw, y + ch)).resize((self.size, self.size), self.interpolation)


class Cutout:
    """Paint one rectangle of a random colour over a PIL image: its sides are ``fraction`` of the image's,
    its centre a uniform random pixel, clipped at the borders (DualCoOp's CutoutPIL, 0.4 of each side).

    Args:
        fraction: rectangle side as a fraction of the image side, in [0, 1].
    """

    def __init__(self, fraction: float = 0.4) -> None:
        self.fraction = fraction

    def __call__(self, img):
        from PIL import ImageDraw

        img = img.copy()
        w, h = img.size
        cw, ch = int(self.fraction * w + 0.5), int(self.fraction * h + 0.5)
        cx, cy = random.randrange(w), random.randrange(h)
        box = [max(cx - cw // 2, 0), max(cy - ch // 2, 0), min(cx + cw // 2, w), min(cy + ch // 2, h)]
        ImageDraw.Draw(img).rectangle(box, fill=tuple(random.randrange(256) for _ in range(3)))
        return img


def _autoaugment_crop(img_size: int, T) -> list:
    """DualCoOp's training pipeline before ToTensor (see the module docstring)."""
    bicubic, grey = T.InterpolationMode.BICUBIC, [128, 128, 128]
    crop = T.RandomChoice([T.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=bicubic),
                           T.Compose([T.Resize((img_size, img_size)), Cutout(0.4)])])
    policies = T.RandomChoice([T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, fill=grey),
                               T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=grey)])
    return [crop, policies, T.RandomHorizontalFlip()]


def build_transform(img_size: int = 224, train: bool = False, augment: str = "flip") -> Callable:
    """PIL image → normalised float tensor ``[3, S, S]`` with the ``augment`` pipeline when training."""
    from torchvision import transforms as T

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {AUGMENTS}")
    bicubic = T.InterpolationMode.BICUBIC
    if not train:
        ops = [T.Resize((img_size, img_size), interpolation=bicubic) if augment in ("choice_crop", "autoaugment_crop")
               else T.Resize((img_size, img_size))]
    elif augment == "flip":
        ops = [T.Resize((img_size, img_size)), T.RandomHorizontalFlip()]
    elif augment == "multiscale_crop":
        ops = [T.Resize((img_size + 64, img_size + 64)), MultiScaleCrop(img_size), T.RandomHorizontalFlip()]
    elif augment == "autoaugment_crop":
        ops = _autoaugment_crop(img_size, T)
    else:
        ops = [T.Resize((512, 512), interpolation=bicubic),
               T.RandomChoice([T.RandomCrop(s) for s in (512, 448, 384, 320, 256)]),
               T.Resize((img_size, img_size), interpolation=bicubic), T.RandomHorizontalFlip()]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
