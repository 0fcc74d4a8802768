"""`segkd eval`: a trained checkpoint on a dataset split, whole-image or sliding-window."""

from __future__ import annotations

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, _merge, apply_override
from .engine import DistEnv, build_from_spec, evaluate, resolve_device


def evaluate_checkpoint(path: str, *, dataset: str | None = None, split: str | None = None, mode: str | None = None,
                        overrides=(), device: str | None = None) -> dict:
    """Metrics of the model in checkpoint `path`; the data settings default to the run's own config."""
    from .data import build_dataset

    state = ckpt.load_checkpoint(path)
    cfg = Config()
    _merge(cfg, state["config"])
    if dataset:
        cfg.data.name = dataset
    if mode:
        cfg.data.eval_mode = mode
    if device:
        cfg.device = device
    for o in overrides:
        apply_override(cfg, o)
    spec = state["model_spec"]
    model = build_from_spec(spec)
    model.load_state_dict(state["model"])
    dev = resolve_device(cfg, DistEnv())
    model.to(dev).eval()
    opts = dict(cfg.data.options)
    split_opts = opts.pop("val", {}) or {}
    opts.pop("train", None)
    ds = build_dataset(cfg.data.name, split or cfg.data.val_split, root=cfg.data.root, train=False,
                       seed=cfg.data.seed, **opts, **split_opts)
    if ds.num_classes != spec["num_classes"]:
        raise ConfigError(f"--dataset: {cfg.data.name} has {ds.num_classes} classes, the model predicts "
                          f"{spec['num_classes']}")
    in_fn = None
    if spec["in_channels"] == 4:  # a label-assisted (LAD) teacher: it sees the deterministic label code
        from .distill.lad import label_channel

        in_fn = lambda im, lab: torch.cat([im, label_channel(lab, ds.num_classes, train=False).to(im.dtype)], 1)  # noqa: E731
    return evaluate(model, ds, cfg, dev, None, in_fn)
