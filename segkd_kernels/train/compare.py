"""`segkd compare`: paired comparison of distillation methods on the synthetic benchmark.

Every method trains from its shipped synthetic config (`<method>_synthetic.yaml`; the student alone and
the class-balanced control from `_synthetic.yaml`), cut to the preset's budget. For each seed, every run
of one student architecture starts from the same initial weights and sees the same batches (the
trainer seeds both from `seed`), so a method's effect is measured per seed as a paired difference
against the student alone of the same architecture and seed. Per method the table gives the mean
paired difference with a 95% Student-t interval over the seeds and the number of seeds it helped on.

Teachers are trained once per teacher config and kept in a cache folder keyed by the teacher's
settings and a hash of the training code, so every method of every comparison distils from the same
teacher (LAD: its own label-assisted teacher).

Controls: `<m>:onehot` distils method m (kd or cwd) from a knowledge-free teacher whose logits are 10x
the one-hot ground truth, and `balanced_ce` is the student alone with median-frequency class weights:
a method that beats the student alone but not these has reweighted the labels, not transferred
knowledge.

Loss-weight sweep (`sweep=True`): each method with every loss weight x0.3, x1 and x3, evaluated on the
holdout split (never on the reported val split), with its own student-alone pairs on that split.

Everything is resumable: a finished run is reused (after checking its settings), an interrupted one
continues from its checkpoint. Writes compare.md, .csv, .json and compare.png (matplotlib) to `out`,
and sweep.md / .csv / .json when sweeping; compare.md ends with what the intervals support (which
methods are above / below the student alone and the controls) and the task's margins (teacher over the
student alone, the student's spread over seeds).

Cost: every run records the CPU time (user + system of its process) and wall time its training took in
`cost.json` (summed over resumes), and the tables report the sums for the teachers, the val-split runs
and the sweep, with this invocation's getrusage (self + children). `workers` > 1 trains that many runs at
once in worker processes of `threads` (default 1) torch threads each; the runs that need no teacher
(students alone, controls) start while the teachers train, and a teacher's runs as soon as it is trained.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

# Budgets. "full": the shipped synthetic configs as they are. "quick": a cut for a first look.
# "smoke": seconds, for tests of the plumbing, never for results.
PRESETS = {
    # the teachers train once (cached) for 5x the students' 300 iterations: see _synthetic.yaml
    "full": dict(teacher_iters=1500),
    "quick": dict(image_size=48, train_images=1000, val_images=250, holdout_images=200, iters=150, teacher_iters=600),
    # 32 px: the smallest size at which every method runs (SKD pools the 4x4 logit map to 2x2)
    "smoke": dict(image_size=32, train_images=8, val_images=2, holdout_images=2, iters=2, batch_size=4,
                  width=0.0625),
}
DEFAULT_METHODS = ("kd", "cwd", "skd", "pfs", "cirkd", "ssim", "attnfd", "lad")
DEFAULT_CONTROLS = ("cwd:onehot", "balanced_ce")
SWEEP_FACTORS = (0.3, 1.0, 3.0)
ONEHOT_METHODS = ("kd", "cwd")
# The code a trained teacher depends on: a change to any of these files gives new cache keys.
TEACHER_CODE = ("engine.py", "checkpoint.py", "metrics.py", "models", "data", "distill/lad.py", "distill/base.py")


# ------------------------------------------------------------------------------------------ statistics
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with df degrees of freedom: bisection on the CDF,
    which is 1/2 + the integral of the density from 0 (Simpson's rule on 4000 intervals; the density is
    smooth, so the error is far below the 1e-6 the bisection stops at)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x):
        return math.exp(logc - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x):
        n = 4000
        h = x / n
        s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
        return 0.5 + s * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_stats(diffs: list[float], level: float = 0.95) -> dict:
    """Mean of paired differences with its two-sided `level` t-interval: mean +- t * sd / sqrt(n), sd the
    sample standard deviation (n - 1). n = 1 gives no interval (nan)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "half": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "helped": 0}
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else float("nan")
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half,
            "helped": sum(d > 0 for d in diffs)}


