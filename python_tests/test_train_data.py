"""Trainer datasets: the synthetic benchmark is a pure function of (seed, split, index); the
augmentation keeps image and label aligned and pads with ignore; the folder loaders read tiny fake
VOC / Cityscapes / ADE20K / CamVid trees, map labels to train ids and fail clearly on bad folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segkd_kernels.train.data import DATASETS, build_dataset, dataset_info
from segkd_kernels.train.data.synthetic import generate
from segkd_kernels.train.data.transforms import random_scale_crop_flip

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# tiny models and tensors: see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ synthetic

def test_synthetic_items_are_a_function_of_seed_split_index():
    a = build_dataset("synthetic", "train", seed=3, num_images=10)
    b = build_dataset("synthetic", "train", seed=3, num_images=10)
    for i in (0, 7):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])
    other_seed = build_dataset("synthetic", "train", seed=4, num_images=10)
    assert not torch.equal(a[0][0], other_seed[0][0])
    val = build_dataset("synthetic", "val", seed=3, num_images=10)
    assert not torch.equal(a[0][0], val[0][0])


def test_synthetic_item_format_and_classes():
    ds = build_dataset("synthetic", "val", num_images=40, image_size=48)
    info = dataset_info("synthetic")
    assert ds.num_classes == info.num_classes == len(ds.class_names) == 8 and ds.ignore_index == 255
    seen = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 48, 48)
        assert y.dtype == torch.int64 and y.shape == (48, 48)
        assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes  # no ignore pixels unaugmented
        seen |= set(y.unique().tolist())
    assert seen == set(range(ds.num_classes))  # every class occurs within 40 images
    # normalised: the raw image is in [0, 1]
    raw, _ = generate(0, "val", 0, image_size=48)
    assert torch.allclose(ds[0][0], (raw - 0.5) / 0.25)


def test_synthetic_context_changes_the_class():
    """The labelling rule: disk+stripes and triangles take their class from the ground region."""
    from segkd_kernels.train.data.synthetic import CHECKER, DISK, SQUARE, STRIPES, TRIANGLE, object_class
    assert object_class(DISK, STRIPES, False) != object_class(DISK, STRIPES, True)
    assert object_class(TRIANGLE, CHECKER, False) != object_class(TRIANGLE, CHECKER, True)
    assert object_class(DISK, STRIPES, False) != object_class(DISK, CHECKER, False)
    assert object_class(SQUARE, STRIPES, True) == object_class(SQUARE, STRIPES, False)


def test_synthetic_ground_grain_is_visible_on_every_image():
    """The context cue must be readable on every image: the grain is a luminance step of grain_contrast
    (not a mix of two random colours, which vanished when they were close). Bare ground, no noise: some
    pair of neighbouring pixels differs by the step times the illumination and contrast jitter, which
    is at least (1 - 0.2 * sqrt(2)) * 0.8 = 0.57 of it (the clip to [0, 1] can cut one side of the step
    on the brightest grounds, hence the bound of a half)."""
    import inspect

    contrast = inspect.signature(generate).parameters["grain_contrast"].default
    for i in range(30):
        im, lab = generate(0, "val", i, image_size=48, noise=0.0, num_objects=(0, 0), num_distractors=(0, 0),
                           num_fragments=(0, 0))
        assert int(lab.max()) == 0
        step = max(float(im.diff(dim=1).abs().max()), float(im.diff(dim=2).abs().max()))
        assert step >= 0.5 * contrast, (i, step)


def test_synthetic_training_augmentation_is_seeded_by_epoch():
    ds = build_dataset("synthetic", "train", train=True, crop_size=40, num_images=4, seed=1)
    x0, y0 = ds[2]
    assert x0.shape == (3, 40, 40) and y0.shape == (40, 40)
    again = build_dataset("synthetic", "train", train=True, crop_size=40, num_images=4, seed=1)
    assert torch.equal(again[2][0], x0) and torch.equal(again[2][1], y0)
    ds.set_epoch(1)
    x1, _ = ds[2]
    assert not torch.equal(x0, x1)
    ds.set_epoch(0)
    assert torch.equal(ds[2][0], x0)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="synthetic, voc, cityscapes, ade20k, camvid"):
        build_dataset("coco", "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        build_dataset("synthetic", "test")
    with pytest.raises(ValueError, match="unknown synthetic dataset options"):
        build_dataset("synthetic", "train", colour=True)
    with pytest.raises(ValueError, match="root"):
        build_dataset("voc", "train")
    with pytest.raises(ValueError, match="crop_size"):
        build_dataset("synthetic", "train", train=True, crop_size=(0, 3))
    with pytest.raises(ValueError, match="scale_range"):
        build_dataset("synthetic", "train", train=True, scale_range=(2.0, 1.0))


def test_dataset_info_needs_no_disk():
    assert [dataset_info(n).num_classes for n in DATASETS] == [8, 21, 19, 150, 11]
    for name in DATASETS:
        info = dataset_info(name)
        assert len(info.class_names) == info.num_classes and info.ignore_index == 255


# ---------------------------------------------------------------------------- augmentation

def _coded_pair(h=37, w=53, seed=0):
    """Label of 8x8-pixel blocks of random classes; the image encodes the class in channel 0
    and the column in channel 1, so alignment and flips can be checked after augmentation."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 6, ((h + 7) // 8, (w + 7) // 8), generator=g)
    label = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].contiguous()
    image = torch.stack([label.float() / 10, torch.arange(w).float().expand(h, w) / w,
                         torch.full((h, w), 0.5)])
    return image, label


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_image_and_label_aligned(seed):
    image, label = _coded_pair(seed=seed)
    fill = torch.tensor([0.9, 0.8, 0.7])
    g = torch.Generator().manual_seed(seed)
    x, y = random_scale_crop_flip(image, label, generator=g, crop_size=(45, 31),
                                  scale_range=(0.5, 2.0), fill=fill, ignore_index=255)
    assert x.shape == (3, 45, 31) and y.shape == (45, 31) and y.dtype == label.dtype
    valid = y != 255
    # nearest-neighbour labels: only original class ids survive, never blends
    assert set(y[valid].unique().tolist()) <= set(label.unique().tolist())
    # inside a class region (all 8 neighbours share the label) the bilinear image carries exactly
    # that class: image and label went through the same scale, crop and flip
    decoded = (x[0] * 10).round().long()
    pad = torch.nn.functional.pad(y[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
    neigh = pad.unfold(0, 3, 1).unfold(1, 3, 1).reshape(*y.shape, 9)
    interior = valid & (neigh == y[..., None].float()).all(-1)
    assert interior.sum() > 100
    assert (decoded == y)[interior].float().mean().item() > 0.98
    # negative control: against the mirrored label the same check fails
    assert (decoded == y.flip(-1))[interior].float().mean().item() < 0.8
    # padding: ignore in the label, the fill colour in the image
    assert torch.allclose(x[:, ~valid], fill[:, None].expand(3, int((~valid).sum())))


def test_flip_moves_image_and_label_together():
    image, label = _coded_pair()
    flipped = 0
    for seed in range(8):
        x, y = random_scale_crop_flip(image, label, generator=torch.Generator().manual_seed(seed),
                                      crop_size=None, scale_range=None)
        if torch.equal(y, label):
            assert torch.equal(x, image)
        else:
            assert torch.equal(y, label.flip(-1)) and torch.equal(x, image.flip(-1))
            flipped += 1
    assert 0 < flipped < 8


def test_crop_without_scale_is_an_exact_window():
    image, label = _coded_pair(h=30, w=30)
    x, y = random_scale_crop_flip(image, label, generator=torch.Generator().manual_seed(5),
                                  crop_size=(17, 11), scale_range=None, flip=False)
    for top in range(30 - 17 + 1):
        for left in range(30 - 11 + 1):
            if torch.equal(y, label[top:top + 17, left:left + 11]) and torch.equal(
                    x, image[:, top:top + 17, left:left + 11]):
                return
    pytest.fail("the crop is not a window of the input")


# ---------------------------------------------------------------------------- fake folders

def _save_image(path, h=20, w=28, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _save_label(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def _label(values, h=20, w=28):
    arr = np.zeros((h, w), dtype=np.int64)
    for j, v in enumerate(values):
        arr[:, j * 2:(j + 1) * 2] = v
    return arr


def _load_all(ds):
    return [ds[i] for i in range(len(ds))]


def test_voc_folder(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    raw = _label([0, 1, 20, 255, 15, 21])  # 21 is not a VOC label -> ignore
    for name in ("a", "b", "c"):
        _save_image(root / "JPEGImages" / f"{name}.jpg")
        _save_label(root / "SegmentationClass" / f"{name}.png", raw, palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    ds = build_dataset("voc", "train", root=str(tmp_path))  # finds VOCdevkit/VOC2012
    assert len(ds) == 2 and ds.num_classes == 21
    x, y = ds[0]
    assert x.shape == (3, 20, 28) and y.dtype == torch.int64
    assert y[0, :12].tolist() == [0, 0, 1, 1, 20, 20, 255, 255, 15, 15, 255, 255]
    assert len(build_dataset("voc", "val", root=str(root))) == 1
    with pytest.raises(FileNotFoundError, match="train_aug"):
        build_dataset("voc", "train_aug", root=str(root))
    # SBD augmented set: greyscale class-id PNGs in SegmentationClassAug
    _save_label(root / "SegmentationClassAug" / "a.png", _label([3, 4]))
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("a\n")
    aug = build_dataset("voc", "train_aug", root=str(root), train=True, crop_size=16)
    xa, ya = aug[0]
    assert xa.shape == (3, 16, 16) and set(ya.unique().tolist()) <= {0, 3, 4, 255}
    # a listed image that is missing is named at construction
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nzzz\n")
    with pytest.raises(FileNotFoundError, match="zzz"):
        build_dataset("voc", "val", root=str(root))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        build_dataset("voc", "val", root=str(root))


def test_cityscapes_folder_label_ids_and_train_ids(tmp_path):
    # labelIds: 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 0 unlabeled / 4 static -> 255
    raw = _label([7, 26, 33, 0, 4, 8])
    _save_image(tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    _save_label(tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", raw)
    ds = build_dataset("cityscapes", "val", root=str(tmp_path))
    _, y = ds[0]
    assert y[0, ::2][:6].tolist() == [0, 13, 18, 255, 255, 1]
    # a *_labelTrainIds.png next to it wins (already train ids; 255 stays ignore)
    _save_label(tmp_path / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelTrainIds.png",
                _label([5, 255, 18]))
    _, y = build_dataset("cityscapes", "val", root=str(tmp_path))[0]
    assert y[0, ::2][:3].tolist() == [5, 255, 18]
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        build_dataset("cityscapes", "train", root=str(tmp_path))


def test_ade20k_folder(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _save_image(root / "images" / "training" / "ADE_train_00000001.jpg")
    _save_label(root / "annotations" / "training" / "ADE_train_00000001.png", _label([0, 1, 150, 37]))
    ds = build_dataset("ade20k", "train", root=str(tmp_path))
    assert ds.num_classes == 150
    _, y = ds[0]
    assert y[0, ::2][:4].tolist() == [255, 0, 149, 36]
    with pytest.raises(FileNotFoundError, match="validation"):
        build_dataset("ade20k", "val", root=str(tmp_path))


def test_camvid_folder(tmp_path):
    _save_image(tmp_path / "train" / "0001TP_006690.png")
    _save_label(tmp_path / "trainannot" / "0001TP_006690.png", _label([0, 10, 11, 3]))
    _save_image(tmp_path / "val" / "0016E5_07959.png")
    ds = build_dataset("camvid", "train", root=str(tmp_path))
    _, y = ds[0]
    assert y[0, ::2][:4].tolist() == [0, 10, 255, 3]
    with pytest.raises(FileNotFoundError, match="valannot"):
        build_dataset("camvid", "val", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="camvid root folder"):
        build_dataset("camvid", "train", root=str(tmp_path / "nope"))
