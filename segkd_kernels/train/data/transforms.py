"""Training augmentation on tensors: random scale, pad, random crop, horizontal flip.

All randomness comes from a `torch.Generator` the caller seeds (per dataset seed, epoch and item), so
every process and every resumed run draws the same augmentation for the same item. Images are
resized bilinearly, labels with nearest neighbour (never mixing class ids); padding uses the mean
colour for the image (0 after normalisation) and the ignore index for the label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def resize(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear image (C, H, W) float, nearest label (H, W) int."""
    if tuple(image.shape[1:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    # nearest-exact samples at pixel centres, the same grid as bilinear with align_corners=False;
    # plain "nearest" floors and shifts the label up to one source pixel against the image
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(
        label.dtype)
    return image, label


def pad_to(image: Tensor, label: Tensor, size: tuple[int, int], fill: Tensor,
           ignore_index: int) -> tuple[Tensor, Tensor]:
    """Pad bottom/right up to `size` with `fill` (C,) for the image and `ignore_index` for the label."""
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, label
    out = fill.to(image.dtype).view(-1, 1, 1).expand(image.shape[0], h + ph, w + pw).clone()
    out[:, :h, :w] = image
    lab = torch.full((h + ph, w + pw), ignore_index, dtype=label.dtype)
    lab[:h, :w] = label
    return out, lab


def random_scale_crop_flip(image: Tensor, label: Tensor, *, generator: torch.Generator,
                           crop_size: tuple[int, int] | None, scale_range=(0.5, 2.0),
                           flip: bool = True, fill: Tensor | None = None,
                           ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """image (C, H, W) float in [0, 1], label (H, W) int64 -> augmented pair (crop_size if given)."""
    g = generator
    h, w = label.shape
    if scale_range is not None and tuple(scale_range) != (1.0, 1.0):
        s = _uniform(g, float(scale_range[0]), float(scale_range[1]))
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        image, label = resize(image, label, size)
    if crop_size is not None:
        ch, cw = crop_size
        if fill is None:
            fill = torch.zeros(image.shape[0])
        image, label = pad_to(image, label, (ch, cw), fill, ignore_index)
        h, w = label.shape
        top = int(torch.randint(0, h - ch + 1, (), generator=g))
        left = int(torch.randint(0, w - cw + 1, (), generator=g))
        image = image[:, top:top + ch, left:left + cw]
        label = label[top:top + ch, left:left + cw]
    if flip and torch.rand((), generator=g).item() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()
