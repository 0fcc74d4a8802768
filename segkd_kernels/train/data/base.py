"""The dataset base class: loading is the subclass's job; augmentation and normalisation live here."""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .transforms import random_scale_crop_flip

IGNORE_INDEX = 255


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: tuple[int, int]  # default training crop (H, W)
    splits: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    extra: dict = field(default_factory=dict)


def _crop_tuple(crop_size) -> tuple[int, int] | None:
    if crop_size is None:
        return None
    if isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    crop_size = tuple(int(c) for c in crop_size)
    if len(crop_size) != 2 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be a positive int or (H, W), got {crop_size!r}")
    return crop_size


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical on every platform and process (unlike
    hash(), which is salted per process for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SegDataset(torch.utils.data.Dataset, abc.ABC):
    """Returns (image float32 (3, H, W) normalised with the dataset mean/std, label int64 (H, W)),
    255 = ignore.

    With `train=True` each item is randomly scaled, padded, cropped and flipped; the randomness is a
    function of (seed, epoch, index) only, so DDP ranks, data-loader workers and resumed runs see the
    same augmentation. Call `set_epoch(e)` at the start of each epoch (as for DistributedSampler)."""

    ignore_index: int = IGNORE_INDEX

    def __init__(self, info: DatasetInfo, split: str, *, train: bool = False, crop_size=None,
                 scale_range=(0.5, 2.0), flip: bool = True, seed: int = 0):
        if split not in info.splits:
            raise ValueError(f"dataset {info.name!r} has no split {split!r}; choose one of "
                             f"{', '.join(info.splits)}")
        if scale_range is not None:
            lo, hi = (float(s) for s in scale_range)
            if not 0 < lo <= hi:
                raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}")
            scale_range = (lo, hi)
        self.info = info
        self.split = split
        self.num_classes = info.num_classes
        self.class_names = list(info.class_names)
        self.ignore_index = info.ignore_index
        self.train = train
        self.crop_size = _crop_tuple(crop_size if crop_size is not None or not train
                                     else info.crop_size)
        self.scale_range = scale_range
        self.flip = flip
        self.seed = int(seed)
        self.epoch = 0
        self._mean = torch.tensor(info.mean, dtype=torch.float32)
        self._std = torch.tensor(info.std, dtype=torch.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @abc.abstractmethod
    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """image float32 (3, H, W) in [0, 1], label int64 (H, W) in dataset class ids / 255.
        Each dataset (synthetic, folder formats) implements it."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, label = self.load(index)
        if self.train:
            g = torch.Generator().manual_seed(stable_seed("aug", self.seed, self.epoch, index))
            image, label = random_scale_crop_flip(
                image, label, generator=g, crop_size=self.crop_size, scale_range=self.scale_range,
                flip=self.flip, fill=self._mean, ignore_index=self.ignore_index)
        image = (image - self._mean.view(-1, 1, 1)) / self._std.view(-1, 1, 1)
        return image.float().contiguous(), label.long().contiguous()
