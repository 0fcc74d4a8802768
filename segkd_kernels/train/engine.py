"""The training loop: one function, `train(cfg)`, for teachers, students and distilled students,
on one process or under torchrun (DDP), plus `evaluate`.

Reproducibility contract: the data order and every augmentation are functions of (seed, epoch, index)
and the step number, and a checkpoint holds every other piece of state (weights, optimiser, schedule,
grad scaler, RNG states, step), so `--resume` continues the interrupted run exactly. To keep that
promise a resumed run must keep its settings (config.RESUME_FREE_KEYS aside) unless the change is
accepted and recorded, and a run folder is never reused without --resume or --overwrite.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .config import Config, ConfigError, config_changes, describe_changes, validate
from .metrics import ConfusionMatrix, predict_slide, predict_whole, upsample_logits

IGNORE = 255


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM (its checkpoint is saved); multi-run commands stop with it."""

    def __init__(self, result: dict):
        self.result = result
        super().__init__(describe_stop(result, "run the same command again to continue"))


def train_or_raise(cfg: Config, **kw) -> dict:
    """train(), raising Interrupted instead of returning an unfinished result."""
    result = train(cfg, **kw)
    if result["status"] != "done":
        raise Interrupted(result)
    return result


def run_stage(cfg: Config, log, *, overwrite: bool = False) -> dict:
    """One run of a multi-run command (demo, compare), such that running the command again continues
    it: a finished run is reused, an interrupted one continues exactly from its checkpoint, a new one
    starts. Raises Interrupted when stopped, ConfigChanged when OUT holds a run with other settings."""
    if overwrite:
        log(f"  training from step 0 in {cfg.out} (--overwrite)")
        return train_or_raise(cfg, overwrite=True)
    path = ckpt.find_resume(cfg.out)
    if path is not None:
        if finished_result(cfg.out, cfg.iters) is not None:
            r = train_or_raise(cfg, resume=True)  # checks the settings, returns the stored result
            log(f"  finished earlier: reusing {cfg.out} (step {r['step']})")
            return r
        log(f"  continuing from the checkpoint of step {ckpt.load_checkpoint(path)['step']} ({path})")
        return train_or_raise(cfg, resume=True)
    entries = folder_entries(cfg.out)
    if entries and set(entries) <= set(RUN_FILES):
        # a run stopped before its first checkpoint (killed): nothing to continue from or to keep
        log(f"  {cfg.out} holds no checkpoint: training from step 0")
        return train_or_raise(cfg, overwrite=True)
    log(f"  training in {cfg.out}")
    return train_or_raise(cfg)


# ----------------------------------------------------------------------------------------- processes
@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # this module initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> DistEnv:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created=True)


def resolve_device(cfg: Config, env: DistEnv) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {cfg.device!r} asked for, but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{env.local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


# -------------------------------------------------------------------------------------------- data
def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, epoch, index) do not collide."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededItems(torch.utils.data.Dataset):
    """dataset[(epoch, i)]: item i with every global RNG seeded from (seed, epoch, i) for the call, so an
    augmentation is the same on any process, in any worker, before and after a resume."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        s = _mix(self.seed, epoch, i)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            py, npy = random.getstate(), np.random.get_state()
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class StepBatches(torch.utils.data.Sampler):
    """The batches of steps start..end-1: each epoch is a permutation drawn from (seed, epoch); a step's
    global batch is `batch_size` consecutive indices of it, and rank r takes its r-th slice. The same
    global batch therefore reaches the model whatever the number of processes."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, end: int, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ConfigError(f"data.batch_size: {batch_size} is larger than the training set ({n} images)")
        self.n, self.batch, self.seed, self.start, self.end = n, batch_size, seed, start, end
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size  # the incomplete last batch is dropped
        self.local = batch_size // world

    def __len__(self):
        return self.end - self.start

    def __iter__(self):
        perm, perm_epoch = None, -1
        for step in range(self.start, self.end):
            epoch, pos = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(_mix(self.seed, epoch, 7))
                perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            lo = pos * self.batch + self.rank * self.local
            yield [(epoch, i) for i in perm[lo:lo + self.local]]


SPLIT_OPTION_KEYS = ("train", "val", "holdout")  # data.options sub-mappings with one split's options


