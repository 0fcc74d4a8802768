"""`segkd compare`: every method x seeds on the synthetic benchmark, with the student alone as the
baseline, from one shared teacher (LAD: its own label-assisted teacher). Writes compare.md, .csv, .json
and compare.png (when matplotlib is importable). Running it again continues: finished runs are reused
(after checking their settings), an interrupted run continues exactly from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import time

import torch

from .demo import PRESETS, STUDENT, TEACHER, demo_config


def _run(cfg, log, overwrite: bool) -> dict:
    from .config import ConfigError, describe_changes
    from .engine import ConfigChanged, run_stage

    try:
        return run_stage(cfg, log, overwrite=overwrite)
    except ConfigChanged as e:
        raise ConfigError(f"{e.out} holds a run made with other settings ({describe_changes(e.changes)}); use "
                          f"another --out, or --overwrite to train every run again") from None


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run_compare(*, methods: list[str], seeds: int = 3, iters: int | None = None, quick: bool = False,
                out: str = "runs/compare", device: str = "auto", overrides=(), stream=None,
                seed_start: int = 0, preset: str | None = None, overwrite: bool = False) -> int:
    """Teachers at the preset's budget (the fixed models every student learns from), then for each seed
    in range(seed_start, seeds) the student alone and each method (`iters` iterations when given).
    The tables cover every finished seed below `seeds`, so several processes can each run a share of
    the seeds (`seed_start`) and a last call with the full count collects them."""
    from .config import ConfigError
    from .distill import methods as known

    stream = stream or sys.stdout

    def log(msg):
        print(msg, file=stream, flush=True)

    bad = [m for m in methods if m not in known()]
    if bad:
        raise ConfigError(f"--methods: unknown method(s) {bad}; choices: {', '.join(known())}")
    if seeds < 1:
        raise ConfigError(f"--seeds: expected a positive count, got {seeds}")
    preset = preset or ("quick" if quick else "full")
    from .config import validate

    def student_config(method, seed, tck):
        cfg = demo_config(preset, stage="student", method=method, out=os.path.join(out, f"{method}_seed{seed}"),
                          seed=seed, device=device, iters=iters, teacher_checkpoint=tck, overrides=overrides)
        cfg.progress = False
        return cfg

    kinds = ["none"] + (["lad"] if "lad" in methods else [])
    teacher_cfgs = {kind: demo_config(preset, stage="teacher", method=kind, out=os.path.join(out, f"teacher_{kind}"),
                                      device=device, overrides=overrides) for kind in kinds}
    # every kind of run's settings are checked before the first one trains
    for cfg in [*teacher_cfgs.values(), *(student_config(m, seed_start, None) for m in ["none", *methods])]:
        validate(cfg, need_teacher_file=False)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    teachers = {}
    for kind, cfg in teacher_cfgs.items():
        log(f"teacher ({'label-assisted' if kind == 'lad' else 'plain'})")
        teachers[kind] = _run(cfg, log, overwrite)
    rows = []
    for seed in range(seeds):
        if seed < seed_start:  # another process's share: collect it if it has finished
            for method in ["none", *methods]:
                done = os.path.join(out, f"{method}_seed{seed}", "metrics.json")
                if os.path.exists(done):
                    with open(done) as f:
                        r = json.load(f)
                    rows.append({"method": method, "seed": seed, "miou": r["metrics"]["miou"],
                                 "pixel_acc": r["metrics"]["pixel_acc"], "sec_per_iter": r["sec_per_iter"],
                                 "iters": r["step"]})
            continue
        for method in ["none", *methods]:
            cfg = student_config(method, seed, teachers["lad" if method == "lad" else "none"]["checkpoint"])
            log(f"seed {seed}: {'student alone' if method == 'none' else method}")
            r = _run(cfg, log, overwrite)
            rows.append({"method": method, "seed": seed, "miou": r["metrics"]["miou"],
                         "pixel_acc": r["metrics"]["pixel_acc"], "sec_per_iter": r["sec_per_iter"],
                         "iters": r["step"]})
            log(f"  mIoU {r['metrics']['miou']:.2f}  {r['sec_per_iter']:.3f} s/iter")
    summary = summarize(rows, teachers)
    meta = {"command": "segkd compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"] else "run_compare()",
            "preset": preset, "iters": iters or PRESETS[preset]["student_iters"], "seeds": seeds,
            "teacher": TEACHER, "student": STUDENT, "machine": f"{platform.machine()} {platform.processor() or ''} "
            f"{os.cpu_count()} logical CPUs".strip(), "device": device if device != "auto" else
            ("cuda" if torch.cuda.is_available() else "cpu"), "torch": torch.__version__,
            "python": platform.python_version(), "wall_seconds": round(time.perf_counter() - t0),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_results(out, rows, summary, meta)
    log("\n" + markdown_table(summary, meta))
    return 0


def summarize(rows: list[dict], teachers: dict) -> list[dict]:
    base = [r["miou"] for r in rows if r["method"] == "none"]
    base_mean = statistics.fmean(base) if base else float("nan")
    out = []
    for kind, r in teachers.items():
        out.append({"method": "teacher" + (" (label-assisted)" if kind == "lad" else ""), "n": 1,
                    "miou_mean": r["metrics"]["miou"], "miou_std": 0.0, "delta": float("nan"),
                    "sec_per_iter": r["sec_per_iter"]})
        if "no_label" in r["metrics"]:  # the label-assisted teacher with its label channel zeroed
            out.append({"method": "teacher (label-assisted, label zeroed)", "n": 1,
                        "miou_mean": r["metrics"]["no_label"]["miou"], "miou_std": 0.0, "delta": float("nan"),
                        "sec_per_iter": r["sec_per_iter"]})
    for method in dict.fromkeys(r["method"] for r in rows):
        xs = [r["miou"] for r in rows if r["method"] == method]
        ts = [r["sec_per_iter"] for r in rows if r["method"] == method]
        out.append({"method": "student alone" if method == "none" else method, "n": len(xs),
                    "miou_mean": statistics.fmean(xs), "miou_std": _std(xs),
                    "delta": statistics.fmean(xs) - base_mean if method != "none" else 0.0,
                    "sec_per_iter": statistics.fmean(ts)})
    return out


def markdown_table(summary: list[dict], meta: dict) -> str:
    lines = ["| method | seeds | mIoU (mean +- std) | vs student alone | s / iter |", "|---|---|---|---|---|"]
    for s in summary:
        delta = "" if s["delta"] != s["delta"] else f"{s['delta']:+.2f}"
        lines.append(f"| {s['method']} | {s['n']} | {s['miou_mean']:.2f} +- {s['miou_std']:.2f} | {delta} | "
                     f"{s['sec_per_iter']:.3f} |")
    lines.append("")
    lines.append(f"Synthetic benchmark, preset `{meta['preset']}`, {meta['iters']} iterations per run; teacher "
                 f"{TEACHER['arch']}-{TEACHER['backbone']} x{TEACHER['width']}, student {STUDENT['arch']}-"
                 f"{STUDENT['backbone']} x{STUDENT['width']}; {meta['machine']}, device {meta['device']}, torch "
                 f"{meta['torch']}; {meta['wall_seconds']} s wall; {meta['date']}.")
    lines.append(f"Command: `{meta['command']}`")
    return "\n".join(lines)


def write_results(out: str, rows: list[dict], summary: list[dict], meta: dict) -> None:
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(markdown_table(summary, meta) + "\n")
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "miou", "pixel_acc", "sec_per_iter", "iters"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        with open(os.path.join(out, "compare.md"), "a") as f:
            f.write("\n(no plot: matplotlib is not installed)\n")
        return
    students = [s for s in summary if not s["method"].startswith("teacher")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([s["method"] for s in students], [s["miou_mean"] for s in students],
           yerr=[s["miou_std"] for s in students], capsize=3, color="#4c72b0")
    for s in summary:
        if s["method"].startswith("teacher"):
            ax.axhline(s["miou_mean"], ls="--", color="gray", lw=1)
    ax.set_ylabel("val mIoU")
    lo = min(s["miou_mean"] - s["miou_std"] for s in students)
    ax.set_ylim(max(0, lo - 5), None)
    ax.set_title("synthetic benchmark: student mIoU by method (dashed: teacher)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)
    plt.close(fig)
