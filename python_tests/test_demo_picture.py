"""The demo's predictions.png says what each column is and which colour is which class."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segkd_kernels.train.data.synthetic import CLASS_NAMES, INFO
from segkd_kernels.train.demo import prediction_strip
from segkd_kernels.train.png import HEADER_HEIGHT, PALETTE, colorize

N_IMAGES = 2


class TinyData:
    info = INFO

    def __init__(self, size=16):
        self.size = size

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, len(CLASS_NAMES), (self.size, self.size), generator=g)
        label[0, :3] = 255  # a few ignored pixels: the legend then names the ignore colour too
        return torch.randn(3, self.size, self.size, generator=g), label


class TinyModel(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, len(CLASS_NAMES), 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def _dark(region: np.ndarray) -> int:
    return int((region.max(axis=2) < 100).sum())


@pytest.mark.parametrize("size,scale", [(64, 3), (16, 3)])  # the demo's tiles, and narrow ones
def test_prediction_strip_has_column_names_and_class_legend(tmp_path, size, scale):
    path = tmp_path / "predictions.png"
    models = [TinyModel(k) for k in range(3)]
    header_h, legend_h = prediction_strip(str(path), models, TinyData(size), [None] * 3, n_images=N_IMAGES,
                                          scale=scale)
    img = np.asarray(Image.open(path).convert("RGB"))
    tile, gap = size * scale, 2 * scale
    body_h = N_IMAGES * tile + (N_IMAGES - 1) * gap
    assert img.shape == (header_h + body_h + legend_h, 5 * tile + 4 * gap, 3)
    assert header_h >= HEADER_HEIGHT and legend_h >= 20  # at least one legend row below the body
    if size == 64:  # the demo's tiles hold every name on one line
        assert header_h == HEADER_HEIGHT

    # a name above each of the five columns: dark text pixels inside every column's span, and
    # none in the gaps between columns (a name never runs into its neighbour's column)
    header = img[:header_h]
    for k in range(5):
        assert _dark(header[:, k * (tile + gap): k * (tile + gap) + tile]) > 10, f"column {k} has no label"
        if k:
            assert _dark(header[:, k * (tile + gap) - gap: k * (tile + gap)]) == 0, f"label crosses into column {k}"
    # the body sits right below the header: the ground-truth tile of the first image, pixel for pixel
    want = colorize(TinyData(size)[0][1].numpy()).repeat(scale, 0).repeat(scale, 1)
    np.testing.assert_array_equal(img[header_h:header_h + tile, tile + gap:2 * tile + gap], want)

    # every class colour (and the ignore white, outlined) is drawn as a swatch in the legend
    legend = img[header_h + body_h:]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    for k in range(len(CLASS_NAMES)):
        assert tuple(int(v) for v in PALETTE[k]) in colours, f"class {k} ({CLASS_NAMES[k]}) missing from legend"
    assert _dark(legend) > 50  # the class names


def test_column_names_must_match_the_models(tmp_path):
    with pytest.raises(ValueError, match="column_names"):
        prediction_strip(str(tmp_path / "p.png"), [TinyModel(0)], TinyData(), [None], column_names=["a", "b"])
