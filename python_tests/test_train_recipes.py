"""The methods' recipes as their official code runs them: LAD's label-channel scale, warm start,
consistency ramp-up, teacher = student architecture and the label-channel check; AttnFD's two phases,
frozen student MLP, teacher mode, CE normalisation and missing-point warning; the SKD / CIRKD feature
point; the shipped configs' recipes. Tiny models and tensors: seconds."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from segkd_kernels.train import engine
from segkd_kernels.train.config import ConfigError, load_config
from segkd_kernels.train.distill import build_distiller
from segkd_kernels.train.distill.lad import (DEFAULT_LABEL_SCALE, LAD, label_channel, rampup,
                                             recorded_label_scale, warm_start_state, with_label)
from segkd_kernels.train.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 5
TINY = ["data.options.image_size=16", "data.options.train={num_images: 12}", "data.options.val={num_images: 3}",
        "data.batch_size=4", "data.crop_size=16", "student.width=0.0625", "teacher.width=0.0625",
        "teacher.arch=deeplabv3", "teacher.backbone=resnet18", "log_every=1", "progress=false", "ckpt_every=0",
        "iters=2", "data.eval_batch_size=3"]


def tiny(out, *extra, **fields):
    return load_config(None, [*TINY, f"out={out}", *extra], **fields)


# ------------------------------------------------------------------------------------------------ LAD
def test_lad_default_scale_is_the_official_label_to_image_ratio():
    # official: codes x 100 on mean-subtracted 0..255 images whose std is the ImageNet pixel std
    imagenet_pixel_std = 255 * sum((0.229, 0.224, 0.225)) / 3
    assert DEFAULT_LABEL_SCALE == pytest.approx(100 / imagenet_pixel_std, abs=0.05)
    assert LAD.default_options["label_scale"] == DEFAULT_LABEL_SCALE
    labels = torch.randint(0, K, (2, 6, 6), generator=torch.Generator().manual_seed(0))
    for train in (True, False):
        a = label_channel(labels, K, train=train, scale=1.0, generator=torch.Generator().manual_seed(1))
        b = label_channel(labels, K, train=train, scale=2.5, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(b, 2.5 * a)


def test_lad_rampup_shape_and_effect_on_the_consistency_term():
    assert rampup(0, 100) == pytest.approx(math.exp(-5)) and rampup(100, 100) == 1.0 == rampup(500, 100)
    assert rampup(7, 0) == 1.0  # no ramp-up
    vals = [rampup(s, 50) for s in range(0, 60, 5)]
    assert vals == sorted(vals)
    torch.manual_seed(0)
    model = build_model("deeplabv3", "resnet18", K, width=0.0625, in_channels=4)
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, K, (2, 16, 16))
    ce = lambda lo, lab: torch.nn.functional.cross_entropy(  # noqa: E731
        torch.nn.functional.interpolate(lo, size=lab.shape[-2:], mode="bilinear"), lab)
    out = {}
    for step, length in ((0, 0), (0, 40), (20, 40)):
        torch.manual_seed(1)  # the same label-channel noise each time
        out[step, length] = LAD.teacher_losses(model, images, labels, K, ce, step=step, rampup_iters=length)
    full = out[0, 0]["dual_cwd"]
    torch.testing.assert_close(out[0, 40]["dual_cwd"], full * math.exp(-5))
    torch.testing.assert_close(out[20, 40]["dual_cwd"], full * math.exp(-5 * 0.25))
    torch.testing.assert_close(out[20, 40]["ce"], out[0, 0]["ce"])  # the ramp touches only the consistency


def test_lad_warm_start_begins_as_the_plain_teacher():
    torch.manual_seed(0)
    plain = build_model("deeplabv3", "resnet18", K, width=0.0625, aux=True).eval()
    torch.manual_seed(1)
    lad = build_model("deeplabv3", "resnet18", K, width=0.0625, aux=True, in_channels=4)
    lad.load_state_dict(warm_start_state(lad.state_dict(), plain.state_dict()))
    lad.eval()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, K, (2, 16, 16))
    with torch.no_grad():
        want = plain(images)["logits"]
        for x in (with_label(images, labels, K, 1.7), with_label(images, labels, K, 1.7, zero_label=True)):
            torch.testing.assert_close(lad(x)["logits"], want)  # zero label weights: label ignored at first
    bad = {k: v for k, v in plain.state_dict().items() if not k.startswith("head.classifier")}
    with pytest.raises(ValueError, match="warm_start: the checkpoint has no 'head.classifier"):
        warm_start_state(lad.state_dict(), bad)


def test_recorded_label_scale_defaults_to_the_legacy_constant():
    assert recorded_label_scale({"distill": {"options": {"label_scale": 2.0}}}) == 2.0
    assert recorded_label_scale({"distill": {"options": {}}}) == 100.0  # written before the option


@pytest.fixture(scope="module")
def lad_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lad")
    plain = engine.train(tiny(root / "plain", "stage=teacher"), quiet=True)
    lad = engine.train(tiny(root / "lad", "stage=teacher", "method=lad", "distill.options.same_arch=true",
                            "teacher.arch=pspnet", f"distill.options.warm_start={root / 'plain' / 'last.pt'}",
                            "distill.options.label_scale=2.0", "distill.options.consistency_rampup=10"),
                       quiet=True)
    return root, plain, lad


def test_lad_teacher_run_reports_both_mious_and_uses_the_student_architecture(lad_runs):
    root, plain, lad = lad_runs
    m = lad["metrics"]
    assert set(m["no_label"]) == {"miou", "pixel_acc", "per_class_iou"}
    evals = [json.loads(line) for line in open(root / "lad" / "log.jsonl") if '"eval"' in line]
    assert evals[-1]["miou_no_label"] == m["no_label"]["miou"] and evals[-1]["miou"] == m["miou"]
    cfg = json.load(open(root / "lad" / "config.json"))
    assert cfg["teacher"]["arch"] == cfg["student"]["arch"] == "deeplabv3"  # same_arch overrides teacher.arch
    # segkd eval of the checkpoint reports the same two numbers
    from segkd_kernels.train.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(str(root / "lad" / "last.pt"))
    assert again["miou"] == pytest.approx(m["miou"]) and again["no_label"]["miou"] == pytest.approx(
        m["no_label"]["miou"])


def test_lad_student_uses_the_teachers_label_scale(lad_runs):
    root, _, _ = lad_runs
    tck = root / "lad" / "last.pt"
    r = engine.train(tiny(root / "student", "method=lad", f"teacher.checkpoint={tck}"), quiet=True)
    assert json.load(open(root / "student" / "config.json"))["distill"]["options"]["label_scale"] == 2.0
    assert r["status"] == "done"
    with pytest.raises(ConfigError, match="label_scale: 1.7 differs from the 2.0"):
        engine.train(tiny(root / "student2", "method=lad", f"teacher.checkpoint={tck}",
                          "distill.options.label_scale=1.7"), quiet=True)


def test_lad_warm_start_errors(lad_runs, tmp_path):
    root, _, _ = lad_runs
    with pytest.raises(ConfigError, match="warm_start: no such file"):
        engine.train(tiny(tmp_path / "a", "stage=teacher", "method=lad",
                          f"distill.options.warm_start={tmp_path / 'nope.pt'}"))
    with pytest.raises(ConfigError, match=r"warm_start: .*\(differs in width\)"):
        engine.train(tiny(tmp_path / "b", "stage=teacher", "method=lad", "teacher.width=0.125",
                          f"distill.options.warm_start={root / 'plain' / 'last.pt'}"))
    with pytest.raises(ConfigError, match="label_scale: expected a positive number"):
        engine.train(tiny(tmp_path / "c", "stage=teacher", "method=lad", "distill.options.label_scale=0"))