# --------------------------------------------------------------------------------------------- configs
def code_version() -> str:
    """A hash of the training code a teacher depends on (TEACHER_CODE, file names and contents)."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for item in TEACHER_CODE:
        path = os.path.join(root, item)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py"))
        for f in files:
            h.update(os.path.relpath(f, root).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _settings(cfg) -> dict:
    """What a run computes: its config without the settings that only say where and how visibly."""
    from .config import RESUME_FREE_KEYS, flatten

    return {k: v for k, v in sorted(flatten(cfg.to_dict()).items()) if k not in RESUME_FREE_KEYS}


def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_key(cfg, code: str | None = None) -> str:
    """The cache key of a teacher run: its settings (the student's only where the LAD teacher copies the
    student's architecture) and the code version."""
    s = _settings(cfg)
    if not (cfg.method == "lad" and cfg.distill.options.get("same_arch")):
        s = {k: v for k, v in s.items() if not k.startswith("student.")}
    return _key({"settings": s, "code": code or code_version()})


def method_config(method: str, preset: str, *, overrides=(), device: str = "auto", iters: int | None = None):
    """The shipped synthetic config of `method` ("none": `_synthetic.yaml`), cut to the preset."""
    from .config import apply_override, list_configs, load_config

    name = f"{method}_synthetic" if method != "none" else "_synthetic"
    if method != "none" and name not in list_configs():
        from .config import ConfigError

        raise ConfigError(f"--methods: method {method!r} has no shipped synthetic config ({name}.yaml)")
    cfg = load_config(name)
    p = PRESETS[preset]
    if "image_size" in p:
        cfg.data.crop_size = p["image_size"]
        cfg.data.options = {"image_size": p["image_size"], "train": {"num_images": p["train_images"]},
                            "val": {"num_images": p["val_images"]}, "holdout": {"num_images": p["holdout_images"]}}
    if "iters" in p:
        cfg.iters = p["iters"]
    if "batch_size" in p:
        cfg.data.batch_size = p["batch_size"]
    if "width" in p:
        cfg.student.width = cfg.teacher.width = p["width"]
    if iters:
        cfg.iters = iters
    cfg.device, cfg.progress = device, False
    cfg.log_every = max(1, cfg.iters // 20)
    if cfg.distill.options.get("connector_epochs") and preset == "smoke":
        cfg.distill.options["connector_epochs"] = 0.0  # 2 iterations: no room for a connector phase
    for o in overrides:
        apply_override(cfg, o)
    return cfg


def variant_config(name: str, preset: str, *, seed: int, split: str = "val", factor: float = 1.0, overrides=(),
                   device: str = "auto", iters: int | None = None):
    """The config of one compared run: a method, a control (`m:onehot`, `balanced_ce`), or the student
    alone ("none"), on `split`, with every distillation loss weight times `factor`."""
    method = name.split(":")[0] if name != "balanced_ce" else "none"
    cfg = method_config(method, preset, overrides=overrides, device=device, iters=iters)
    if name.endswith(":onehot"):
        cfg.distill.teacher = "onehot"
    if name == "balanced_ce":
        cfg.task_loss = "balanced_ce"
    if factor != 1.0:
        from .distill import get_method

        w = {**get_method(method).default_weights, **cfg.distill.weights}
        cfg.distill.weights = {k: v * factor for k, v in w.items()}
    cfg.seed = seed
    cfg.data.val_split = split
    return cfg


def baseline_of(cfg):
    """The student-alone config paired with `cfg`: its student, data and schedule, no distillation."""
    import copy

    from .config import DistillConfig

    b = copy.deepcopy(cfg)
    b.method, b.task_loss, b.distill = "none", "ce", DistillConfig()
    b.teacher = copy.deepcopy(method_config("none", "full").teacher)  # unused by the student alone
    return b


def _teacher_config(cfg, cache: str, teacher_iters: int | None = None):
    import copy

    t = copy.deepcopy(cfg)
    t.stage, t.seed, t.task_loss = "teacher", 0, "ce"
    t.method = "lad" if cfg.method == "lad" else "none"
    t.data.val_split = "val"
    if t.method != "lad":
        from .config import DistillConfig

        t.distill = DistillConfig()
    else:
        t.distill.weights = {}
    t.teacher.checkpoint = None
    if teacher_iters:  # --iters cuts the students only: the teacher keeps its config's budget
        t.iters, t.log_every = teacher_iters, max(1, teacher_iters // 20)
    t.out = os.path.join(cache, f"teacher_{t.method}_{t.teacher.arch}_{teacher_key(t)}")
    return t


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished, waited-for children (the workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


COST_FILE = "cost.json"


def run_cost(out: str) -> dict:
    """{"cpu_seconds", "wall_seconds"} a run's training took, summed over the calls that trained it ({} when
    it was trained without the record, e.g. by `segkd train`)."""
    try:
        with open(os.path.join(out, COST_FILE)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _run_one(cfg, overwrite: bool, label: str, threads: int = 0) -> tuple[dict, list[str]]:
    """One run (trained, continued or reused), in this process; its log lines are returned with it, and the CPU
    and wall time of the training it did are added to its cost record. In a worker process (`threads` > 0) the
    CPU time is the whole process's (time.process_time: every thread), which runs only this."""
    if threads:
        torch.set_num_threads(threads)
    lines = [label]
    c0, w0 = time.process_time(), time.perf_counter()
    prev = {} if overwrite else run_cost(cfg.out)
    r = {}
    try:
        r = _run(cfg, lines.append, overwrite)
    finally:  # an interrupted run's share is recorded too (its resume adds the rest)
        from .checkpoint import find_resume

        # only beside a checkpoint: a folder without one must stay restartable from step 0 (which it is
        # while it holds nothing but the run's own files)
        if not r.get("already_done") and os.path.isdir(cfg.out) and find_resume(cfg.out) is not None:
            cost = {"cpu_seconds": round(prev.get("cpu_seconds", 0.0) + time.process_time() - c0, 2),
                    "wall_seconds": round(prev.get("wall_seconds", 0.0) + time.perf_counter() - w0, 2)}
            with open(os.path.join(cfg.out, COST_FILE), "w") as fh:
                json.dump(cost, fh)
    lines.append(f"  mIoU {r['metrics']['miou']:.2f}  {r['sec_per_iter']:.3f} s/iter")
    return {k: v for k, v in r.items() if k != "history"}, lines


class _Pool:
    """Runs lists of (cfg, overwrite, label) in order: in this process (workers=1), or over `workers` processes
    with `threads` torch threads each. Small models on few cores use them better as independent runs on one
    thread each than as one run whose tiny convolutions are split across threads. Runs are independent
    (each seeds itself from its config), so the results do not depend on which worker ran them."""

    def __init__(self, workers: int, threads: int, log):
        self.workers, self.threads, self.log, self.ex = workers, threads, log, None
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            # spawn: a fresh interpreter per worker, no forked copy of this process's torch thread pools
            self.ex = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, jobs: list) -> list:
        """Starts `jobs` (in this process: runs them now); collect() gives their results."""
        if self.ex is None:
            out = []
            for cfg, overwrite, label in jobs:
                self.log(label)
                r, lines = _run_one(cfg, overwrite, "", self.threads)
                for line in lines[1:]:
                    self.log(line)
                out.append(r)
            return out
        return [self.ex.submit(_run_one, cfg, overwrite, label, self.threads or 1) for cfg, overwrite, label in jobs]

    def as_finished(self, handles: dict):
        """(key, result) of each of `handles` ({key: handle}) as it finishes (in this process: in order)."""
        if self.ex is None:
            yield from handles.items()
            return
        import concurrent.futures

        keys = {f: k for k, f in handles.items()}
        for f in concurrent.futures.as_completed(keys):
            yield keys[f], self.collect([f])[0]

    def collect(self, handles: list) -> list[dict]:
        if self.ex is None:
            return handles
        out = []
        for f in handles:  # logged in submission order, each run's lines together
            r, lines = f.result()
            for line in lines:
                self.log(line)
            out.append(r)
        return out

    def close(self):
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


def _run(cfg, log, overwrite: bool) -> dict:
    from .config import ConfigError, describe_changes
    from .engine import ConfigChanged, run_stage

    try:
        return run_stage(cfg, log, overwrite=overwrite)
    except ConfigChanged as e:
        raise ConfigError(f"{e.out} holds a run made with other settings ({describe_changes(e.changes)}); use "
                          f"another --out, or --overwrite to train every run again") from None


# ------------------------------------------------------------------------------------------------ run
def run_compare(*, methods: list[str] | None = None, seeds: int = 5, iters: int | None = None, quick: bool = False,
                out: str = "runs/compare", device: str = "auto", overrides=(), stream=None, seed_start: int = 0,
                preset: str | None = None, overwrite: bool = False, controls: list[str] | None = None,
                teacher_cache: str | None = None, sweep: bool = False, sweep_seeds: int = 2,
                teacher_iters: int | None = None, workers: int = 1, threads: int = 0) -> int:
    """Teachers (cached; `teacher_iters` iterations when given: a teacher trained once can afford a
    longer schedule than the students), then for each seed in range(seed_start, seeds) every run; tables over every
    finished seed below `seeds` (several processes can each run a share of the seeds with `seed_start`;
    a last call with the full count collects them)."""
    from .config import ConfigError, validate
    from .distill import methods as known

    stream = stream or sys.stdout

    def log(msg):
        print(msg, file=stream, flush=True)

    methods = list(DEFAULT_METHODS if methods is None else methods)
    controls = list(DEFAULT_CONTROLS if controls is None else controls)
    bad = [m for m in methods if m not in known()]
    if bad:
        raise ConfigError(f"--methods: unknown method(s) {bad}; choices: {', '.join(known())}")
    for c in controls:
        if c != "balanced_ce" and not (c.endswith(":onehot") and c.split(":")[0] in ONEHOT_METHODS):
            raise ConfigError(f"--controls: unknown control {c!r}; choices: balanced_ce, "
                              f"{', '.join(m + ':onehot' for m in ONEHOT_METHODS)}")
    if teacher_iters is not None and teacher_iters < 1:
        raise ConfigError(f"--teacher-iters: expected a positive count, got {teacher_iters}")
    if workers < 1 or threads < 0:
        raise ConfigError(f"--workers / --threads: expected workers >= 1 and threads >= 0, got {workers} and {threads}")
    if seeds < 1 or sweep_seeds < 1:
        raise ConfigError(f"--seeds: expected a positive count, got {seeds if seeds < 1 else sweep_seeds}")
    preset = preset or ("quick" if quick else "full")
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown {preset!r}; choices: {', '.join(PRESETS)}")
    cache = teacher_cache or os.path.join(out, "teachers")
    kw = dict(overrides=overrides, device=device, iters=iters)
    variants = methods + controls

    # every run: (name, seed, split, factor) -> config; the paired baseline is named by its settings
    plan = []  # (kind, name, seed, split, factor, cfg, base_cfg)
    for seed in range(seeds):
        for v in variants:
            plan.append(("main", v, seed, "val", 1.0))
    if sweep:
        for seed in range(sweep_seeds):
            for m in methods:
                for f in SWEEP_FACTORS:
                    plan.append(("sweep", m, seed, "holdout", f))
    runs, teachers, baselines = [], {}, {}
    for kind, v, seed, split, f in plan:
        cfg = variant_config(v, preset, seed=seed, split=split, factor=f, **kw)
        base = baseline_of(cfg)
        bkey = _key(_settings(base))
        base.out = os.path.join(out, f"student_{base.student.arch}_{bkey}_{split}_seed{seed}".replace(
            f"_{bkey}_", f"_{bkey[:8]}_"))
        baselines[base.out] = base
        tag = v.replace(":", "-") + ("" if f == 1.0 else f"_x{f:g}")
        cfg.out = os.path.join(out, f"{tag}_{split}_seed{seed}")
        tkey = None
        if cfg.method != "none" and cfg.distill.teacher == "model":
            t_iters = (teacher_iters or PRESETS[preset].get("teacher_iters")
                       or (iters and method_config(cfg.method, preset, overrides=overrides).iters))
            t = _teacher_config(cfg, cache, t_iters)
            teachers.setdefault(t.out, t)
            tkey = t.out
        runs.append({"kind": kind, "name": v, "seed": seed, "split": split, "factor": f, "cfg": cfg,
                     "base": base.out, "teacher": tkey})
    # every run's settings are checked before the first one trains
    for c in [*teachers.values(), *baselines.values(), *(r["cfg"] for r in runs)]:
        validate(c, need_teacher_file=False)
    os.makedirs(out, exist_ok=True)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    pool = _Pool(workers, threads, log)
    try:
        thandles = pool.submit([(t, overwrite, f"teacher {t.teacher.arch}-{t.teacher.backbone}"
                                 + (" (label-assisted)" if t.method == "lad" else "") + f" [{path}]")
                                for path, t in teachers.items()])
        # every student run once (a student-alone run serves every method of its seed), in plan order; those
        # that need no teacher (students alone, the controls) start while the teachers train
        free, need, results = {}, {}, {}
        for r in runs:
            b = baselines[r["base"]]
            for c, label, t in ((b, f"student alone ({b.student.arch})", None),
                                (r["cfg"], r["name"] + ("" if r["factor"] == 1.0 else f" x{r['factor']:g}"),
                                 r["teacher"])):
                if c.out in free or c.out in need or c.out in results:
                    continue
                if c.seed < seed_start and c.data.val_split == "val":
                    done = os.path.join(c.out, "metrics.json")  # another process's share: collect it if finished
                    if os.path.exists(done):
                        with open(done) as fh:
                            results[c.out] = json.load(fh)
                    continue
                (need if t else free)[c.out] = (c, overwrite, f"seed {c.seed} ({c.data.val_split}): {label}")
        fhandles = pool.submit(list(free.values()))
        # the runs of each teacher start as soon as it is trained (in the order the teachers finish)
        tres, nhandles = {}, {}
        for path, res in pool.as_finished(dict(zip(teachers, thandles))):
            tres[path] = res
            mine = [r for r in runs if r["teacher"] == path]
            for r in mine:
                r["cfg"].teacher.checkpoint = res["checkpoint"]
            outs = list(dict.fromkeys(r["cfg"].out for r in mine if r["cfg"].out in need))
            nhandles.update(zip(outs, pool.submit([need[o] for o in outs])))
        results.update(zip(free, pool.collect(fhandles)))
        results.update(zip(nhandles, pool.collect(list(nhandles.values()))))
    finally:
        pool.close()
    cost = {"wall_seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(cpu_seconds() - cpu0, 1)}
    rows = []
    for r in runs:
        cfg = r["cfg"]
        b, x = results.get(r["base"]), results.get(cfg.out)
        if b is None or x is None:
            continue
        rows.append({"kind": r["kind"], "method": r["name"], "factor": r["factor"], "seed": r["seed"],
                     "split": r["split"], "student": cfg.student.arch, "miou": x["metrics"]["miou"],
                     "baseline_miou": b["metrics"]["miou"], "diff": x["metrics"]["miou"] - b["metrics"]["miou"],
                     "pixel_acc": x["metrics"]["pixel_acc"], "sec_per_iter": x["sec_per_iter"], "iters": x["step"],
                     "cpu_seconds": run_cost(cfg.out).get("cpu_seconds"),
                     "teacher_miou": tres[r["teacher"]]["metrics"]["miou"] if r["teacher"] else None})
    base_rows = [{"student": baselines[p].student.arch, "split": baselines[p].data.val_split,
                  "seed": baselines[p].seed, "miou": res["metrics"]["miou"], "sec_per_iter": res["sec_per_iter"]}
                 for p, res in results.items() if p in baselines]
    # what the finished runs cost when they were trained (whichever invocation trained them): teachers and the
    # val-split runs are the comparison, the holdout runs the sweep
    students = {**baselines, **{r["cfg"].out: r["cfg"] for r in runs}}
    spent = {"teachers": [run_cost(p) for p in teachers],
             "main": [run_cost(p) for p, c in students.items() if c.data.val_split == "val" and p in results],
             "sweep": [run_cost(p) for p, c in students.items() if c.data.val_split != "val" and p in results]}
    for k, v in spent.items():
        cost[f"{k}_runs"] = len(v)
        for unit in ("cpu_seconds", "wall_seconds"):
            xs = [c[unit] for c in v if unit in c]
            cost[f"{k}_{unit}"] = round(sum(xs), 1) if len(xs) == len(v) else None  # None: a run has no record
    summary = summarize(rows, base_rows, {p: (teachers[p], r) for p, r in tres.items()})
    meta = {"command": "segkd compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "run_compare()",
            "preset": preset, "iters": iters, "seeds": seeds, "code_version": code_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs".strip(),
            "device": device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
            "torch": torch.__version__, "python": platform.python_version(),
            "wall_seconds": round(time.perf_counter() - t0), "workers": workers, "threads": threads,
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "cost": cost, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_results(out, rows, summary, meta)
    log("\n" + markdown_table(summary["main"], meta))
    if sweep:
        log("\n" + sweep_table(summary["sweep"]))
    return 0


def summarize(rows: list[dict], base_rows: list[dict], teachers: dict) -> dict:
    """main: per method / control, the paired statistics on val; sweep: per (method, factor) on holdout,
    with the best factor marked; teachers and students alone: mIoU, and the seed spread of the latter."""
    main = []
    for name in dict.fromkeys(r["method"] for r in rows if r["kind"] == "main"):
        rs = [r for r in rows if r["kind"] == "main" and r["method"] == name]
        st = paired_stats([r["diff"] for r in rs])
        main.append({"method": name, "student": rs[0]["student"], **st,
                     "miou_mean": statistics.fmean(r["miou"] for r in rs),
                     "sec_per_iter": statistics.fmean(r["sec_per_iter"] for r in rs),
                     "control": name == "balanced_ce" or name.endswith(":onehot")})
    # each method against each control, paired by seed (the difference of their mIoUs on the seeds both have)
    controls = [m["method"] for m in main if m["control"]]
    by = {(r["method"], r["seed"]): r["miou"] for r in rows if r["kind"] == "main"}
    vs_controls = []
    for m in main:
        if m["control"]:
            continue
        for c in controls:
            seeds = sorted(s for (n, s) in by if n == m["method"] and (c, s) in by)
            vs_controls.append({"method": m["method"], "control": c,
                                **paired_stats([by[(m["method"], s)] - by[(c, s)] for s in seeds])})
    sweep = []
    for name in dict.fromkeys(r["method"] for r in rows if r["kind"] == "sweep"):
        per = []
        for f in sorted({r["factor"] for r in rows if r["kind"] == "sweep" and r["method"] == name}):
            rs = [r for r in rows if r["kind"] == "sweep" and r["method"] == name and r["factor"] == f]
            per.append({"method": name, "factor": f, **paired_stats([r["diff"] for r in rs])})
        best = max(per, key=lambda p: p["mean"])
        for p in per:
            p["best"] = p is best
        sweep.extend(per)
    students = []
    for arch in dict.fromkeys(b["student"] for b in base_rows):
        xs = [b["miou"] for b in base_rows if b["student"] == arch and b["split"] == "val"]
        if xs:
            students.append({"student": arch, "n": len(xs), "miou_mean": statistics.fmean(xs),
                             "miou_std": statistics.stdev(xs) if len(xs) > 1 else float("nan")})
    tlist = []
    for path, (cfg, r) in teachers.items():
        t = {"teacher": f"{cfg.teacher.arch}-{cfg.teacher.backbone}" + (" (label-assisted)" if cfg.method == "lad"
                                                                        else ""),
             "path": path, "miou": r["metrics"]["miou"]}
        if "no_label" in r["metrics"]:  # the label-assisted teacher with its label channel zeroed
            t["miou_no_label"] = r["metrics"]["no_label"]["miou"]
        tlist.append(t)
    return {"main": main, "vs_controls": vs_controls, "sweep": sweep, "students": students, "teachers": tlist}


def _verdict(st: dict) -> str:
    """What a 95% interval of a paired difference supports: above 0, below 0, or neither."""
    if st["n"] < 2:
        return "one seed: no interval"
    return "above 0" if st["lo"] > 0 else "below 0" if st["hi"] < 0 else "includes 0"


def conclusions(summary: dict) -> str:
    """The statements the intervals support, and the margins of the task (teacher over student alone, the
    student's spread over seeds)."""
    main = summary["main"]
    lines = ["What the 95% intervals support (paired by seed; an interval that includes 0 supports no claim "
             "either way):", ""]
    for label, verdict in (("better than the student alone", "above 0"), ("worse than the student alone", "below 0"),
                           ("not distinguishable from the student alone", "includes 0")):
        names = [m["method"] + (" (control)" if m["control"] else "") for m in main if _verdict(m) == verdict]
        lines.append(f"- {label}: {', '.join(names) if names else 'none'}")
    for c in dict.fromkeys(v["control"] for v in summary.get("vs_controls", [])):
        vs = [v for v in summary["vs_controls"] if v["control"] == c]
        above = [f"{v['method']} ({_f(v['mean'])} [{_f(v['lo'])}, {_f(v['hi'])}])" for v in vs
                 if _verdict(v) == "above 0"]
        below = [f"{v['method']} ({_f(v['mean'])} [{_f(v['lo'])}, {_f(v['hi'])}])" for v in vs
                 if _verdict(v) == "below 0"]
        lines.append(f"- better than the control {c}: {', '.join(above) if above else 'none'}; worse: "
                     f"{', '.join(below) if below else 'none'}")
    plain = [t for t in summary["teachers"] if "miou_no_label" not in t]
    for s in summary["students"]:
        margin = [f"{t['teacher']} {t['miou']:.2f} mIoU, {t['miou'] - s['miou_mean']:+.2f} over the student alone's mean"
                  for t in plain]
        lines += ["", f"Margins: student alone ({s['student']}) {s['miou_mean']:.2f} mIoU, std "
                      f"{_f(s['miou_std'], '.2f')} over {s['n']} seeds; teacher: {'; '.join(margin) or 'none'}."]
    return "\n".join(lines)


def _f(x: float, fmt: str = "+.2f") -> str:
    return "n/a" if x != x else format(x, fmt)


def markdown_table(main: list[dict], meta: dict) -> str:
    lines = ["| method | student | seeds | mIoU (mean) | paired diff vs student alone | 95% CI | helped on |"
             " s / iter |", "|---|---|---|---|---|---|---|---|"]
    for s in main:
        name = s["method"] + (" (control)" if s["control"] else "")
        lines.append(f"| {name} | {s['student']} | {s['n']} | {s['miou_mean']:.2f} | {_f(s['mean'])} | "
                     f"[{_f(s['lo'])}, {_f(s['hi'])}] | {s['helped']}/{s['n']} | {s['sec_per_iter']:.3f} |")
    lines.append("")
    lines.append(f"Synthetic benchmark, preset `{meta['preset']}`; each method from its shipped synthetic config; "
                 f"paired by seed with the student alone of the same architecture; {meta['machine']}, device "
                 f"{meta['device']}, torch {meta['torch']}; code {meta['code_version']}; {meta['wall_seconds']} s "
                 f"wall; {meta['date']}.")
    lines.append(f"Command: `{meta['command']}`")
    c = meta.get("cost")
    if c:
        lines.append("")
        lines.append(cost_line(c, meta))
    return "\n".join(lines)


def _mins(x) -> str:
    return "n/a" if x is None else f"{x / 60:.1f}"


def cost_line(c: dict, meta: dict) -> str:
    """The comparison's cost: CPU time (user + system, every process) and wall time of the runs it reports, as
    recorded when each was trained, and of this invocation."""
    return (f"Cost of the reported runs, CPU / wall minutes as recorded when each was trained: teachers "
            f"{_mins(c['teachers_cpu_seconds'])} / {_mins(c['teachers_wall_seconds'])} ({c['teachers_runs']} runs), "
            f"val-split runs {_mins(c['main_cpu_seconds'])} / {_mins(c['main_wall_seconds'])} ({c['main_runs']} runs)"
            + (f", holdout sweep {_mins(c['sweep_cpu_seconds'])} / {_mins(c['sweep_wall_seconds'])} "
               f"({c['sweep_runs']} runs)" if c["sweep_runs"] else "")
            + f". This invocation: {_mins(c['cpu_seconds'])} CPU minutes (getrusage, self + children), "
              f"{_mins(c['wall_seconds'])} wall minutes, {meta.get('workers', 1)} worker process(es); load average "
              f"at its end {meta.get('load_average')}. Wall time depends on what else the machine runs; CPU time "
              f"much less so.")


def sweep_table(sweep: list[dict]) -> str:
    lines = ["| method | weight factor | seeds | paired diff (holdout) | 95% CI | best |", "|---|---|---|---|---|---|"]
    for s in sweep:
        lines.append(f"| {s['method']} | x{s['factor']:g}{' (paper)' if s['factor'] == 1.0 else ''} | {s['n']} | "
                     f"{_f(s['mean'])} | [{_f(s['lo'])}, {_f(s['hi'])}] | {'yes' if s['best'] else ''} |")
    return "\n".join(lines)


def _extra_tables(summary: dict) -> str:
    lines = ["", "| teacher | mIoU (val) |", "|---|---|"]
    for t in summary["teachers"]:
        lines.append(f"| {t['teacher']} | {t['miou']:.2f}"
                     + (f" (label zeroed: {t['miou_no_label']:.2f})" if "miou_no_label" in t else "") + " |")
    lines += ["", "| student alone | seeds | mIoU mean | std over seeds |", "|---|---|---|---|"]
    for s in summary["students"]:
        lines.append(f"| {s['student']} | {s['n']} | {s['miou_mean']:.2f} | {_f(s['miou_std'], '.2f')} |")
    if summary.get("vs_controls"):
        lines += ["", "| method | vs control | seeds | paired diff | 95% CI |", "|---|---|---|---|---|"]
        for v in summary["vs_controls"]:
            lines.append(f"| {v['method']} | {v['control']} | {v['n']} | {_f(v['mean'])} | "
                         f"[{_f(v['lo'])}, {_f(v['hi'])}] |")
    return "\n".join(lines) + "\n\n" + conclusions(summary)


def write_results(out: str, rows: list[dict], summary: dict, meta: dict) -> None:
    fields = ["kind", "method", "factor", "seed", "split", "student", "miou", "baseline_miou", "diff", "pixel_acc",
              "sec_per_iter", "iters", "cpu_seconds", "teacher_miou"]
    main_rows = [r for r in rows if r["kind"] == "main"]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown_table(summary["main"], meta) + "\n" + _extra_tables(summary) + "\n")
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(main_rows)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"meta": meta, "summary": {k: v for k, v in summary.items() if k != "sweep"}, "runs": main_rows},
                  f, indent=1)
    if summary["sweep"]:
        sweep_rows = [r for r in rows if r["kind"] == "sweep"]
        with open(os.path.join(out, "sweep.md"), "w") as f:
            f.write(sweep_table(summary["sweep"]) + "\n")
        with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(sweep_rows)
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump({"meta": meta, "sweep": summary["sweep"], "runs": sweep_rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        with open(os.path.join(out, "compare.md"), "a") as f:
            f.write("\n(no plot: matplotlib is not installed)\n")
        return
    main = summary["main"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(main) + 1.5))
    ys = list(range(len(main)))[::-1]
    for y, s in zip(ys, main):
        err = 0 if s["half"] != s["half"] else s["half"]
        ax.errorbar(s["mean"], y, xerr=err, fmt="o", capsize=3, color="gray" if s["control"] else "#4c72b0")
    ax.axvline(0, ls="--", color="black", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([s["method"] + (" (control)" if s["control"] else "") for s in main])
    ax.set_xlabel("val mIoU minus the student alone, same seed (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)
    plt.close(fig)
