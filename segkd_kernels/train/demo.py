"""`segkd demo`: teacher, student alone and distilled student on the synthetic data, on CPU in minutes.

Prints a table of mIoU and training time for the three, and writes OUT/predictions.png (rows: val
images; columns: image | ground truth | teacher | student | distilled student).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .config import Config, ModelConfig, load_config

# Budgets measured on 2 CPU cores shared with other jobs: "quick" took 3.6 minutes (45 CPU-seconds) with
# a 200-iteration teacher, about a minute more with 400; the full one takes several times longer.
# The ResNet-50 teacher learns more slowly than the ResNet-18 student, so it trains longer: at the
# quick size it reached 8.2 val mIoU after 200 iterations and 16.8 after 400 (student alone after 200:
# 15.8); at the full size 19.7 after 300 and 27.4 after 900 (one run each).
PRESETS = {
    "full": dict(image_size=64, train_images=2000, val_images=1000, batch_size=8, teacher_iters=900,
                 student_iters=600, lr=0.003),
    "quick": dict(image_size=48, train_images=1000, val_images=120, batch_size=8, teacher_iters=400,
                  student_iters=200, lr=0.003),
    # seconds: for tests of the demo's plumbing, not for results
    "smoke": dict(image_size=16, train_images=8, val_images=2, batch_size=4, teacher_iters=2, student_iters=2,
                  lr=0.003),
}
# As _synthetic.yaml: the same output stride for both (DeepLabV3 logits at 1/8), ASPP rates scaled to
# the 6x6 - 8x8 feature maps of these images
TEACHER = dict(arch="deeplabv3", backbone="resnet50", width=0.25, output_stride=8, aspp_rates=(2, 3, 4))
STUDENT = dict(arch="deeplabv3", backbone="resnet18", width=0.125, output_stride=8, aspp_rates=(2, 3, 4))
# The method the demo shows by default: the one with the largest gain over the student alone in the
# comparison (docs/results/synthetic_compare.md: CWD, +1.49 mIoU, above it on every seed; its
# knowledge-free one-hot control gains about as much).
DEFAULT_METHOD = "cwd"


def demo_config(preset: str, *, stage: str, method: str, out: str, seed: int = 0, device: str = "auto",
                iters: int | None = None, teacher_checkpoint: str | None = None, overrides=()) -> Config:
    """The config of one demo/compare run: `stage` teacher or student, `method` none or a distiller."""
    p = PRESETS[preset]
    cfg = load_config(None, overrides)
    cfg.method, cfg.stage, cfg.seed, cfg.device, cfg.out = method, stage, seed, device, out
    cfg.iters = iters or (p["teacher_iters"] if stage == "teacher" else p["student_iters"])
    cfg.ckpt_every = 0
    cfg.log_every = max(1, cfg.iters // 20)
    cfg.data.name = "synthetic"
    cfg.data.batch_size = p["batch_size"]
    cfg.data.crop_size = p["image_size"]
    cfg.data.eval_batch_size = 16
    cfg.data.scale_range = (1.0, 1.0)  # as _synthetic.yaml: rescaling hides the textures that decide the classes
    cfg.data.options = {"image_size": p["image_size"], "train": {"num_images": p["train_images"]},
                        "val": {"num_images": p["val_images"]}}
    # AdamW: with SGD (lr 0.02, momentum 0.9) these tiny models stay at "all background" for the
    # first several hundred iterations on this data; AdamW at 3e-3 learns the objects within the budget.
    cfg.optim.name = "adamw"
    cfg.optim.lr = p["lr"]
    cfg.optim.weight_decay = 0.01
    cfg.student = ModelConfig(**STUDENT)
    cfg.teacher = ModelConfig(**TEACHER, checkpoint=teacher_checkpoint)
    if preset == "smoke":
        cfg.student.width = cfg.teacher.width = 0.0625
    if method == "attnfd":
        # AttnFD trains its connectors alone for one epoch upstream (2% of its schedule); an epoch here
        # is 40% of the budget, so the connectors get 0.1 epoch (as attnfd_synthetic.yaml)
        cfg.distill.options["connector_epochs"] = 0.1
    for o in overrides:  # the caller's --set wins over the preset
        from .config import apply_override

        apply_override(cfg, o)
    return cfg


def _params(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _describe(m: ModelConfig) -> str:
    return f"{m.arch}-{m.backbone} x{m.width:g}"


def prediction_strip(path: str, models: list, dataset, in_fns: list, n_images: int = 4, scale: int = 3,
                     column_names: list[str] | None = None) -> tuple[int, int]:
    """A PNG: one row per val image; image | ground truth | each model's prediction, with the
    column names above and a legend of the class colours (the dataset's class names) below.

    `column_names` names the models' columns (default: teacher, student, distilled for three
    models, else model 1, model 2, ...). Returns the heights of the header and legend bands."""
    from .metrics import predict_whole
    from .png import colorize, label_picture

    info = getattr(dataset, "info", None)
    mean = np.asarray(info.mean if info is not None else (0.5,) * 3, dtype=np.float32)
    std = np.asarray(info.std if info is not None else (0.25,) * 3, dtype=np.float32)
    if column_names is None:
        column_names = (["teacher", "student", "distilled"] if len(models) == 3
                        else [f"model {k + 1}" for k in range(len(models))])
    if len(column_names) != len(models):
        raise ValueError(f"column_names: expected {len(models)} names (one per model), got {len(column_names)}")
    rows, shown = [], []
    for i in range(min(n_images, len(dataset))):
        image, label = dataset[i]
        shown.append(label.numpy())
        tiles = [np.clip((image.permute(1, 2, 0).numpy() * std + mean) * 255, 0, 255).astype(np.uint8),
                 colorize(label.numpy())]
        for model, in_fn in zip(models, in_fns):
            x = image[None].to(next(model.parameters()).device)
            x = in_fn(x, label[None].to(x.device)) if in_fn else x
            pred = predict_whole(model, x).argmax(1)[0].cpu().numpy()
            shown.append(pred)
            tiles.append(colorize(pred))
        sep = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        row = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)
        rows.append(row)
        rows.append(np.full((2, row.shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], axis=0)
    img = img.repeat(scale, 0).repeat(scale, 1)
    class_names = list(info.class_names) if info is not None else None
    if class_names is None:
        class_names = [str(k) for k in range(int(max(np.max(np.where(a == 255, 0, a)) for a in shown)) + 1)]
    has_ignore = any((a == 255).any() for a in shown)
    return label_picture(path, img, ["image", "ground truth", *column_names], tile_width=tiles[0].shape[1] * scale,
                         gap=2 * scale, class_names=class_names, show_ignore=has_ignore)


def run_demo(*, quick: bool = False, method: str | None = None, out: str = "runs/demo", iters: int | None = None,
             device: str = "auto", preset: str | None = None, stream=None, overrides=(),
             overwrite: bool = False) -> int:
    """Teacher, student alone, distilled student. Running it again continues: each finished stage is
    reused and an interrupted one continues from its checkpoint (overwrite: train every stage again)."""
    from .config import ConfigError, describe_changes, validate
    from .distill import methods
    from .engine import ConfigChanged, load_model, run_stage

    stream = stream or sys.stdout
    preset = preset or ("quick" if quick else "full")
    method = method or DEFAULT_METHOD
    if method not in methods():
        raise ConfigError(f"--method: unknown method {method!r}; choices: {', '.join(methods())}")
    t_stage = "teacher"
    t_method = "lad" if method == "lad" else "none"
    tcfg = demo_config(preset, stage=t_stage, method=t_method, out=os.path.join(out, "teacher"), device=device,
                       iters=iters, overrides=overrides)
    scfg = demo_config(preset, stage="student", method="none", out=os.path.join(out, "student"), device=device,
                       iters=iters, overrides=overrides)
    dcfg = demo_config(preset, stage="student", method=method, out=os.path.join(out, f"student_{method}"),
                       device=device, iters=iters, teacher_checkpoint=os.path.join(tcfg.out, "last.pt"),
                       overrides=overrides)
    for c in (tcfg, scfg, dcfg):  # every stage's settings are checked before the first one trains
        validate(c, need_teacher_file=False)
    os.makedirs(out, exist_ok=True)

    def log(msg):
        print(msg, file=stream, flush=True)

    def stage(cfg):
        try:
            return run_stage(cfg, log, overwrite=overwrite)
        except ConfigChanged as e:
            raise ConfigError(f"{e.out} holds a run made with other settings ({describe_changes(e.changes)}); "
                              f"use another --out, or --overwrite to train every stage again") from None

    t_total = time.perf_counter()
    log(f"segkd demo ({preset}): synthetic data, {PRESETS[preset]['image_size']}px images; teacher "
        f"{_describe(ModelConfig(**TEACHER))}, student {_describe(ModelConfig(**STUDENT))}, method {method}")
    runs = []
    log("[1/3] the teacher")
    rt = stage(tcfg)
    runs.append(("teacher", tcfg.teacher, rt))
    log("[2/3] the student alone")
    rs = stage(scfg)
    runs.append(("student", scfg.student, rs))
    log(f"[3/3] the student with {method}")
    rd = stage(dcfg)
    runs.append((f"student + {method}", dcfg.student, rd))

    models, in_fns = [], []
    for _, _, r in runs:
        model, state = load_model(r["checkpoint"])
        models.append(model)
        if state["model_spec"]["in_channels"] == 4:
            from .distill.lad import recorded_label_scale, with_label

            in_fns.append(lambda im, lab, k=model.num_classes, s=recorded_label_scale(state.get("config")):
                          with_label(im, lab, k, s))
        else:
            in_fns.append(None)
    header = f"{'model':<22} {'architecture':<34} {'params':>7} {'iters':>6} {'mIoU':>7} {'pix acc':>8} {'time':>8}"
    lines = [header, "-" * len(header)]
    for (name, mcfg, r), model in zip(runs, models):
        m = r["metrics"]
        lines.append(f"{name:<22} {_describe(mcfg):<34} {_params(model):>7} {r['step']:>6} {m['miou']:>7.2f} "
                     f"{m['pixel_acc']:>8.2f} {r['train_seconds']:>7.0f}s")
    gain = rd["metrics"]["miou"] - rs["metrics"]["miou"]
    gap = rt["metrics"]["miou"] - rs["metrics"]["miou"]
    if "no_label" in rt["metrics"]:  # a label-assisted teacher: does it read its label channel?
        lines.append(f"{'teacher, label zeroed':<22} {'':<34} {'':>7} {rt['step']:>6} "
                     f"{rt['metrics']['no_label']['miou']:>7.2f} {rt['metrics']['no_label']['pixel_acc']:>8.2f}")
    lines.append("")
    lines.append(f"teacher - student: {gap:+.2f} mIoU; distillation ({method}): {gain:+.2f} mIoU "
                 f"(validation split, {PRESETS[preset]['val_images']} images, one seed: differences of about 1 "
                 f"point are within seed noise; `segkd compare` runs several seeds)")
    from .engine import build_datasets

    _, val_set = build_datasets(dcfg)
    png = os.path.join(out, "predictions.png")
    prediction_strip(png, models, val_set, in_fns)
    lines.append(f"predictions: {png}  (columns: image | ground truth | teacher | student | student + {method})")
    lines.append(f"total time {time.perf_counter() - t_total:.0f} s; runs, checkpoints and logs in {out}/")
    text = "\n".join(lines)
    print("\n" + text, file=stream, flush=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("```\n" + text + "\n```\n")
    return 0