def build_datasets(cfg: Config):
    from .data import build_dataset

    opts = dict(cfg.data.options)
    split_opts = {s: opts.pop(s, {}) or {} for s in SPLIT_OPTION_KEYS}
    common = dict(root=cfg.data.root, seed=cfg.data.seed)
    train_set = build_dataset(cfg.data.name, cfg.data.train_split, train=True, crop_size=cfg.data.crop_size,
                              scale_range=tuple(cfg.data.scale_range), flip=cfg.data.flip,
                              **common, **opts, **split_opts["train"])
    # the evaluated split takes the options given under its own name (holdout: ...), else those under val
    eval_opts = split_opts.get(cfg.data.val_split) or split_opts["val"]
    val_set = build_dataset(cfg.data.name, cfg.data.val_split, train=False, **common, **opts, **eval_opts)
    return train_set, val_set


def _collate(items):
    images = torch.stack([it[0] for it in items])
    labels = torch.stack([it[1] for it in items])
    return images, labels


# ------------------------------------------------------------------------------------------ models
MODEL_KEYS = ("arch", "backbone", "width", "output_stride", "aux")


def model_spec(mcfg, num_classes: int, in_channels: int = 3) -> dict:
    spec = {k: getattr(mcfg, k) for k in MODEL_KEYS}
    spec.update(num_classes=num_classes, in_channels=in_channels)
    if getattr(mcfg, "deep_stem", False):  # recorded only when set: older checkpoints' specs stay equal
        spec["deep_stem"] = True
    if getattr(mcfg, "aspp_rates", None):  # likewise
        spec["aspp_rates"] = [int(r) for r in mcfg.aspp_rates]
    return spec


def build_from_spec(spec: dict, backbone_weights: str | None = None) -> nn.Module:
    from .models import build_model

    return build_model(spec["arch"], spec["backbone"], spec["num_classes"], output_stride=spec["output_stride"],
                       width=spec["width"], in_channels=spec["in_channels"], aux=spec["aux"],
                       backbone_weights=backbone_weights, deep_stem=spec.get("deep_stem", False),
                       aspp_rates=spec.get("aspp_rates"))


