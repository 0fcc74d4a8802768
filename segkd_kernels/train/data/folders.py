"""Folder loaders for the standard segmentation datasets, in their usual on-disk layouts.

Each loader checks its folders and list files when constructed and raises FileNotFoundError (missing
path, named) or ValueError (empty or malformed) before any training starts. Images are read with
Pillow; labels are returned as dataset class ids with 255 = ignore.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import IGNORE_INDEX, DatasetInfo, SegDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a declared dependency
        raise ImportError("reading dataset images needs Pillow: pip install pillow") from e
    return Image


def read_image(path: Path) -> Tensor:
    """RGB image -> float32 (3, H, W) in [0, 1]."""
    with _pil().open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def read_label(path: Path) -> np.ndarray:
    """Single-channel label PNG (palette indices or grey values) -> int64 (H, W) array."""
    with _pil().open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"label {path} has mode {im.mode}; expected a single-channel (palette "
                             "or greyscale) PNG of class ids")
        return np.asarray(im, dtype=np.int64).copy()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_list(path: Path) -> list[str]:
    _require(path, "image list")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"image list {path} is empty")
    return ids


class FolderDataset(SegDataset):
    """Pairs of (image path, label path); subclasses fill `self.pairs` and map raw label values."""

    INFO: DatasetInfo

    def __init__(self, root, split: str, *, train: bool = False, crop_size=None,
                 scale_range=(0.5, 2.0), flip: bool = True, seed: int = 0):
        super().__init__(self.INFO, split, train=train, crop_size=crop_size,
                         scale_range=scale_range, flip=flip, seed=seed)
        self.root = _require(Path(os.fspath(root)).expanduser(), f"{self.INFO.name} root folder")
        self.pairs: list[tuple[Path, Path]] = self._find(split)
        if not self.pairs:
            raise ValueError(f"no {split} images found for {self.INFO.name} under {self.root}")

    @abc.abstractmethod
    def _find(self, split: str) -> list[tuple[Path, Path]]:
        """(image, label) file pairs of `split`; each folder format implements its layout."""

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        img_path, lab_path = self.pairs[index]
        image = read_image(img_path)
        label = torch.from_numpy(self.map_label(read_label(lab_path)))
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"label {lab_path} is {tuple(label.shape)} but image {img_path} is "
                             f"{tuple(image.shape[1:])}")
        return image, label


def _lut(mapping: dict[int, int], size: int = 256, default: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.full(size, default, dtype=np.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def _apply_lut(lut: np.ndarray, raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, IGNORE_INDEX, dtype=np.int64)
    ok = (raw >= 0) & (raw < len(lut))
    out[ok] = lut[raw[ok]]
    return out


# ---------------------------------------------------------------------------------------- VOC 2012
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


class VOC(FolderDataset):
    """Pascal VOC 2012: `root` is VOC2012 (or a folder holding VOC2012 / VOCdevkit/VOC2012).

    train / val: ImageSets/Segmentation/{split}.txt with SegmentationClass/<id>.png (palette PNG,
    255 = boundary/ignore). train_aug (SBD-augmented 10,582 images): the list
    ImageSets/Segmentation/train_aug.txt (or <root>/train_aug.txt) with SegmentationClassAug/<id>.png.
    """

    INFO = DatasetInfo(name="voc", num_classes=21, class_names=VOC_CLASSES, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, crop_size=(512, 512), splits=("train", "val", "train_aug"))

    def _find(self, split):
        root = self.root
        for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (cand / "JPEGImages").is_dir():
                root = cand
                break
        self.root = root
        images = _require(root / "JPEGImages", "VOC JPEGImages folder")
        sets = root / "ImageSets" / "Segmentation"
        if split == "train_aug":
            lst = sets / "train_aug.txt"
            if not lst.exists() and (root / "train_aug.txt").exists():
                lst = root / "train_aug.txt"
            if not lst.exists():
                raise FileNotFoundError(f"VOC train_aug list not found: {lst} (needs the SBD "
                                        "augmented set: train_aug.txt + SegmentationClassAug/)")
            labels = _require(root / "SegmentationClassAug", "VOC SegmentationClassAug folder")
        else:
            lst = sets / f"{split}.txt"
            labels = _require(root / "SegmentationClass", "VOC SegmentationClass folder")
        pairs = []
        for name in _read_list(lst):
            name = Path(name).stem  # train_aug lists sometimes carry paths
            pairs.append((images / f"{name}.jpg", labels / f"{name}.png"))
        missing = [p for pair in pairs for p in pair if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed in {lst} are missing, e.g. "
                                    f"{missing[0]}")
        return pairs

    def map_label(self, raw):
        # palette indices 0..20 are classes, 255 the boundary; anything else is not a VOC label
        return np.where(raw <= 20, raw, IGNORE_INDEX)


# -------------------------------------------------------------------------------------- Cityscapes
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle"]
# labelIds of the 19 evaluated classes, in trainId order (cityscapesScripts' labels.py)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
_CITYSCAPES_LUT = _lut({lid: tid for tid, lid in enumerate(CITYSCAPES_LABEL_IDS)})


class Cityscapes(FolderDataset):
    """Cityscapes fine annotations: leftImg8bit/{split}/<city>/*_leftImg8bit.png with
    gtFine/{split}/<city>/*_gtFine_labelTrainIds.png when present, else *_gtFine_labelIds.png mapped
    to the 19 trainIds (everything else -> 255)."""

    INFO = DatasetInfo(name="cityscapes", num_classes=19, class_names=CITYSCAPES_CLASSES,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_size=(512, 1024),
                       splits=("train", "val", "test"))

    def _find(self, split):
        img_dir = _require(self.root / "leftImg8bit" / split, "Cityscapes image folder")
        gt_dir = _require(self.root / "gtFine" / split, "Cityscapes gtFine folder")
        pairs, kinds = [], set()
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            city = img.parent.name
            train_ids = gt_dir / city / f"{stem}_gtFine_labelTrainIds.png"
            label_ids = gt_dir / city / f"{stem}_gtFine_labelIds.png"
            if train_ids.exists():
                pairs.append((img, train_ids))
                kinds.add("trainIds")
            elif label_ids.exists():
                pairs.append((img, label_ids))
                kinds.add("labelIds")
            else:
                raise FileNotFoundError(f"Cityscapes label not found for {img}: {label_ids}")
        self._per_pair_kind = [p[1].name.endswith("_labelTrainIds.png") for p in pairs]
        return pairs

    def load(self, index):
        img_path, lab_path = self.pairs[index]
        image = read_image(img_path)
        raw = read_label(lab_path)
        if self._per_pair_kind[index]:
            label = np.where(raw < 19, raw, IGNORE_INDEX)
        else:
            label = _apply_lut(_CITYSCAPES_LUT, raw)
        return image, torch.from_numpy(label)


# ------------------------------------------------------------------------------------------ ADE20K
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag"]
assert len(ADE20K_CLASSES) == 150


class ADE20K(FolderDataset):
    """ADE20K scene parsing (ADEChallengeData2016): images/{training,validation}/*.jpg and
    annotations/{training,validation}/*.png; label 0 ("other") -> 255, classes 1..150 -> 0..149.
    `root` is ADEChallengeData2016 or its parent."""

    INFO = DatasetInfo(name="ade20k", num_classes=150, class_names=ADE20K_CLASSES,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_size=(512, 512),
                       splits=("train", "val"))
    _FOLDER = {"train": "training", "val": "validation"}

    def _find(self, split):
        if (self.root / "ADEChallengeData2016").is_dir():
            self.root = self.root / "ADEChallengeData2016"
        sub = self._FOLDER[split]
        img_dir = _require(self.root / "images" / sub, "ADE20K image folder")
        ann_dir = _require(self.root / "annotations" / sub, "ADE20K annotation folder")
        pairs = []
        for img in sorted(img_dir.glob("*.jpg")):
            lab = ann_dir / f"{img.stem}.png"
            if not lab.exists():
                raise FileNotFoundError(f"ADE20K annotation not found for {img}: {lab}")
            pairs.append((img, lab))
        return pairs

    def map_label(self, raw):
        return np.where((raw >= 1) & (raw <= 150), raw - 1, IGNORE_INDEX)


# ------------------------------------------------------------------------------------------ CamVid
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence",
                  "car", "pedestrian", "bicyclist"]


class CamVid(FolderDataset):
    """CamVid in the SegNet layout: {train,val,test}/*.png images with {split}annot/*.png labels of
    11 classes; 11 ("unlabelled") and above -> 255."""

    INFO = DatasetInfo(name="camvid", num_classes=11, class_names=CAMVID_CLASSES,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_size=(360, 480),
                       splits=("train", "val", "test"))

    def _find(self, split):
        img_dir = _require(self.root / split, "CamVid image folder")
        ann_dir = _require(self.root / f"{split}annot", "CamVid annotation folder")
        pairs = []
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".png", ".jpg")):
            lab = ann_dir / f"{img.stem}.png"
            if not lab.exists():
                raise FileNotFoundError(f"CamVid annotation not found for {img}: {lab}")
            pairs.append((img, lab))
        return pairs

    def map_label(self, raw):
        return np.where((raw >= 0) & (raw < 11), raw, IGNORE_INDEX)
