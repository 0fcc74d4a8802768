"""Experiment configuration: dataclasses, YAML loading, `--set key=value` overrides, validation.

Everything is checked by `validate()` before any model is built or any data read, so a typo fails in
a second with a message naming the key, not an hour into a run.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
STAGES = ("student", "teacher")
EVAL_MODES = ("whole", "slide")


@dataclass
class ModelConfig:
    arch: str = "deeplabv3"
    backbone: str = "resnet18"
    width: float = 1.0
    output_stride: int = 8
    aux: bool = False
    deep_stem: bool = False               # ResNet: three 3x3 stem convs (v1c; CIRKD's resnet18-imagenet.pth)
    # ASPP dilation rates (None: 6/12/18 at output stride 16, doubled at 8, sized for ~33-65 px feature
    # maps); small images need rates scaled to their feature map, or the dilated taps fall in the padding
    aspp_rates: tuple[int, ...] | None = None  # deeplabv3 / deeplabv3plus only; other heads ignore it
    backbone_weights: str | None = None  # torchvision-format ImageNet state dict (deep_stem: CIRKD's format)
    # student: a trainer checkpoint to start from; teacher: the trained teacher to distil from
    checkpoint: str | None = None


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    seed: int = 0                         # the synthetic data's generation seed (fixed across training seeds)
    num_classes: int | None = None        # checked against the dataset when given
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int | tuple[int, int] | None = None  # (H, W) or one size; None: the dataset's default
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    batch_size: int = 8                   # total over all processes
    num_workers: int = 0
    eval_batch_size: int = 1
    eval_mode: str = "whole"              # whole-image or sliding-window inference
    eval_crop: int | tuple[int, int] | None = None    # sliding window (H, W) (default: crop_size)
    eval_stride: int | tuple[int, int] | None = None  # sliding window stride (default: 2/3 of the window)
    options: dict = field(default_factory=dict)  # dataset-specific (synthetic: num_images, image_size, ...)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    power: float = 0.9                    # poly schedule: lr * (1 - step / iters) ** power
    warmup_iters: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = 1.0             # lr multiplier for everything except the backbone
    grad_clip: float | None = None


@dataclass
class DistillConfig:
    weights: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    # "model": distil from teacher.checkpoint; "onehot": a knowledge-free control teacher whose logits
    # are onehot_scale x the one-hot ground truth (logit methods only: kd, cwd, lad's CWD), so a gain it
    # also gives is label reweighting, not knowledge transfer
    teacher: str = "model"
    onehot_scale: float = 10.0


@dataclass
class Config:
    method: str = "none"                  # "none": the student alone (CE only)
    stage: str = "student"                # "teacher": train the teacher (LAD: label-assisted)
    seed: int = 0
    iters: int = 1000
    precision: str = "fp32"
    device: str = "auto"
    threads: int = 0                      # torch intra-op CPU threads (0: torch's default)
    backend: str = "auto"                 # segkd_kernels backend for every loss
    sync_bn: bool = False                 # SyncBatchNorm across processes (GPU only)
    bn_eval: bool = False                 # BatchNorm uses (and keeps) its running statistics
    aux_weight: float = 0.4
    # "ce": cross-entropy; "balanced_ce": weighted by median class frequency / class frequency, measured on
    # the training split (a control: what a class-balanced loss alone gives)
    task_loss: str = "ce"
    out: str = "runs/default"
    eval_every: int = 0                   # 0: only at the end
    ckpt_every: int = 500
    log_every: int = 10
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(arch="deeplabv3", backbone="resnet101"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that say where and how visibly a run goes, not what it computes: a resumed run may change
# them freely. Everything else changes the trajectory (or what the run is), so `--resume` refuses a
# change unless asked to accept it. Device and thread count are here because bit-for-bit equality
# across devices or intra-op thread counts is not promised anyway; they are recorded, not checked.
# methods that read only the teacher's logits, so the one-hot control teacher can stand in for it
ONEHOT_METHODS = ("kd", "cwd")
RESUME_FREE_KEYS = frozenset({"out", "progress", "log_every", "ckpt_every", "eval_every", "threads", "device",
                              "data.num_workers", "data.root", "data.eval_batch_size"})


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim.lr": 0.01, ...}: nested settings as dotted keys (dict-valued settings stay whole)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("options", "weights"):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def _comparable(v):
    """JSON and dataclass forms of one value compare equal (tuples vs lists)."""
    if isinstance(v, (list, tuple)):
        return [_comparable(x) for x in v]
    if isinstance(v, dict):
        return {k: _comparable(x) for k, x in v.items()}
    return v


# Settings added after runs were recorded: a recorded config without the key ran with this value.
ADDED_DEFAULTS = {"distill.teacher": "model", "distill.onehot_scale": 10.0, "task_loss": "ce",
                  "student.aspp_rates": None, "teacher.aspp_rates": None}


def config_changes(old: dict, new: dict, *, ignore=RESUME_FREE_KEYS) -> dict:
    """{key: (old value, new value)} for every setting that differs, except the `ignore`d ones."""
    a, b = flatten(old), flatten(new)
    changed = {}
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if key in ADDED_DEFAULTS and (key not in a or key not in b):
            a.setdefault(key, ADDED_DEFAULTS[key])
            b.setdefault(key, ADDED_DEFAULTS[key])
        va, vb = _comparable(a.get(key)), _comparable(b.get(key))
        if va != vb:
            changed[key] = (a.get(key), b.get(key))
    return changed


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """value converted to the annotated type `tp`, or ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _merge(obj, data: dict, prefix: str = "") -> None:
    """Update dataclass `obj` in place from a nested mapping, type-checking every leaf."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown setting; known: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _parse_scalar(text: str):
    """A `--set` value: YAML scalar syntax (1, 0.5, true, null, [0.5, 2.0], {a: 1}, text)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def apply_override(cfg: Config, assignment: str) -> None:
    """`key.sub=value`, e.g. `optim.lr=0.02`, `distill.weights.kd=0.5`, `data.options.num_images=64`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    value = _parse_scalar(text)
    nested: typing.Any = value
    for p in reversed(parts):
        nested = {p: nested}
    # dict-valued settings (distill.weights, data.options) take single entries: merge, don't replace
    obj = cfg
    for i, p in enumerate(parts[:-1]):
        if dataclasses.is_dataclass(obj) and p in {f.name for f in dataclasses.fields(obj)}:
            child = getattr(obj, p)
            if isinstance(child, dict):
                _set_in_dict(child, parts[i + 1:], value)
                return
            obj = child
        else:
            break
    _merge(cfg, nested)


def _set_in_dict(d: dict, parts: list[str], value) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def config_dir() -> str:
    return str(resources.files("segkd_kernels.train") / "configs")


def list_configs() -> list[str]:
    """Shipped recipes (files starting with `_` are the shared bases they extend)."""
    return sorted(f[:-5] for f in os.listdir(config_dir()) if f.endswith(".yaml") and not f.startswith("_"))


def resolve_config_path(name: str) -> str:
    """A path, or the name of a shipped config (`cwd_voc_r18`, with or without `.yaml`)."""
    if os.path.exists(name):
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    path = os.path.join(config_dir(), stem + ".yaml")
    if os.path.exists(path):
        return path
    raise ConfigError(f"--config {name!r}: no such file, and not a shipped config; shipped: "
                      f"{', '.join(list_configs())}")


def load_config(path: str | None = None, overrides: typing.Sequence[str] = (), **fields) -> Config:
    """Defaults, then the YAML file, then `fields` (e.g. method=, iters= from the CLI), then `--set`s."""
    import yaml

    cfg = Config()
    if path:
        path = resolve_config_path(path)
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level (key: value lines), "
                              f"got a {type(data).__name__}")
        # a run's config.json lists the settings changed on resume next to the final settings; loading
        # it as a config takes the final settings
        data.pop("changes", None)
        base = data.pop("base", None)
        if base:  # a config may extend another (shipped name or path relative to it)
            rel = os.path.join(os.path.dirname(path), base)
            cfg = load_config(rel if os.path.exists(rel) else base)
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    set_fields = {k: v for k, v in fields.items() if v is not None}
    for k, v in set_fields.items():
        if k == "dataset":
            cfg.data.name = v
        else:
            _merge(cfg, {k: v})
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def validate(cfg: Config, *, need_teacher_file: bool = True) -> None:
    """Every check that needs no model and no training; raises ConfigError with what to fix."""
    from .data import DATASETS
    from .distill import methods
    from .models import ARCHS, BACKBONES

    def choice(key, value, choices):
        if value not in choices:
            raise ConfigError(f"{key}: unknown value {value!r}; choices: {', '.join(map(str, choices))}")

    choice("method", cfg.method, ("none", *methods()))
    choice("stage", cfg.stage, STAGES)
    choice("precision", cfg.precision, PRECISIONS)
    choice("optim.name", cfg.optim.name, OPTIMIZERS)
    choice("data.eval_mode", cfg.data.eval_mode, EVAL_MODES)
    choice("data.name", cfg.data.name, tuple(DATASETS))
    choice("backend", cfg.backend, ("auto", "reference", "triton", "cuda"))
    choice("task_loss", cfg.task_loss, ("ce", "balanced_ce"))
    choice("distill.teacher", cfg.distill.teacher, ("model", "onehot"))
    if cfg.distill.teacher == "onehot" and cfg.method not in ONEHOT_METHODS:
        raise ConfigError(f"distill.teacher: the one-hot control teacher has logits only; method {cfg.method!r} "
                          f"needs teacher features (one-hot works with {', '.join(ONEHOT_METHODS)})")
    if cfg.distill.teacher == "onehot" and cfg.method == "cwd" and cfg.distill.weights.get("feat", 0):
        raise ConfigError("distill.teacher: the one-hot control teacher has logits only; set "
                          "distill.weights.feat=0 (CWD on the neck features needs a real teacher)")
    for m in (cfg.student, cfg.teacher):
        if m.aspp_rates is not None and (not m.aspp_rates or any(int(r) != r or r < 1 for r in m.aspp_rates)):
            raise ConfigError(f"aspp_rates: expected a list of positive integer dilation rates, got {m.aspp_rates!r}")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {cfg.device!r}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"out: {cfg.out!r} is a file; the output must be a folder (new, empty, or a run "
                          f"folder with --resume)")
    if cfg.backend not in ("auto", "reference"):
        # checked here, not when the first loss runs after the models are built (and refused even when
        # no loss would use it: a backend asked for is expected to run)
        import torch

        from segkd_kernels import _backends, available_backends

        report = available_backends()
        if not report[cfg.backend]:
            raise ConfigError(f"backend: {cfg.backend!r} cannot run here: {report.reasons[cfg.backend]}; "
                              f"use backend=auto or reference")
        on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if not on_cuda and cfg.backend == "cuda":
            raise ConfigError("backend: 'cuda' runs on CUDA tensors only, and the run's device is the CPU")
        if cfg.backend == "triton" and on_cuda == _backends.TRITON_INTERPRET:
            raise ConfigError("backend: 'triton' " + (
                "runs through the interpreter (TRITON_INTERPRET=1) on CPU tensors only, and the run's device is "
                "CUDA" if on_cuda else "needs CUDA tensors, or TRITON_INTERPRET=1 set before starting, on CPU"))
    for key, model in (("student", cfg.student), ("teacher", cfg.teacher)):
        choice(f"{key}.arch", model.arch, ARCHS)
        choice(f"{key}.backbone", model.backbone, BACKBONES)
        choice(f"{key}.output_stride", model.output_stride, (8, 16))
        if model.deep_stem and model.backbone == "mobilenetv2":
            raise ConfigError(f"{key}.deep_stem: a ResNet option; mobilenetv2 has its own stem")
        if not model.width > 0:
            raise ConfigError(f"{key}.width: expected a positive number, got {model.width}")
        if model.backbone_weights and not os.path.isfile(model.backbone_weights):
            raise ConfigError(f"{key}.backbone_weights: no such file {model.backbone_weights!r}")
    positive = {"iters": cfg.iters, "data.batch_size": cfg.data.batch_size, "optim.lr": cfg.optim.lr,
                "data.eval_batch_size": cfg.data.eval_batch_size, "log_every": cfg.log_every}
    for key, v in positive.items():
        if not v > 0:
            raise ConfigError(f"{key}: expected a positive value, got {v}")
    for key, v in {"eval_every": cfg.eval_every, "ckpt_every": cfg.ckpt_every, "aux_weight": cfg.aux_weight,
                   "optim.weight_decay": cfg.optim.weight_decay, "optim.warmup_iters": cfg.optim.warmup_iters,
                   "data.num_workers": cfg.data.num_workers}.items():
        if v < 0:
            raise ConfigError(f"{key}: expected a value >= 0, got {v}")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"data.scale_range: expected 0 < low <= high, got {cfg.data.scale_range}")
    for key in ("crop_size", "eval_crop", "eval_stride"):
        v = getattr(cfg.data, key)
        if v is not None and min(v if isinstance(v, tuple) else (v,)) < 1:
            raise ConfigError(f"data.{key}: expected a positive size, got {v}")
    validate_data(cfg)
    # The distiller: known method, its weights and options, a teacher to learn from.
    if cfg.method != "none":
        from .distill import get_method

        cls = get_method(cfg.method)
        bad = set(cfg.distill.weights) - set(cls.default_weights)
        if bad:
            raise ConfigError(f"distill.weights: unknown term(s) {sorted(bad)} for method {cfg.method!r}; "
                              f"terms: {sorted(cls.default_weights)}")
        bad = set(cfg.distill.options) - set(cls.default_options)
        if bad:
            raise ConfigError(f"distill.options: unknown option(s) {sorted(bad)} for method {cfg.method!r}; "
                              f"options: {sorted(cls.default_options) or 'none'}")
        if cfg.method == "lad":
            from .distill.lad import check_options

            try:
                check_options({**cls.default_options, **cfg.distill.options})
            except ValueError as e:
                raise ConfigError(str(e)) from None
            ws = cfg.distill.options.get("warm_start")
            if ws and cfg.stage == "teacher" and not os.path.isfile(ws):
                raise ConfigError(f"distill.options.warm_start: no such file {ws!r} (a plain teacher's checkpoint)")
        if cfg.stage == "student" and need_teacher_file and cfg.distill.teacher == "model":
            ck = cfg.teacher.checkpoint
            if not ck:
                raise ConfigError(
                    f"teacher.checkpoint: method {cfg.method!r} distils from a trained teacher; train one with "
                    f"`segkd train --stage teacher --method {cfg.method} ...` and pass "
                    f"--set teacher.checkpoint=OUT/last.pt")
            if not os.path.isfile(ck):
                raise ConfigError(f"teacher.checkpoint: no such file {ck!r}")
    elif cfg.stage == "student" and cfg.teacher.checkpoint:
        pass  # a teacher is only needed when distilling; an unused one is harmless
    if cfg.precision == "fp16" and cfg.device == "cpu":
        pass  # allowed (CPU autocast supports fp16 in recent torch); bf16 is the sensible CPU choice


def validate_data(cfg: Config) -> None:
    """The data checks of validate(): known dataset, its options, class count and folder."""
    from .data import DATASETS, dataset_info

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name: unknown value {cfg.data.name!r}; choices: {', '.join(DATASETS)}")
    info = dataset_info(cfg.data.name)
    if cfg.data.num_classes is not None and cfg.data.num_classes != info.num_classes:
        raise ConfigError(f"data.num_classes: {cfg.data.name} has {info.num_classes} classes, "
                          f"the config says {cfg.data.num_classes}")
    if cfg.data.name != "synthetic":
        if not cfg.data.root:
            raise ConfigError(f"data.root: dataset {cfg.data.name!r} needs its folder (--set data.root=PATH)")
        if not os.path.isdir(cfg.data.root):
            raise ConfigError(f"data.root: dataset folder {cfg.data.root!r} does not exist")
    elif cfg.data.root:
        raise ConfigError("data.root: the synthetic dataset is generated in memory; leave data.root unset")
    allowed = dataset_options(cfg.data.name)
    for where, opts in (("data.options", cfg.data.options),
                        *((f"data.options.{s}", cfg.data.options.get(s) or {}) for s in ("train", "val", "holdout"))):
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}: expected a mapping of dataset options, got {opts!r}")
        bad = sorted(set(opts) - allowed - ({"train", "val", "holdout"} if where == "data.options" else set()))
        if bad:
            raise ConfigError(f"{where}: unknown option(s) {bad} for dataset {cfg.data.name!r}; options: "
                              f"{', '.join(sorted(allowed)) or 'none'}")


def dataset_options(name: str) -> set[str]:
    """The `data.options` keys dataset `name` accepts (beyond the settings of DataConfig)."""
    import inspect

    from .data import DATASETS

    cls = DATASETS[name]
    common = {"self", "root", "split", "train", "crop_size", "scale_range", "flip", "seed"}
    params = inspect.signature(cls.__init__).parameters
    allowed = {n for n, p in params.items() if n not in common and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if name == "synthetic":  # its **options go to the generator
        from .data.synthetic import generate

        allowed |= {n for n, p in inspect.signature(generate).parameters.items() if p.kind is p.KEYWORD_ONLY}
    return allowed
