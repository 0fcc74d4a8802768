"""Trainer models: named feature points with the promised shapes and strides for every arch x
backbone, torchvision state-dict compatibility (keys, shapes, parameter counts written down
independently of the code), and loading ImageNet-format weights, including LAD's 4-channel stem."""

from __future__ import annotations

import math

import pytest
import torch

from segkd_kernels.train.models import ARCHS, BACKBONES, build_model

HEAD_KEYS = {
    "deeplabv3": {"neck", "aspp", "embed", "logits"},
    "deeplabv3plus": {"neck", "aspp", "decoder", "embed", "logits"},
    "pspnet": {"neck", "ppm", "embed", "logits"},
    "fcn": {"neck", "embed", "logits"},
}
STAGES = ("layer1", "layer2", "layer3", "layer4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These convolutions are tiny: on a shared 2-core machine, intra-op threads only contend (2-10x
    slower), so run this module single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ARCHS)
def test_feature_points_shapes_and_strides(arch, backbone, output_stride):
    torch.manual_seed(0)
    model = build_model(arch, backbone, 5, output_stride=output_stride, width=0.125, aux=True).eval()
    h, w = 37, 50  # odd, non-square: strides must round up like the convs do
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert set(out) == set(STAGES) | {"layer4_pre"} | HEAD_KEYS[arch] | {"aux"}
    assert set(model.feature_channels) == set(out) == set(model.feature_strides)
    expected_strides = {"layer1": 4, "layer2": 8, "layer3": min(16, output_stride),
                        "layer4": output_stride, "neck": output_stride, "aux": min(16, output_stride),
                        "logits": 4 if arch == "deeplabv3plus" else output_stride}
    if arch == "deeplabv3plus":
        expected_strides["decoder"] = expected_strides["embed"] = 4
    for name, t in out.items():
        stride = model.feature_strides[name]
        assert stride == expected_strides.get(name, output_stride), name
        assert t.shape == (1, model.feature_channels[name], math.ceil(h / stride),
                           math.ceil(w / stride)), name
        assert torch.isfinite(t).all(), name
    assert model.feature_channels["logits"] == 5 and model.num_classes == 5
    if arch in ("deeplabv3", "deeplabv3plus"):
        # the ASPP projection before its dropout: the same values as the neck in eval mode
        torch.testing.assert_close(out["aspp"], out["neck"], rtol=0, atol=0)
    if arch == "pspnet":
        assert out["ppm"] is out["neck"]
    # embed is the classifier's input (a 1x1 conv): the logits follow from it alone
    head = model.head.head.classifier if arch == "fcn" else model.head.classifier
    torch.testing.assert_close(out["logits"], head(out["embed"]), rtol=1e-5, atol=1e-5)
    if backbone == "mobilenetv2":
        assert out["layer4_pre"] is out["layer4"]  # a linear bottleneck ends layer4: no final ReLU
    else:
        torch.testing.assert_close(out["layer4"], out["layer4_pre"].clamp_min(0), rtol=0, atol=0)
        assert (out["layer4_pre"] < 0).any()  # before the ReLU, so negative values survive


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "resnet18", 3, width=0.125, aux=True)
    out = model(torch.randn(2, 3, 32, 32))
    (out["logits"].square().mean() + out["aux"].square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_width_scales_channels_with_a_floor():
    big = build_model("deeplabv3", "resnet50", 4, width=0.25)
    tiny = build_model("deeplabv3", "resnet50", 4, width=0.01)
    assert big.feature_channels["layer4"] == 2048 // 4 and big.feature_channels["neck"] == 64
    assert min(tiny.feature_channels[s] for s in STAGES) >= 8
    assert tiny.feature_channels["neck"] >= 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="unet"), "deeplabv3, deeplabv3plus, pspnet"),
    (dict(backbone="vgg16"), "resnet18, resnet50, resnet101, mobilenetv2"),
    (dict(output_stride=4), "output_stride"),
    (dict(num_classes=0), "num_classes"),
    (dict(width=0.0), "width"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(arch="deeplabv3", backbone="resnet18", num_classes=3) | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(args.pop("arch"), args.pop("backbone"), args.pop("num_classes"), **args)


# ---- torchvision compatibility. The expected layouts below are written from torchvision's
# architecture definitions, not from this package's code.

def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet_keys(depth: int) -> dict[str, tuple]:
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    bottleneck = depth >= 50
    exp = 4 if bottleneck else 1
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for i, n in enumerate(blocks):
        planes = 64 * 2 ** i
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            if bottleneck:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                keys |= _bn(f"{p}.bn1", planes) | _bn(f"{p}.bn2", planes) | _bn(f"{p}.bn3", planes * 4)
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys |= _bn(f"{p}.bn1", planes) | _bn(f"{p}.bn2", planes)
            if b == 0 and (i > 0 or inplanes != planes * exp):
                keys[f"{p}.downsample.0.weight"] = (planes * exp, inplanes, 1, 1)
                keys |= _bn(f"{p}.downsample.1", planes * exp)
            inplanes = planes * exp
    return keys


def torchvision_mobilenet_v2_keys() -> dict[str, tuple]:
    """features.0..17 (the 1280-channel features.18 and the classifier are not part of the
    segmentation backbone)."""
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    cin, idx = 32, 1
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(n):
            p, hid, j = f"features.{idx}.conv", cin * t, 0
            if t != 1:
                keys[f"{p}.0.0.weight"] = (hid, cin, 1, 1)
                keys |= _bn(f"{p}.0.1", hid)
                j = 1
            keys[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
            keys |= _bn(f"{p}.{j}.1", hid)
            keys[f"{p}.{j + 1}.weight"] = (c, hid, 1, 1)
            keys |= _bn(f"{p}.{j + 2}", c)
            cin, idx = c, idx + 1
    return keys


# torchvision's published parameter counts minus the classifier (and MobileNetV2's features.18)
TORCHVISION_PARAMS = {"resnet18": 11_689_512 - 513_000, "resnet50": 25_557_032 - 2_049_000,
                      "resnet101": 44_549_160 - 2_049_000,
                      "mobilenetv2": 3_504_872 - 1_281_000 - (320 * 1280 + 2 * 1280)}


def expected_keys(backbone):
    if backbone == "mobilenetv2":
        return torchvision_mobilenet_v2_keys()
    return torchvision_resnet_keys(int(backbone.removeprefix("resnet")))


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_state_dict_matches_torchvision(backbone, output_stride):
    bb = build_model("deeplabv3", backbone, 3, output_stride=output_stride).backbone
    got = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
    assert got == expected_keys(backbone)
    assert sum(p.numel() for p in bb.parameters()) == TORCHVISION_PARAMS[backbone]


def test_resnet_dilation_follows_torchvision():
    """replace_stride_with_dilation: the first block of a dilated stage keeps the previous
    dilation, later blocks use the new one; strides move to dilation."""
    bb = build_model("deeplabv3", "resnet50", 3, output_stride=8, width=0.125).backbone
    assert (bb.layer3[0].conv2.stride, bb.layer3[0].conv2.dilation) == ((1, 1), (1, 1))
    assert bb.layer3[1].conv2.dilation == (2, 2) and bb.layer4[0].conv2.dilation == (2, 2)
    assert bb.layer4[1].conv2.dilation == (4, 4) and bb.layer4[0].downsample[0].stride == (1, 1)
    bb16 = build_model("deeplabv3", "resnet50", 3, output_stride=16, width=0.125).backbone
    assert bb16.layer3[0].conv2.stride == (2, 2) and bb16.layer4[1].conv2.dilation == (2, 2)


def _fake_checkpoint(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=g) if s else torch.tensor(7))
             for k, s in expected_keys(backbone).items()}
    # entries torchvision has that the backbone does not: must be skipped
    if backbone == "mobilenetv2":
        state |= {"features.18.0.weight": torch.randn(1280, 320, 1, 1),
                  "classifier.1.weight": torch.randn(1000, 1280), "classifier.1.bias": torch.randn(1000)}
    else:
        state |= {"fc.weight": torch.randn(1000, 10), "fc.bias": torch.randn(1000)}
    return state


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2"])
def test_load_torchvision_weights_from_file(tmp_path, backbone):
    state = _fake_checkpoint(backbone)
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    model = build_model("deeplabv3plus", backbone, 4, backbone_weights=str(path))
    loaded = model.backbone.state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k


