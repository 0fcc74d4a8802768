"""Datasets for the trainer: the built-in synthetic benchmark and folder loaders for Pascal VOC 2012
(+ SBD train_aug), Cityscapes (trainIds), ADE20K and CamVid.

    ds = build_dataset("synthetic", "train", train=True, seed=0)
    image, label = ds[0]   # float32 (3, H, W) normalised; int64 (H, W), 255 = ignore

Folder datasets check their layout when constructed and raise FileNotFoundError / ValueError naming
the missing path. Training augmentation (random scale, crop, flip) draws from a generator seeded by
(seed, epoch, index): call `ds.set_epoch(e)` each epoch.
"""

from __future__ import annotations

from .base import IGNORE_INDEX, DatasetInfo, SegDataset
from .folders import ADE20K, VOC, CamVid, Cityscapes
from .synthetic import SyntheticSegmentation

DATASETS = {
    "synthetic": SyntheticSegmentation,
    "voc": VOC,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "camvid": CamVid,
}

__all__ = ["DATASETS", "IGNORE_INDEX", "DatasetInfo", "SegDataset", "build_dataset", "dataset_info"]


def _check_name(name: str) -> type:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str) -> DatasetInfo:
    """Number of classes, class names, ignore index, mean/std and default crop; no disk access."""
    return _check_name(name).INFO


def build_dataset(name: str, split: str, *, root: str | None = None, train: bool = False,
                  crop_size: int | tuple[int, int] | None = None, scale_range=(0.5, 2.0),
                  flip: bool = True, seed: int = 0, **options) -> SegDataset:
    """Build dataset `name` for `split`. Folder datasets need `root`; the synthetic one takes
    `num_images`, `image_size` and the difficulty knobs of `synthetic.generate` as options."""
    cls = _check_name(name)
    common = dict(train=train, crop_size=crop_size, scale_range=scale_range, flip=flip, seed=seed)
    if name == "synthetic":
        if root is not None:
            raise ValueError("the synthetic dataset is generated in memory; do not pass root")
        return cls(split, **common, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the dataset folder)")
    return cls(root, split, **common, **options)
