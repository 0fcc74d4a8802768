"""The methods' recipes as their official code runs them: LAD's label-channel scale, warm start,
consistency ramp-up, teacher = student architecture and the label-channel check; AttnFD's two phases,
frozen student MLP, teacher mode, CE normalisation and missing-point warning; the SKD / CIRKD feature
point; the shipped configs' recipes. Tiny models and tensors: seconds."""

from __future__ import annotations

import json
import math

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
        "iters=2", "data.eval_batch_size=3", "backend=reference"]


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
        out[step, length] = LAD.teacher_losses(model, images, labels, K, ce, step=step, rampup_iters=length,
                                               backend="reference")
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


# --------------------------------------------------------------------------------------------- AttnFD
V3P = ["student.arch=deeplabv3plus", "teacher.arch=deeplabv3plus"]


@pytest.fixture(scope="module")
def attnfd_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("attnfd")
    engine.train(tiny(root / "teacher", "stage=teacher", *V3P), quiet=True)
    return root / "teacher" / "last.pt"


def attnfd_run(out, teacher, *extra, iters=3):
    # the reference backend: these tests are about the schedule, not the kernels (interpreted Triton is slow)
    cfg = tiny(out, "method=attnfd", f"teacher.checkpoint={teacher}", *V3P, f"iters={iters}", "backend=reference",
               *extra)
    return cfg, engine.train(cfg, quiet=True)


def fresh_objects(cfg, teacher_ckpt):
    """The student and distiller exactly as the trainer initialises them (same seed, same order)."""
    from segkd_kernels.train import checkpoint as ckpt

    tspec = ckpt.load_checkpoint(str(teacher_ckpt))["model_spec"]
    spec = engine.model_spec(cfg.student, tspec["num_classes"])
    teacher = engine.build_from_spec(tspec)  # built before the seed, as the trainer loads it
    torch.manual_seed(cfg.seed)
    model = engine.build_from_spec(spec)
    distiller = build_distiller("attnfd", model.feature_channels, teacher.feature_channels, tspec["num_classes"],
                                options=cfg.distill.options)
    return model, distiller


def test_attnfd_connectors_learn_alone_first_then_freeze(attnfd_teacher, tmp_path):
    from segkd_kernels.train import checkpoint as ckpt

    # 12 images / batch 4 = 3 steps an epoch: connector_epochs 1 -> steps 0-2 train the connectors only
    cfg, _ = attnfd_run(tmp_path / "p1", attnfd_teacher, "distill.options.connector_epochs=1", iters=3)
    state = ckpt.load_checkpoint(str(tmp_path / "p1" / "last.pt"))
    model, distiller = fresh_objects(cfg, attnfd_teacher)
    for name, p in model.named_parameters():
        torch.testing.assert_close(state["model"][name], p.detach(), rtol=0, atol=0, msg=name)
    moved = [k for k, v in distiller.state_dict().items() if ".connector." in k and k.endswith("weight")
             and not torch.equal(state["distiller"][k], v)]
    assert len(moved) == 2 * len(distiller.points)  # conv and BN weight of every connector
    # connector_epochs 0: the connectors never move, the student (and its CBAM spatial gates) does,
    # the student CBAMs' channel MLPs never do (frozen as upstream)
    cfg, _ = attnfd_run(tmp_path / "p2", attnfd_teacher, "distill.options.connector_epochs=0", iters=2)
    state = ckpt.load_checkpoint(str(tmp_path / "p2" / "last.pt"))
    model, distiller = fresh_objects(cfg, attnfd_teacher)
    for k, v in distiller.state_dict().items():
        frozen = ".connector." in k or ".student_cbam.mlp." in k or ".teacher_cbam." in k
        if frozen and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(state["distiller"][k], v, rtol=0, atol=0, msg=k)
    changed = [k for k in distiller.state_dict() if ".student_cbam.conv." in k
               and not torch.equal(state["distiller"][k], distiller.state_dict()[k])]
    assert changed and not torch.equal(state["model"]["head.classifier.weight"], model.head.classifier.weight)


def test_attnfd_teacher_mode_and_ce_normalisation(attnfd_teacher, tmp_path):
    base = ("distill.options.connector_epochs=0",)
    _, train = attnfd_run(tmp_path / "a", attnfd_teacher, *base, "distill.options.teacher_mode=train", iters=1)
    _, ev = attnfd_run(tmp_path / "b", attnfd_teacher, *base, "distill.options.teacher_mode=eval", iters=1)
    _, raw = attnfd_run(tmp_path / "c", attnfd_teacher, *base, "distill.options.teacher_mode=eval",
                        "distill.options.ce_batch_average=false", iters=1)
    h_train, h_eval, h_raw = train["history"][0], ev["history"][0], raw["history"][0]
    # the teacher's batch statistics (train) vs running statistics (eval) change its features
    assert h_train["attnfd"] != pytest.approx(h_eval["attnfd"], rel=1e-3)
    # upstream divides the cross-entropy by the batch size (4 here)
    assert h_eval["ce"] == pytest.approx(h_raw["ce"] / 4, rel=1e-5)
    assert h_eval["attnfd"] == pytest.approx(h_raw["attnfd"], rel=1e-6)