def test_load_weights_into_four_channel_stem(tmp_path):
    state = _fake_checkpoint("resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style file
    torch.manual_seed(0)
    model = build_model("deeplabv3", "resnet18", 4, in_channels=4, backbone_weights=str(path))
    w = model.backbone.conv1.weight
    assert w.shape == (64, 4, 7, 7)
    assert torch.equal(w[:, :3], state["conv1.weight"])
    extra = w[:, 3]
    assert abs(extra.mean().item()) < 0.01 and 0.09 < extra.std().item() < 0.11  # N(0, 0.1^2)
    assert torch.equal(model.backbone.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    out = model(torch.randn(2, 4, 33, 33))
    assert out["logits"].shape == (2, 4, 5, 5)


def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("deeplabv3", "resnet18", 3, backbone_weights=str(tmp_path / "missing.pth"))
    state = _fake_checkpoint("resnet18")
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="wrong shapes"):  # a width-0.5 model cannot take them
        build_model("deeplabv3", "resnet18", 3, width=0.5, backbone_weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match="missing"):  # a ResNet-50 file is not a ResNet-18 one
        build_model("deeplabv3", "resnet50", 3, backbone_weights=str(tmp_path / "r18.pth"))


def test_deep_stem_resnet18_layout_and_weights_loading():
    """The v1c stem (CIRKD's ResNetV1b names): three 3x3 convs 64, 64, 128, BN on 128, so layer1's
    first block needs a projection; a 3-channel state dict of that layout fills a 4-channel (LAD) stem."""
    torch.manual_seed(0)
    m = build_model("deeplabv3", "resnet18", 5, deep_stem=True)
    sd = m.backbone.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(("conv1.", "bn1.weight"))}
    assert shapes == {"conv1.0.weight": (64, 3, 3, 3), "conv1.1.weight": (64,), "conv1.1.bias": (64,),
                      "conv1.1.running_mean": (64,), "conv1.1.running_var": (64,),
                      "conv1.1.num_batches_tracked": (), "conv1.3.weight": (64, 64, 3, 3),
                      "conv1.4.weight": (64,), "conv1.4.bias": (64,), "conv1.4.running_mean": (64,),
                      "conv1.4.running_var": (64,), "conv1.4.num_batches_tracked": (),
                      "conv1.6.weight": (128, 64, 3, 3), "bn1.weight": (128,)}
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 128, 1, 1)
    out = m.eval()(torch.randn(1, 3, 32, 32))
    assert out["layer1"].shape == (1, 64, 8, 8) and out["logits"].shape == (1, 5, 4, 4)
    four = build_model("deeplabv3", "resnet18", 5, deep_stem=True, in_channels=4, backbone_weights=None)
    from segkd_kernels.train.models import load_backbone_weights

    load_backbone_weights(four.backbone, sd)
    torch.testing.assert_close(four.backbone.state_dict()["conv1.0.weight"][:, :3], sd["conv1.0.weight"])
    with pytest.raises(ValueError, match="deep_stem: a ResNet option"):
        build_model("deeplabv3", "mobilenetv2", 5, deep_stem=True)
