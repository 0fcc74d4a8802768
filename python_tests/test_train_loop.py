"""The training loop: exact resume after an interruption (SIGTERM), checkpoint integrity, config
validation before any work, metrics, sliding-window inference, mixed precision, CLI and demo smoke."""

import json
import os
import signal
import struct
import zlib

import pytest
import torch

from segkd_kernels import cli
from segkd_kernels.train import checkpoint as ckpt
from segkd_kernels.train import engine
from segkd_kernels.train.config import ConfigError, list_configs, load_config, resolve_config_path, validate
from segkd_kernels.train.metrics import ConfusionMatrix, predict_slide, predict_whole
from segkd_kernels.train.png import write_png

TINY = ["data.options.image_size=16", "data.options.train={num_images: 12}", "data.options.val={num_images: 3}",
        "data.batch_size=4", "data.crop_size=16", "student.width=0.0625", "teacher.width=0.0625",
        "teacher.arch=deeplabv3", "teacher.backbone=resnet18", "log_every=1", "progress=false", "ckpt_every=2",
        "iters=4", "data.eval_batch_size=3"]


# tiny models and tensors: see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(out, *extra, **fields):
    return load_config(None, [*TINY, f"out={out}", *extra], **fields)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lad_teacher_runs(tmp_path_factory):
    """A LAD teacher run (it draws label-channel noise from the RNG every step, and crosses an epoch
    boundary at step 3) done twice: straight through, and stopped by SIGTERM at step 2 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    straight = engine.train(tiny(root / "a", "stage=teacher", "method=lad"))

    def interrupt(step, _losses):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg_b = tiny(root / "b", "stage=teacher", "method=lad")
    stopped = engine.train(cfg_b, callback=interrupt)
    stopped["saved_step"] = ckpt.load_checkpoint(str(root / "b" / "last.pt"))["step"]
    resumed = engine.train(cfg_b, resume=True)
    return root, straight, stopped, resumed


def test_sigterm_saves_and_stops(lad_teacher_runs):
    root, _, stopped, _ = lad_teacher_runs
    assert stopped["status"] == "interrupted" and stopped["step"] == 2 and stopped["signal"] == signal.SIGTERM
    assert stopped["saved_step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards


def test_resume_reproduces_the_uninterrupted_run_exactly(lad_teacher_runs):
    root, straight, stopped, resumed = lad_teacher_runs
    assert resumed["status"] == "done" and resumed["step"] == 4
    history = [{k: v for k, v in h.items()} for h in stopped["history"]]
    assert history + resumed["history"] == straight["history"]  # exact floats, every term
    a = ckpt.load_checkpoint(str(root / "a" / "last.pt"))
    b = ckpt.load_checkpoint(str(root / "b" / "last.pt"))
    assert states_equal(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert straight["metrics"]["miou"] == resumed["metrics"]["miou"]


def test_corrupt_or_truncated_checkpoint_is_refused_and_previous_kept(lad_teacher_runs, tmp_path):
    root, *_ = lad_teacher_runs
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "prev.pt", "config.json"):
        (run / name).write_bytes((root / "a" / name).read_bytes())
    assert ckpt.load_checkpoint(str(run / "prev.pt"))["step"] == 2
    good = (run / "last.pt").read_bytes()
    cfg = tiny(run, "stage=teacher", "method=lad")

    (run / "last.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"truncated.*prev\.pt.*step 2"):
        engine.train(cfg, resume=True)
    assert len((run / "last.pt").read_bytes()) == len(good) // 2  # left as it was, for inspection

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    (run / "last.pt").write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_checkpoint(str(run / "last.pt"))
    (run / "last.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="not a segkd checkpoint"):
        ckpt.load_checkpoint(str(run / "last.pt"))
    # --resume-from the previous checkpoint works and finishes the run
    result = engine.train(cfg, resume=str(run / "prev.pt"))
    assert result["status"] == "done" and result["step"] == 4


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    ckpt.save_checkpoint({"step": 3}, path)
    assert ckpt.load_checkpoint(path)["step"] == 3
    assert ckpt.load_checkpoint(str(tmp_path / "prev.pt"))["step"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["method=nope"], "method: unknown value 'nope'; choices: none, attnfd"),
    (["data.name=voc", "data.root=/nonexistent/VOC"], "data.root: dataset folder '/nonexistent/VOC' does not exist"),
    (["data.name=cityscapes"], "data.root: dataset 'cityscapes' needs its folder"),
    (["data.num_classes=21"], "data.num_classes: synthetic has 8 classes, the config says 21"),
    (["optim.lr=-0.1"], "optim.lr: expected a positive value"),
    (["iters=ten"], "iters: expected an integer, got 'ten'"),
    (["optim.lrr=0.1"], "optim.lrr: unknown setting"),
    (["precision=fp8"], "precision: unknown value 'fp8'"),
    (["student.backbone=resnet34"], "student.backbone: unknown value 'resnet34'"),
    (["method=kd"], "teacher.checkpoint: method 'kd' distils from a trained teacher"),
    (["method=kd", "teacher.checkpoint=/nonexistent.pt"], "teacher.checkpoint: no such file"),
    (["method=kd", "distill.weights.kdd=1"], "distill.weights: unknown term"),
    (["data.scale_range=[2.0, 0.5]"], "data.scale_range: expected 0 < low <= high"),
])
def test_bad_config_fails_before_any_work(tmp_path, monkeypatch, overrides, message):
    def no_work(*a, **k):
        raise AssertionError("work started before the config was validated")

    monkeypatch.setattr(engine, "build_datasets", no_work)
    monkeypatch.setattr(engine, "build_from_spec", no_work)
    with pytest.raises(ConfigError) as e:
        engine.train(tiny(tmp_path, *overrides))
    assert message in str(e.value)
    assert not (tmp_path / "last.pt").exists()


def test_bad_yaml_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.momentun: unknown setting"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not a shipped config"):
        resolve_config_path("no_such_recipe")


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert cli.main(["train", "--method", "nope", "--iters", "1"]) == 2
    assert "segkd train: error: method: unknown value 'nope'" in capsys.readouterr().err


def test_shipped_configs_load_and_synthetic_ones_validate():
    names = list_configs()
    methods = ("kd", "cwd", "skd", "pfs", "cirkd", "ssim", "attnfd", "lad")
    for m in methods:
        for data in ("cityscapes", "voc", "synthetic"):
            assert any(n.startswith(f"{m}_{data}") for n in names), (m, data, names)
    for n in names:
        cfg = load_config(n)
        if cfg.data.name == "synthetic":
            validate(cfg, need_teacher_file=False)
        else:  # real datasets: everything but the folder is valid
            with pytest.raises(ConfigError, match="data.root"):
                validate(cfg, need_teacher_file=False)
            cfg.data.root = os.path.dirname(__file__)
            validate(cfg, need_teacher_file=False)


def test_confusion_matrix_metrics():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    m = cm.compute(["a", "b", "c", "d"])
    # class 0: tp 1, fp 1 (the 2 predicted as 0), fn 1 -> 1/3; class 1: tp 3, fp 1 -> 3/4; class 2: 1/2
    assert m["per_class_iou"]["a"] == pytest.approx(100 / 3)
    assert m["per_class_iou"]["b"] == pytest.approx(75.0)
    assert m["per_class_iou"]["c"] == pytest.approx(50.0)
    assert m["per_class_iou"]["d"] is None  # absent from ground truth and prediction: not averaged
    assert m["miou"] == pytest.approx((100 / 3 + 75 + 50) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7) and m["pixels"] == 7


class Pointwise(torch.nn.Module):
    """A per-pixel model: sliding windows must then reproduce whole-image inference exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def test_sliding_window_matches_whole_image_for_a_pointwise_model():
    x = torch.randn(2, 3, 11, 13)
    model = Pointwise()
    whole = predict_whole(model, x)
    for window, stride in ((5, 3), (4, 4), (16, 8)):  # overlapping, tiling, larger than the image
        torch.testing.assert_close(predict_slide(model, x, window, stride, 4), whole)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, precision):
    r = engine.train(tiny(tmp_path, f"precision={precision}", "iters=2", "ckpt_every=0"))
    assert r["status"] == "done"
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in r["history"])
    state = ckpt.load_checkpoint(r["checkpoint"])
    assert state["scaler"]["scale"] if precision == "fp16" else True


