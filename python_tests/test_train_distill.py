"""Distillers: each trains on a fixed batch with a finite, decreasing loss; the registry and its errors;
LAD's label encoding; reference vs Triton backends give the same loss curve."""

import math

import pytest
import torch

from segkd_kernels.ops import implemented_backends
from segkd_kernels.train.distill import build_distiller, get_method, methods
from segkd_kernels.train.distill.base import REGISTRY, Distiller, register
from segkd_kernels.train.distill.lad import LAD, label_channel
from segkd_kernels.train.models import build_model

K = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation (several times slower on a
    loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

METHODS = ("kd", "cwd", "skd", "pfs", "cirkd", "ssim", "attnfd", "lad")
TERMS = {"kd": {"kd"}, "cwd": {"cwd"}, "skd": {"pairwise", "kd"}, "pfs": {"pairwise", "gap_kd"},
         "cirkd": {"cross_image", "kd", "memory_pixel", "memory_region"}, "ssim": {"ssim"}, "attnfd": {"attnfd"}, "lad": {"cwd"}}


def tiny_pair(method, widths=(0.125, 0.25)):
    """A DeepLabV3+ student and a wider teacher (so adapters really map channels), fixed seeds."""
    torch.manual_seed(0)
    student = build_model("deeplabv3plus", "resnet18", K, width=widths[0])
    torch.manual_seed(1)
    teacher = build_model("deeplabv3plus", "resnet18", K, width=widths[1],
                          in_channels=get_method(method).teacher_in_channels).eval()
    return student, teacher


def batch(n=2, size=24):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, K, (n, size, size), generator=g)
    labels[:, :2] = 255  # some ignored pixels
    return images, labels


def distill_curve(method, backend="reference", steps=5, lr=0.02, optimizer="adam", size=24,
                  widths=(0.125, 0.25)):
    student, teacher = tiny_pair(method, widths)
    torch.manual_seed(3)
    distiller = build_distiller(method, student.feature_channels, teacher.feature_channels, K, backend=backend)
    images, labels = batch(size=size)
    with torch.no_grad():
        t_out = teacher(distiller.teacher_input(images, labels))
    params = list(student.parameters()) + list(distiller.parameters())
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    curve, terms = [], None
    for _ in range(steps):
        losses = distiller(student(images), t_out, labels)
        terms = set(losses)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve, terms


def test_registry_lists_every_method():
    assert set(METHODS) <= set(methods())


@pytest.mark.parametrize("method", METHODS)
def test_distiller_loss_finite_and_decreasing(method):
    curve, terms = distill_curve(method)
    assert terms == TERMS[method]
    assert all(math.isfinite(v) for v in curve), curve
    assert curve[-1] < curve[0], curve


def test_lad_teacher_objective_decreases():
    torch.manual_seed(0)
    model = build_model("deeplabv3", "resnet18", K, width=0.125, in_channels=4, aux=True)
    images, labels = batch()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ce = lambda logits, lab: torch.nn.functional.cross_entropy(  # noqa: E731
        torch.nn.functional.interpolate(logits, size=lab.shape[-2:], mode="bilinear"), lab, ignore_index=255)
    curve = []
    for _ in range(5):
        torch.manual_seed(len(curve))
        losses = LAD.teacher_losses(model, images, labels, K, ce)
        assert set(losses) == {"ce", "aux", "dual_cwd"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0], curve


def test_lad_label_channel_codes():
    labels = torch.tensor([[[0, 1, 255], [4, 4, 0]]])
    code = label_channel(labels, K, train=False, eval_noise=0.0, scale=1.0)[0, 0]
    half = (K + 1) / 2
    expected = (torch.tensor([[0, 1, K], [4, 4, 0]]).float() - half) / (half - 1)
    torch.testing.assert_close(code, expected)
    # training: one random value per image and class, the same at every pixel of that class
    torch.manual_seed(0)
    code = label_channel(labels.repeat(2, 1, 1), K, train=True, train_noise=0.0)[:, 0]
    assert code[0, 0, 0] == code[0, 1, 2] and code[0, 1, 0] == code[0, 1, 1]
    assert code[0, 0, 0] != code[1, 0, 0]  # drawn per image
    noisy = label_channel(labels, K, train=True)[0, 0]
    assert noisy[0, 0] != noisy[1, 2]  # per-pixel noise


def test_unknown_method_weight_option_and_point():
    with pytest.raises(ValueError, match="unknown distillation method 'nope'.*kd"):
        get_method("nope")
    ch = {"logits": K, "neck": 8, "layer4": 8}
    with pytest.raises(ValueError, match="distill.weights: unknown term.*'kdd'"):
        build_distiller("kd", ch, ch, K, weights={"kdd": 1.0})
    with pytest.raises(ValueError, match="distill.options: unknown option.*'temperature'"):
        build_distiller("kd", ch, ch, K, options={"temperature": 2.0})
    with pytest.raises(ValueError, match="needs the student feature point 'neck'"):
        build_distiller("cwd", {"logits": K}, ch, K)
    with pytest.raises(ValueError, match="non-negative"):
        build_distiller("kd", ch, ch, K, weights={"kd": -1})


def test_adding_a_method_is_one_registered_class():
    @register("_test_l2")
    class L2(Distiller):
        default_weights = {"l2": 1.0}

        def forward(self, student, teacher, labels):
            return {"l2": ((student["logits"] - teacher["logits"]) ** 2).mean()}

    try:
        d = build_distiller("_test_l2", {"logits": K}, {"logits": K}, K)
        s, t = torch.zeros(1, K, 2, 2), torch.ones(1, K, 2, 2)
        assert d({"logits": s}, {"logits": t}, None)["l2"].item() == 1.0
    finally:
        REGISTRY.pop("_test_l2")


def _has_triton(method) -> bool:
    impl = implemented_backends()
    return all("triton" in impl.get(op, {}) for op in get_method(method).ops)


@pytest.mark.parametrize("method", METHODS)
def test_reference_and_triton_loss_curves_match(method):
    """Same init, same batch, a few optimiser steps: the curves agree to float tolerance (the kernels'
    gradients feed the next step, so this checks the backward too)."""
    if not _has_triton(method):
        pytest.skip(f"{method}: not every op it uses has a Triton backend yet ({get_method(method).ops})")
    # SGD, not Adam: Adam divides by the gradient's magnitude, so it turns float-rounding differences in
    # near-zero gradients into O(lr) parameter differences
    # 16 px images (2 x 2 neck maps, 4 x 4 decoder maps), narrow models: the interpreter runs every
    # program in Python
    small = dict(steps=2, lr=0.1, optimizer="sgd", size=16, widths=(0.0625, 0.125))
    if method == "skd":
        # SKD max-pools its 2x2 neck maps by 2 to one pixel, whose similarity loss is 0 whatever the
        # inputs (pairwise_kd refuses it): 24 px images give 3x3 maps, pooled to 2x2
        small["size"] = 24
    ref, _ = distill_curve(method, "reference", **small)
    tri, _ = distill_curve(method, "triton", **small)
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), rtol=2e-4, atol=2e-5)
