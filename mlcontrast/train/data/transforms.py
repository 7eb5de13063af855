"""Training and test transforms of the file datasets (``--augment``).

- ``flip``: Resize(S, S) → horizontal flip (the digits-scale default);
- ``multiscale_crop``: SADCL's ``--crop`` pipeline: Resize(S + 64) → a multi-scale crop (side scales
  {1, .875, .75, .66, .5} of the shorter side, width and height scales at most 2 apart, the crop placed
  at one of 13 fixed grid offsets) → Resize(S, S) bilinear → flip;
- ``choice_crop``: HST's pipeline: Resize(512, 512) bicubic → a random crop whose side is drawn from
  {512, 448, 384, 320, 256} → Resize(S, S) bicubic → flip.

Test images are resized to S × S (bicubic for ``choice_crop``, as HST; bilinear otherwise). Written from the
settings of the released code, not from its source.
"""

from __future__ import annotations

import random
from typing import Callable

__all__ = ["AUGMENTS", "build_transform", "MultiScaleCrop"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("flip", "multiscale_crop", "choice_crop")


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


def build_transform(img_size: int = 224, train: bool = False, augment: str = "flip") -> Callable:
    """PIL image → normalised float tensor ``[3, S, S]`` with the ``augment`` pipeline when training."""
    from torchvision import transforms as T

    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose from {AUGMENTS}")
    bicubic = T.InterpolationMode.BICUBIC
    if not train:
        ops = [T.Resize((img_size, img_size), interpolation=bicubic) if augment == "choice_crop"
               else T.Resize((img_size, img_size))]
    elif augment == "flip":
        ops = [T.Resize((img_size, img_size)), T.RandomHorizontalFlip()]
    elif augment == "multiscale_crop":
        ops = [T.Resize((img_size + 64, img_size + 64)), MultiScaleCrop(img_size), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize((512, 512), interpolation=bicubic),
               T.RandomChoice([T.RandomCrop(s) for s in (512, 448, 384, 320, 256)]),
               T.Resize((img_size, img_size), interpolation=bicubic), T.RandomHorizontalFlip()]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