def read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * w + 1) + 1:(y + 1) * (3 * w + 1)] for y in range(h)]
    return w, h, b"".join(rows)


def test_png_writer_round_trip(tmp_path):
    img = torch.randint(0, 256, (3, 5, 3), dtype=torch.uint8).numpy()
    write_png(str(tmp_path / "x.png"), img)
    w, h, pixels = read_png(str(tmp_path / "x.png"))
    assert (w, h) == (5, 3) and pixels == img.tobytes()


def test_cli_train_eval_and_demo_smoke(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--iters", "2", "--out", str(out)] + [a for s in TINY if not s.startswith("iters") for a in ("--set", s)]
    assert cli.main(args) == 0
    assert "mIoU" in capsys.readouterr().out
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert {"loss", "ce", "lr", "sec_per_iter"} <= set(records[0])
    assert cli.main(["eval", str(out / "last.pt"), "--json", "--mode", "slide", "--set", "data.eval_crop=8"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m) >= {"miou", "pixel_acc", "per_class_iou"}

    from segkd_kernels.train.demo import run_demo

    assert run_demo(preset="smoke", method="kd", out=str(tmp_path / "demo")) == 0
    text = capsys.readouterr().out
    for row in ("teacher", "student", "student + kd", "predictions:"):
        assert row in text
    w, h, _ = read_png(str(tmp_path / "demo" / "predictions.png"))
    assert w > h > 0


def test_compare_smoke_tables(tmp_path):
    import csv

    from segkd_kernels.train.compare import run_compare, variant_config

    out = tmp_path / "cmp"
    assert run_compare(methods=["kd"], controls=[], seeds=2, preset="smoke", out=str(out),
                       overrides=["progress=false"]) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("kd", "0"), ("kd", "1")]
    summary = json.load(open(out / "compare.json"))["summary"]
    kd = next(s for s in summary["main"] if s["method"] == "kd")
    diffs = [float(r["miou"]) - float(r["baseline_miou"]) for r in rows]
    assert kd["n"] == 2 and kd["mean"] == pytest.approx(sum(diffs) / 2)
    assert summary["students"][0]["n"] == 2 and len(summary["teachers"]) == 1
    table = open(out / "compare.md").read()
    student = variant_config("kd", "smoke", seed=0).student.arch
    assert f"| kd | {student} | 2 |" in table and "student alone" in table and "teacher" in table


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_distillation_runs_with_fused_backends(tmp_path, precision):
    """On a GPU: a teacher, then a distilled student with every op on its fastest backend ("auto")."""
    t = engine.train(tiny(tmp_path / "t", "stage=teacher", "device=cuda", "iters=2"))
    for method in ("kd", "cwd", "cirkd", "ssim", "attnfd"):
        r = engine.train(tiny(tmp_path / method, f"method={method}", "device=cuda", f"precision={precision}",
                              "iters=3", f"teacher.checkpoint={t['checkpoint']}", "data.options.image_size=32",
                              "data.crop_size=32"))
        assert r["status"] == "done"
        assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in r["history"]), (method, r["history"])