def model_from_state(state: dict, device="cpu") -> nn.Module:
    """The model of a loaded checkpoint, in eval mode."""
    model = build_from_spec(state["model_spec"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_model(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """A model saved by `train` (any stage), in eval mode, and its checkpoint's metadata."""
    state = ckpt.load_checkpoint(path)
    return model_from_state(state, device), state


def describe_spec(spec: dict | None) -> str:
    if not spec:
        return "unknown"
    return (f"{spec['arch']}-{spec['backbone']}{' deep-stem' if spec.get('deep_stem') else ''} x{spec['width']:g} "
            f"(os {spec['output_stride']}, "
            f"{spec['num_classes']} classes)")


class Objective(nn.Module):
    """Student (or teacher being trained) + distiller: forward returns the named loss terms. DDP wraps
    this module, so the distiller's adapters are synchronised like the model."""

    def __init__(self, model: nn.Module, distiller: nn.Module | None, cfg: Config, num_classes: int):
        super().__init__()
        self.model, self.distiller = model, distiller
        self.aux_weight, self.num_classes = cfg.aux_weight, num_classes
        self.lad_teacher = cfg.stage == "teacher" and cfg.method == "lad"
        self.lad_options = dict(cfg.distill.options)
        self.backend = cfg.backend
        self.step = 0  # the training loop sets it before each forward (schedules inside the objective)
        # a recipe's normalisation of the task loss (AttnFD's upstream divides it by the batch size)
        self.task_scale = distiller.task_scale(cfg.data.batch_size) if distiller is not None else 1.0

    class_weight: torch.Tensor | None = None  # task_loss balanced_ce: set by the trainer (a buffer-free tensor)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = None if self.class_weight is None else self.class_weight.to(logits.device)
        return F.cross_entropy(upsample_logits(logits, labels.shape[-2:]).float(), labels, weight=w,
                               ignore_index=IGNORE)

    def forward(self, images, labels, teacher_out=None):
        if self.lad_teacher:
            from .distill.lad import LAD

            o = {**LAD.default_options, **self.lad_options}
            return LAD.teacher_losses(self.model, images, labels, self.num_classes, self.task_loss, tau=o["tau"],
                                      cwd_weight=o["teacher_cwd"], aux_weight=o["teacher_aux"],
                                      backend=self.backend, label_scale=o["label_scale"], step=self.step,
                                      rampup_iters=o["consistency_rampup"])
        out = self.model(images)
        losses = {"ce": self.task_scale * self.task_loss(out["logits"], labels)}
        if "aux" in out and self.aux_weight > 0:
            losses["aux"] = self.task_scale * self.aux_weight * self.task_loss(out["aux"], labels)
        if self.distiller is not None:
            losses.update(self.distiller(out, teacher_out, labels))
        return losses


def _train_mode(objective: nn.Module, bn_eval: bool) -> None:
    """Training mode; with bn_eval, BatchNorm layers normalise with their running statistics and leave
    them unchanged, which makes every sample's gradient independent of the rest of the batch."""
    objective.train()
    if bn_eval:
        for m in objective.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def class_frequencies(dataset, num_classes: int, max_images: int = 500) -> torch.Tensor:
    """Pixel frequency of each class over the first `max_images` images of `dataset` (ignored pixels
    left out): enough images that the weights do not depend on which ones for the synthetic data."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(min(len(dataset), max_images)):
        lab = dataset.load(i)[1] if hasattr(dataset, "load") else dataset[i][1]
        lab = lab[lab != IGNORE]
        counts += torch.bincount(lab.flatten(), minlength=num_classes)[:num_classes].double()
    return counts / counts.sum().clamp_min(1)


def balanced_class_weights(freq: torch.Tensor) -> torch.Tensor:
    """Median-frequency balancing (Eigen & Fergus 2015): weight_c = median(freq) / freq_c over the classes
    present; absent classes get weight 0 (they have no pixels to weigh)."""
    present = freq > 0
    w = torch.zeros_like(freq)
    w[present] = freq[present].median() / freq[present]
    return w.float()


def onehot_logits(labels: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    """The knowledge-free control teacher's logits: scale x one-hot(labels), (N, K, H, W); ignored
    pixels get all-zero logits (a uniform distribution)."""
    valid = labels != IGNORE
    oh = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return oh * (scale * valid[:, None].float())


def poly_lambda(iters: int, power: float, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - step / iters) ** power

    return f


def build_optimizer(cfg: Config, objective: Objective):
    backbone = getattr(objective.model, "backbone", None)
    bb_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    params = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in bb_ids], "lr": cfg.optim.lr},
              {"params": [p for p in params if id(p) not in bb_ids], "lr": cfg.optim.lr * cfg.optim.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                              nesterov=o.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(cfg.iters, o.power, o.warmup_iters))
    return opt, sched


# ------------------------------------------------------------------------------------------ output
class Progress:
    """A one-line progress bar on stderr (a plain log line every `every` steps when not a terminal)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool, stream=None):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, losses: dict, lr: float, images_per_step: int) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.start
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
        width = 20
        filled = int(width * step / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {terms} lr {lr:.2e} "
                f"{rate:.2f} it/s {rate * images_per_step:.1f} img/s ETA {int(eta) // 60:02d}:{int(eta) % 60:02d}")
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(120))
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Logger:
    """JSON lines in OUT/log.jsonl, plus TensorBoard scalars when tensorboard is installed (rank 0)."""

    def __init__(self, out: str, enabled: bool):
        self.enabled = enabled
        self.file = self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        self.file = open(os.path.join(out, "log.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (or evaluation batch); it then saves a
    checkpoint. A second signal is noted and ignored; a third stops at once (KeyboardInterrupt, for a
    hung step) unless a checkpoint is being written: raising there would leave the run without one."""

    def __init__(self):
        self.signum = 0
        self.count = 0
        self.saving = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self.signum = signum
            return
        if self.count >= 3 and not self.saving:
            raise KeyboardInterrupt
        # os.write, not print: the handler may run while the main thread is inside a write to stderr
        os.write(2, f"segkd: already stopping (signal {signum} ignored): a checkpoint is saved before exiting"
                    f"{'' if self.saving else '; a third signal stops at once, without one'}\n".encode())

    @contextlib.contextmanager
    def saving_checkpoint(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False


# -------------------------------------------------------------------------------------------- eval
class EvalStopped(Exception):
    """An evaluation abandoned because a stop was requested (its result is not logged)."""


@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: Config, device, env: DistEnv | None = None,
             input_fn=None, max_images: int | None = None, should_stop=None) -> dict:
    """mIoU, per-class IoU and pixel accuracy of `model` on `dataset` (whole or sliding-window).
    Under DDP each rank takes every world-th image and the confusion matrices are summed.
    should_stop() is asked before every batch (on every rank the same number of times, as it may be a
    collective); when it says so, EvalStopped is raised."""
    env = env or DistEnv()
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, getattr(dataset, "ignore_index", IGNORE), device=device)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    idx = list(range(env.rank, n, env.world))
    bs = cfg.data.eval_batch_size
    amp = _autocast(cfg, device)
    most = len(range(0, n, env.world))  # rank 0 holds the most images
    for lo in range(0, most, bs):
        if should_stop is not None and should_stop():
            model.train(was_training)
            raise EvalStopped
        if lo >= len(idx):
            continue
        images, labels = _collate([dataset[i] for i in idx[lo:lo + bs]])
        images, labels = images.to(device), labels.to(device)
        x = input_fn(images, labels) if input_fn else images
        with amp():
            if cfg.data.eval_mode == "slide":
                window = cfg.data.eval_crop or cfg.data.crop_size or min(x.shape[-2:])
                window = (window, window) if isinstance(window, int) else tuple(window)
                stride = cfg.data.eval_stride or tuple(max(1, (2 * w) // 3) for w in window)
                logits = predict_slide(model, x, window, stride, dataset.num_classes)
            else:
                logits = predict_whole(model, x)
        cm.update(logits.argmax(1), labels)
    cm.all_reduce()
    model.train(was_training)
    return cm.compute(getattr(dataset, "class_names", None))


def _autocast(cfg: Config, device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------- train
METRICS = "metrics.json"
# A run folder's own files, checkpoints first: clearing in this order never leaves a checkpoint next to
# the logs of another run (an interrupted clear leaves stale logs at most, and nothing to resume them).
RUN_FILES = (ckpt.LAST, ckpt.PREV, ckpt.LAST + ".tmp", METRICS, "log.jsonl", "config.json", "tb")


class ConfigChanged(ConfigError):
    """--resume with settings that differ from the run's; `changes` is {key: (old, new)}."""

    def __init__(self, message: str, out: str, changes: dict):
        super().__init__(message)
        self.out, self.changes = out, changes


def folder_entries(out: str) -> list[str]:
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


def clear_run(out: str) -> None:
    """Delete the files a run writes into `out` (other files stay)."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def finished_result(out: str, iters: int) -> dict | None:
    """The stored result of the run in `out` if it finished at step `iters`, final evaluation included."""
    try:
        with open(os.path.join(out, METRICS)) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or r.get("status") != "done" or r.get("step") != iters or "metrics" not in r:
        return None
    r["checkpoint"] = os.path.join(out, ckpt.LAST)
    return r


def describe_stop(result: dict, how_to_continue: str) -> str:
    """One line saying where a run stopped, what was saved, and how to continue."""
    where = "during the final evaluation" if result.get("stopped_in") == "final evaluation" else ""
    saved = f"checkpoint {'of step ' + str(result['step']) + ' ' if where else ''}saved in {result['checkpoint']}"
    return f"interrupted at step {result['step']}{' ' + where if where else ''}; {saved}; {how_to_continue}"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def train(cfg: Config, *, resume: bool | str = False, overwrite: bool = False, allow_config_change: bool = False,
          callback=None, quiet: bool = False) -> dict:
    """Run (or continue) one experiment; returns {"status", "step", "metrics", "out", ...}.

    resume: True continues from OUT/last.pt (or prev.pt), a path continues from that file. The run's
    settings must be the checkpoint's (except those in config.RESUME_FREE_KEYS); allow_config_change
    accepts other settings and records the change in log.jsonl and config.json. Resuming a finished
    run returns its stored result.
    overwrite: start over in a folder that already holds files (the run's own files are deleted
    first). Without it, or resume, a non-empty folder is refused: a repeated command never silently
    replaces a run.
    callback(step, losses) is called after every step (tests use it to interrupt a run).
    """
    cfg = copy.deepcopy(cfg)  # the caller's object stays as given (the teacher's fields are filled in)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or start it over")
    validate(cfg)
    device_kind = "cuda" if (cfg.device == "auto" and torch.cuda.is_available()) or cfg.device.startswith("cuda") else "cpu"
    env = setup_distributed(device_kind)
    try:
        result = _train(cfg, env, resume, overwrite, allow_config_change, callback, quiet)
        if env.created:
            # Every rank has left its last collective before any rank tears the group down: a gloo rank
            # destroyed while its peer still talks to it can abort the peer's process.
            dist.barrier()
        return result
    finally:
        if env.created:
            dist.destroy_process_group()


def get_method_options(name: str) -> dict:
    from .distill import get_method

    return dict(get_method(name).default_options)


def _lad_scale_from_teacher(cfg: Config, tstate: dict) -> None:
    """A LAD student feeds its teacher the label code at the amplitude the teacher was trained with."""
    from .distill.lad import recorded_label_scale

    trained = recorded_label_scale(tstate.get("config"))
    asked = cfg.distill.options.get("label_scale")
    if asked is not None and float(asked) != trained:
        raise ConfigError(f"distill.options.label_scale: {asked} differs from the {trained} the teacher "
                          f"{cfg.teacher.checkpoint!r} was trained with; leave it unset to use the teacher's")
    cfg.distill.options["label_scale"] = trained


def _lad_warm_start(model: nn.Module, spec: dict, path: str) -> None:
    """The label-assisted teacher starts from a trained plain teacher of the same architecture."""
    from .distill.lad import warm_start_state

    init = ckpt.load_checkpoint(path)
    ispec = init.get("model_spec") or {}
    differ = [k for k in ("arch", "backbone", "width", "output_stride", "num_classes") if ispec.get(k) != spec[k]]
    if bool(ispec.get("deep_stem")) != bool(spec.get("deep_stem")):
        differ.append("deep_stem")
    if differ:
        raise ConfigError(f"distill.options.warm_start: {path!r} holds a {describe_spec(ispec)} model, the LAD "
                          f"teacher is a {describe_spec(spec)} (differs in {', '.join(differ)}); warm-start from a "
                          f"plain teacher of the same architecture (same_arch=true builds the student's)")
    if ispec.get("in_channels") != 3:
        raise ConfigError(f"distill.options.warm_start: {path!r} is not a plain 3-channel model")
    try:
        model.load_state_dict(warm_start_state(model.state_dict(), init["model"]))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def _train(cfg: Config, env: DistEnv, resume, overwrite, allow_change, callback, quiet) -> dict:
    device = resolve_device(cfg, env)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.sync_bn and env.world > 1 and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm runs on GPUs only; on CPU use bn_eval=true or sync_bn=false")
    if cfg.data.batch_size % env.world:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} does not split over {env.world} processes")

    # The run folder: every rank looks before anything is written (hence the barrier); rank 0 clears.
    entries = folder_entries(cfg.out)
    if entries and not resume and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"out: {cfg.out!r} is not empty ({shown}); continue its run with --resume, start it "
                          f"over with --overwrite (deletes its checkpoints and logs), or choose another --out")
    _barrier(env)
    if overwrite and entries and env.main:
        clear_run(cfg.out)

    # The teacher to distil from: its checkpoint decides its architecture, and the recorded config
    # says what that checkpoint holds (whatever teacher.* said before).
    distilling = cfg.stage == "student" and cfg.method != "none"
    onehot_teacher = distilling and cfg.distill.teacher == "onehot"
    lad_teacher = cfg.stage == "teacher" and cfg.method == "lad"
    if lad_teacher and cfg.distill.options.get("same_arch"):
        # the official LAD teacher is a copy of the student's network (plus the label channel); the
        # recorded config says so (teacher.aux stays the teacher's own choice)
        for k in ("arch", "backbone", "width", "output_stride", "deep_stem", "backbone_weights"):
            setattr(cfg.teacher, k, getattr(cfg.student, k))
    tstate = None
    if distilling and not onehot_teacher:
        tstate = ckpt.load_checkpoint(cfg.teacher.checkpoint)
        for k in MODEL_KEYS:
            setattr(cfg.teacher, k, tstate["model_spec"][k])
        cfg.teacher.deep_stem = bool(tstate["model_spec"].get("deep_stem", False))
        if cfg.method == "lad":
            _lad_scale_from_teacher(cfg, tstate)

    state, config_history, changes = None, [], {}
    if resume:
        path = resume if isinstance(resume, str) else ckpt.find_resume(cfg.out)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {cfg.out!r} (looked for last.pt, prev.pt)")
        try:
            state = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(str(e) + ckpt.describe_fallback(cfg.out, path)) from None
        if state["step"] > cfg.iters:
            raise ConfigError(f"iters: the checkpoint {path!r} is at step {state['step']}, past iters={cfg.iters}; "
                              f"resume with iters of at least {state['step']}")
        changes = config_changes(state.get("config") or {}, cfg.to_dict())
        if changes and not allow_change:
            raise ConfigChanged(
                f"--resume: settings differ from the run's ({describe_changes(changes)}); that would not continue "
                f"the run exactly: resume with its settings, or pass --allow-config-change to go on with these "
                f"(recorded in log.jsonl and config.json)", cfg.out, changes)
        config_history = list(state.get("config_changes") or [])
        if changes:
            config_history.append({"step": state["step"], "changes": {k: list(v) for k, v in changes.items()}})
        elif state["step"] == cfg.iters and not state.get("eval_due"):
            done = finished_result(cfg.out, cfg.iters)
            if done is not None:  # nothing left to do: the stored result
                done.update(already_done=True, main=env.main, history=[], signal=0)
                return done
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    try:
        train_set, val_set = build_datasets(cfg)
    except ValueError as e:  # the datasets check their options and folders
        raise ConfigError(f"data: {_first_line(e)}") from None
    num_classes = train_set.num_classes
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise ConfigError(f"data.num_classes: the dataset has {num_classes} classes, the config says "
                          f"{cfg.data.num_classes}")

    # Teacher (frozen, eval mode) and distiller.
    teacher = distiller = None
    if distilling and not onehot_teacher:
        from .distill import build_distiller, get_method

        tspec = tstate["model_spec"]
        need_in = get_method(cfg.method).teacher_in_channels
        if tspec["in_channels"] != need_in:
            raise ConfigError(f"teacher.checkpoint: method {cfg.method!r} needs a teacher with {need_in} input "
                              f"channels, {cfg.teacher.checkpoint!r} has {tspec['in_channels']}"
                              + (" (train it with --stage teacher --method lad)" if cfg.method == "lad" else ""))
        if tspec["num_classes"] != num_classes:
            raise ConfigError(f"teacher.checkpoint: the teacher predicts {tspec['num_classes']} classes, "
                              f"the dataset has {num_classes}")
        teacher = model_from_state(tstate, device)
        teacher.requires_grad_(False)
        del tstate
    if cfg.stage == "teacher":
        mcfg = cfg.teacher
        in_ch = 4 if cfg.method == "lad" else 3
    else:
        mcfg, in_ch = cfg.student, 3
    spec = model_spec(mcfg, num_classes, in_ch)
    if state is not None and state.get("model_spec") != spec:
        raise ConfigError(f"--resume: the checkpoint holds a {describe_spec(state.get('model_spec'))} model, these "
                          f"settings build a {describe_spec(spec)}: a run cannot change its model")
    # Seeded right here: identical initial weights on every rank, and the same student whatever the
    # method (the teacher built above does not shift the stream).
    torch.manual_seed(cfg.seed)
    model = build_from_spec(spec, mcfg.backbone_weights)
    if cfg.stage == "student" and mcfg.checkpoint:  # teacher.checkpoint is the teacher to distil from
        init = ckpt.load_checkpoint(mcfg.checkpoint)
        model.load_state_dict(init["model"])
    if lad_teacher and cfg.distill.options.get("warm_start") and state is None:
        _lad_warm_start(model, spec, cfg.distill.options["warm_start"])
    if distilling:
        from .distill import build_distiller

        if onehot_teacher:
            # the distiller declares every point it may read; validate() has refused any active term
            # on a point other than the logits, so those entries are never read
            from .distill import get_method

            t_channels = {p: num_classes for p in get_method(cfg.method).teacher_points}
        else:
            t_channels = teacher.feature_channels
        distiller = build_distiller(cfg.method, model.feature_channels, t_channels, num_classes,
                                    weights=cfg.distill.weights, options=cfg.distill.options, backend=cfg.backend)
    objective = Objective(model, distiller, cfg, num_classes)
    if cfg.task_loss == "balanced_ce":
        objective.class_weight = balanced_class_weights(class_frequencies(train_set, num_classes))
    if cfg.sync_bn and env.world > 1:
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    objective.to(device)
    _train_mode(objective, cfg.bn_eval)
    torch.manual_seed(_mix(cfg.seed, env.rank, 1))  # per-rank streams for noise drawn during training

    opt, sched = build_optimizer(cfg, objective)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start, prior_seconds, prior_timed = 0, 0.0, (0.0, 0)
    if state is not None:
        if (state.get("distiller") is None) != (distiller is None):
            raise ConfigError("--resume: the checkpoint " + ("has no distiller, these settings distil" if distiller
                              is not None else "holds a distiller, these settings train without one"))
        try:
            objective.model.load_state_dict(state["model"])
            if distiller is not None:
                distiller.load_state_dict(state["distiller"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(
                f"--resume: the checkpoint does not fit these settings: {_first_line(e)}") from None
        start = state["step"]
        prior_seconds = float(state.get("train_seconds", 0.0))
        prior_timed = tuple(state.get("timed_steps", (0.0, 0)))
        rng = state["rng"][env.rank] if env.rank < len(state["rng"]) else state["rng"][0]
        ckpt.set_rng_state(rng)
    eval_pending = bool(state is not None and state.get("eval_due"))
    del state
    wrapped = objective
    if env.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = StepBatches(len(train_set), cfg.data.batch_size, cfg.seed, start, cfg.iters, env.rank, env.world)
    loader = torch.utils.data.DataLoader(
        SeededItems(train_set, cfg.seed), batch_sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0),
        persistent_workers=False)
    amp = _autocast(cfg, device)
    logger = Logger(cfg.out, env.main)
    if env.main:
        record = cfg.to_dict()
        if config_history:  # the settings in force now, and what changed on which resume
            record["changes"] = config_history
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(record, f, indent=1)
        if changes:
            logger.log({"kind": "config_change", "step": start,
                        "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}})
    progress = Progress(cfg.iters, start, cfg.log_every, env.main and cfg.progress and not quiet)
    teacher_in = distiller.teacher_input if distiller is not None else None
    if teacher is not None and distiller.teacher_train_mode:
        # batch statistics and dropout, as the method's official code runs its teacher; the running
        # statistics it updates are never read (the teacher is not evaluated or saved)
        teacher.train()
    step_times: list[float] = []
    t_start = time.perf_counter()

    def save(step: int, eval_due: bool = False) -> str | None:
        # every rank's RNG state is gathered so each rank resumes its own stream
        rngs = [ckpt.rng_state()]
        if env.world > 1:
            rngs = [None] * env.world
            dist.all_gather_object(rngs, ckpt.rng_state())
        if not env.main:
            return None
        with stop.saving_checkpoint():
            return _save(step, eval_due, rngs)

    def _save(step, eval_due, rngs):
        return ckpt.save_checkpoint({
            "step": step, "model": objective.model.state_dict(),
            "distiller": distiller.state_dict() if distiller is not None else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": rngs, "model_spec": spec, "config": cfg.to_dict(), "world": env.world,
            # eval_due: the evaluation of this step was due and not logged; a resume runs it first
            "eval_due": eval_due, "config_changes": config_history,
            "train_seconds": prior_seconds + time.perf_counter() - t_start,
            "timed_steps": (prior_timed[0] + sum(step_times), prior_timed[1] + len(step_times)),
        }, os.path.join(cfg.out, ckpt.LAST))

    def stop_requested() -> bool:
        flag = stop.signum
        if env.world > 1:  # every rank stops at the same point
            t = torch.tensor([flag], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def run_eval(step: int) -> dict | None:
        """The evaluation at `step`, logged; None when a stop request cut it short (nothing logged)."""
        in_fn = blind_fn = None
        if lad_teacher:
            from .distill.lad import with_label

            scale = {**get_method_options("lad"), **cfg.distill.options}["label_scale"]
            in_fn = lambda im, lab: with_label(im, lab, num_classes, scale)  # noqa: E731
            blind_fn = lambda im, lab: with_label(im, lab, num_classes, scale, zero_label=True)  # noqa: E731
        try:
            m = evaluate(objective.model, val_set, cfg, device, env, in_fn, should_stop=stop_requested)
            if blind_fn is not None:
                # the label channel zeroed: a teacher that reads the label drops here (the check that it does)
                blind = evaluate(objective.model, val_set, cfg, device, env, blind_fn, should_stop=stop_requested)
                m["no_label"] = {k: blind[k] for k in ("miou", "pixel_acc", "per_class_iou")}
        except EvalStopped:
            return None
        finally:
            _train_mode(objective, cfg.bn_eval)
        record = {"kind": "eval", "step": step, "miou": m["miou"], "pixel_acc": m["pixel_acc"],
                  "per_class_iou": m["per_class_iou"]}
        if "no_label" in m:
            record.update(miou_no_label=m["no_label"]["miou"], pixel_acc_no_label=m["no_label"]["pixel_acc"])
        logger.log(record)
        return m

    status, step, metrics, stopped_in, seg_seconds = "done", start, None, None, None
    history = []
    with StopFlag() as stop:
        if eval_pending and start < cfg.iters and run_eval(start) is None:
            status, stopped_in = "interrupted", "evaluation"  # its checkpoint still says it is due
        t0 = time.perf_counter()
        for images, labels in (loader if status == "done" else ()):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            objective.step = step  # the step about to be taken (0-based)
            with amp():
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(teacher_in(images, labels))
                elif onehot_teacher:
                    t_out = {"logits": onehot_logits(labels, num_classes, cfg.distill.onehot_scale)}
                losses = wrapped(images, labels, t_out)
                loss = sum(losses.values())
            scaler.scale(loss).backward()
            if distiller is not None:
                for p in distiller.frozen_parameters(step, sampler.per_epoch, objective.model):
                    p.grad = None  # this phase of the recipe does not update them
            if cfg.optim.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # fp16: the grad scaler skips the optimiser step while it calibrates its scale; the
                # schedule still follows the step count
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                sched.step()
            step += 1
            step_times.append(time.perf_counter() - t0)  # data loading included
            t0 = time.perf_counter()
            detached = {k: v.detach().float() for k, v in losses.items()}
            if env.world > 1:  # the logged losses are the means over every rank's share of the batch
                stacked = torch.stack(list(detached.values()))
                dist.all_reduce(stacked)
                detached = dict(zip(detached, stacked / env.world))
            values = {k: v.item() for k, v in detached.items()}
            values = {"loss": sum(values.values()), **values}
            history.append(values)
            if not all(math.isfinite(v) for v in values.values()) and cfg.precision != "fp16":
                raise FloatingPointError(f"step {step}: non-finite loss {values}")
            lr = sched.get_last_lr()[0]
            if step % cfg.log_every == 0 or step == cfg.iters:
                logger.log({"kind": "train", "step": step, "lr": lr, **values,
                            "sec_per_iter": sum(step_times[-cfg.log_every:]) / len(step_times[-cfg.log_every:])})
            progress.update(step, values, lr, cfg.data.batch_size)
            if callback is not None:
                callback(step, values)
            # The evaluation comes before this step's checkpoint, so a checkpoint never predates an
            # evaluation logged at its step; when a stop request comes first (or cuts it short), the
            # checkpoint records it as due and the resumed run runs it before its next step.
            eval_due = bool(cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters)
            stopping = stop_requested()
            if eval_due and not stopping:
                eval_due = stopping = run_eval(step) is None
            if stopping:
                save(step, eval_due=eval_due)
                status, stopped_in = "interrupted", "training"
                break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.iters:
                save(step)
        progress.close()
        seg_seconds = time.perf_counter() - t_start
        if status == "done":
            if step > start:  # resuming a run stopped in its final evaluation: its checkpoint is this one
                save(step)
            metrics = run_eval(step)
            if metrics is None:  # the checkpoint is saved: a resume runs the final evaluation
                status, stopped_in = "interrupted", "final evaluation"
    timed = (prior_timed[0] + sum(step_times), prior_timed[1] + len(step_times))
    result = {"status": status, "step": step, "out": cfg.out, "signal": stop.signum,
              "train_seconds": prior_seconds + seg_seconds,
              "sec_per_iter": timed[0] / timed[1] if timed[1] else float("nan"),
              "steps_run": step - start, "resumed_from": start if resume else None, "history": history}
    if status == "done":
        result["metrics"] = metrics
        if env.main:
            with open(os.path.join(cfg.out, METRICS), "w") as f:
                json.dump({k: v for k, v in result.items() if k != "history"}, f, indent=1)
    else:
        result["stopped_in"] = stopped_in
    result["checkpoint"] = os.path.join(cfg.out, ckpt.LAST)
    result["main"] = env.main  # only the main process reports (torchrun starts one per device)
    logger.close()
    return result