def test_attnfd_warns_about_a_missing_point_and_reads_the_upstream_points():
    torch.manual_seed(0)
    v3 = build_model("deeplabv3", "resnet18", K, width=0.0625)
    v3p = build_model("deeplabv3plus", "resnet18", K, width=0.0625)
    with pytest.warns(UserWarning, match=r"\['decoder'\] are not in both models"):
        d = build_distiller("attnfd", v3.feature_channels, v3p.feature_channels, K)
    assert d.points == ["layer4_pre", "aspp"]
    d = build_distiller("attnfd", v3p.feature_channels, v3p.feature_channels, K)
    assert d.points == ["layer4_pre", "aspp", "decoder"]
    with pytest.raises(ValueError, match="teacher_mode: expected one of train, eval"):
        build_distiller("attnfd", v3p.feature_channels, v3p.feature_channels, K, options={"teacher_mode": "x"})


# ------------------------------------------------------------------------------------------ SKD, CIRKD
def test_skd_reads_the_embedding_after_the_heads_conv_block():
    torch.manual_seed(0)
    s = build_model("deeplabv3", "resnet18", K, width=0.0625).eval()
    t = build_model("deeplabv3", "resnet18", K, width=0.125).eval()
    d = build_distiller("skd", s.feature_channels, t.feature_channels, K, weights={"kd": 0.0},
                        backend="reference")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        so, to = s(x), t(x)
        import segkd_kernels as sk

        want = 10 * sk.pairwise_kd(so["embed"], to["embed"], pool=2, backend="reference")
        torch.testing.assert_close(d(so, to, None)["pairwise"], want)
        # the embedding is the ASPP output after one more 3x3 conv block
        torch.testing.assert_close(so["embed"], s.head.conv(so["neck"]))
    with pytest.raises(ValueError, match="point: 'nope' is not a feature point of both models"):
        build_distiller("skd", s.feature_channels, t.feature_channels, K, options={"point": "nope"})


# ------------------------------------------------------------------------------------------- recipes
def _real_configs():
    from segkd_kernels.train.config import list_configs

    return [n for n in list_configs() if not n.endswith("_synthetic")]


def _comments(name):
    from segkd_kernels.train.config import resolve_config_path

    return [line for line in open(resolve_config_path(name)) if line.startswith("#")]


@pytest.mark.parametrize("name", _real_configs())
def test_real_data_recipe(name):
    import warnings

    cfg = load_config(name)
    method, data, bb = name.split("_")
    assert cfg.aux_weight == 0.4 and cfg.student.aux and cfg.teacher.aux
    text = "".join(_comments(name))
    assert "Recipe:" in text  # every config cites where its recipe comes from
    if bb == "mbv2":
        assert cfg.student.backbone == "mobilenetv2" and "resnet18" not in text.lower()
    if method == "attnfd":
        assert cfg.student.arch == cfg.teacher.arch == "deeplabv3plus"
        assert cfg.student.output_stride == cfg.teacher.output_stride == 16
        assert (cfg.data.crop_size, cfg.data.batch_size, cfg.optim.nesterov) == (513, 6, True)
        assert (cfg.optim.weight_decay, cfg.optim.head_lr_mult) == (5e-4, 10.0)
        assert cfg.optim.lr == (0.007 if data == "voc" else 0.01)
        # every configured point exists on both models: no warning
        s = build_model(cfg.student.arch, cfg.student.backbone, 3, width=0.0625, output_stride=16)
        t = build_model(cfg.teacher.arch, cfg.teacher.backbone, 3, width=0.0625, output_stride=16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            d = build_distiller("attnfd", s.feature_channels, t.feature_channels, 3, options=cfg.distill.options)
        assert d.points == ["layer4_pre", "aspp", "decoder"]
    elif method == "cwd":
        assert (cfg.data.crop_size, cfg.optim.lr, cfg.optim.weight_decay) == (512, 0.01, 5e-4)
    else:  # CIRKD's recipe
        assert cfg.data.batch_size == 16 and cfg.optim.lr == 0.02 and (cfg.teacher.deep_stem or method == "lad")
        assert cfg.student.deep_stem == (bb == "r18")
    if method in ("skd", "cirkd"):
        assert cfg.distill.options["point"] == "embed"
    if method == "lad":
        assert cfg.distill.options["same_arch"] and cfg.distill.options["label_scale"] == DEFAULT_LABEL_SCALE


def test_compare_lists_the_lad_teacher_without_its_label():
    from segkd_kernels.train.compare import summarize, variant_config

    plain, lad = variant_config("kd", "smoke", seed=0), variant_config("lad", "smoke", seed=0)
    lad.method = "lad"
    teachers = {"a": (plain, {"metrics": {"miou": 30.0}}), "b": (lad, {"metrics": {"miou": 40.0,
                                                                                  "no_label": {"miou": 25.0}}})}
    out = summarize([], [], teachers)["teachers"]
    name = f"{plain.teacher.arch}-{plain.teacher.backbone}"
    assert [(t["teacher"], t["miou"], t.get("miou_no_label")) for t in out] == [
        (name, 30.0, None), (f"{name} (label-assisted)", 40.0, 25.0)]

