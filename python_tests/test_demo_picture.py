"""The demo's predictions.png says what each column is and which colour is which class."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segkd_kernels.train.data.synthetic import CLASS_NAMES, INFO
from segkd_kernels.train.demo import prediction_strip
from segkd_kernels.train.png import HEADER_HEIGHT, PALETTE, colorize

SIZE, SCALE, N_IMAGES = 16, 3, 2


class TinyData:
    info = INFO

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, len(CLASS_NAMES), (SIZE, SIZE), generator=g)
        label[0, :3] = 255  # a few ignored pixels: the legend then names the ignore colour too
        return torch.randn(3, SIZE, SIZE, generator=g), label


class TinyModel(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, len(CLASS_NAMES), 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def _dark(region: np.ndarray) -> int:
    return int((region.max(axis=2) < 100).sum())


def test_prediction_strip_has_column_names_and_class_legend(tmp_path):
    path = tmp_path / "predictions.png"
    models = [TinyModel(k) for k in range(3)]
    prediction_strip(str(path), models, TinyData(), [None] * 3, n_images=N_IMAGES, scale=SCALE)
    img = np.asarray(Image.open(path).convert("RGB"))
    tile, gap = SIZE * SCALE, 2 * SCALE
    body_h = N_IMAGES * tile + (N_IMAGES - 1) * gap
    assert img.shape[1] == 5 * tile + 4 * gap
    legend_h = img.shape[0] - HEADER_HEIGHT - body_h
    assert legend_h >= 20  # at least one legend row below the body

    # a name above each of the five columns: dark text pixels inside every column's span
    header = img[:HEADER_HEIGHT]
    for k in range(5):
        assert _dark(header[:, k * (tile + gap): k * (tile + gap) + tile]) > 10, f"column {k} has no label"
    # the body sits right below the header: the ground-truth tile of the first image, pixel for pixel
    want = colorize(TinyData()[0][1].numpy()).repeat(SCALE, 0).repeat(SCALE, 1)
    np.testing.assert_array_equal(img[HEADER_HEIGHT:HEADER_HEIGHT + tile, tile + gap:2 * tile + gap], want)

    # every class colour (and the ignore white, outlined) is drawn as a swatch in the legend
    legend = img[HEADER_HEIGHT + body_h:]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    for k in range(len(CLASS_NAMES)):
        assert tuple(int(v) for v in PALETTE[k]) in colours, f"class {k} ({CLASS_NAMES[k]}) missing from legend"
    assert _dark(legend) > 50  # the class names


def test_column_names_must_match_the_models(tmp_path):
    with pytest.raises(ValueError, match="column_names"):
        prediction_strip(str(tmp_path / "p.png"), [TinyModel(0)], TinyData(), [None], column_names=["a", "b"])
