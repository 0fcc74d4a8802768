"""`segkd eval`: a trained checkpoint on a dataset split, whole-image or sliding-window."""

from __future__ import annotations

from . import checkpoint as ckpt
from .config import Config, ConfigError, DataConfig, _merge, apply_override, validate_data
from .engine import DistEnv, build_from_spec, evaluate, resolve_device


def evaluate_checkpoint(path: str, *, dataset: str | None = None, split: str | None = None, mode: str | None = None,
                        overrides=(), device: str | None = None) -> dict:
    """Metrics of the model in checkpoint `path`; the data settings default to the run's own config."""
    from .data import DATASETS, build_dataset

    state = ckpt.load_checkpoint(path)
    cfg = Config()
    _merge(cfg, state["config"])
    if dataset and dataset != cfg.data.name:
        if dataset not in DATASETS:
            raise ConfigError(f"--dataset: unknown dataset {dataset!r}; choices: {', '.join(DATASETS)}")
        # the run's folder, options and crop belong to its own dataset; the inference settings carry over
        cfg.data = DataConfig(name=dataset, eval_batch_size=cfg.data.eval_batch_size, eval_mode=cfg.data.eval_mode)
    if mode:
        cfg.data.eval_mode = mode
    if device:
        cfg.device = device
    for o in overrides:
        apply_override(cfg, o)
    validate_data(cfg)
    spec = state["model_spec"]
    model = build_from_spec(spec)
    model.load_state_dict(state["model"])
    dev = resolve_device(cfg, DistEnv())
    model.to(dev).eval()
    opts = dict(cfg.data.options)
    split_opts = opts.pop("val", {}) or {}
    opts.pop("train", None)
    try:
        ds = build_dataset(cfg.data.name, split or cfg.data.val_split, root=cfg.data.root, train=False,
                           seed=cfg.data.seed, **opts, **split_opts)
    except ValueError as e:  # the datasets check their folders, splits and options
        raise ConfigError(f"--dataset {cfg.data.name}: {str(e).strip().splitlines()[0]}") from None
    if ds.num_classes != spec["num_classes"]:
        raise ConfigError(f"--dataset: {cfg.data.name} has {ds.num_classes} classes, the model predicts "
                          f"{spec['num_classes']}")
    if spec["in_channels"] != 4:
        return evaluate(model, ds, cfg, dev, None, None)
    # a label-assisted (LAD) teacher: it sees the deterministic label code at the amplitude it was
    # trained with; its score with the label channel zeroed says whether it reads the label at all
    from .distill.lad import recorded_label_scale, with_label

    scale = recorded_label_scale(state.get("config"))
    m = evaluate(model, ds, cfg, dev, None, lambda im, lab: with_label(im, lab, ds.num_classes, scale))
    blind = evaluate(model, ds, cfg, dev, None, lambda im, lab: with_label(im, lab, ds.num_classes, scale,
                                                                         zero_label=True))
    m["no_label"] = {k: blind[k] for k in ("miou", "pixel_acc", "per_class_iou")}
    return m
