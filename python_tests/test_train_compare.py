"""`segkd compare`: paired statistics, the teacher cache, resuming, the controls and the shipped configs.

Runs use the "smoke" preset (32 px images, 2 iterations): they test the plumbing, not the results."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segkd_kernels.train import compare, engine
from segkd_kernels.train.config import ConfigError, validate

SMOKE = ["progress=false", "device=cpu", "threads=1"]


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df,expected", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_printed_tables(df, expected):
    # two-sided 95% critical values of Student's t as printed in tables (4 decimals): the numerical
    # quantile is accurate to 1e-5, so it agrees with the table to its rounding
    assert compare.t_quantile(0.975, df) == pytest.approx(expected, abs=6e-5)


def test_paired_interval_by_hand():
    # differences 1..5: mean 3, sample sd sqrt(2.5) = 1.58114, t(0.975, 4) = 2.77645,
    # half width 2.77645 * 1.58114 / sqrt(5) = 1.96324
    st = compare.paired_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["n"] == 5 and st["mean"] == 3.0 and st["helped"] == 5
    assert st["sd"] == pytest.approx(1.58114, abs=1e-5)
    assert st["half"] == pytest.approx(1.96324, abs=1e-4)
    assert (st["lo"], st["hi"]) == pytest.approx((3 - 1.96324, 3 + 1.96324), abs=1e-4)
    # a method that hurts on two of three seeds
    st = compare.paired_stats([-1.0, 0.5, -2.0])
    assert st["helped"] == 1 and st["mean"] == pytest.approx(-2.5 / 3)
    one = compare.paired_stats([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["half"])  # one seed: no interval


def test_t_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        compare.t_quantile(0.2, 3)


# --------------------------------------------------------------------------------------------- configs
def test_each_method_runs_its_shipped_synthetic_config():
    cwd = compare.variant_config("cwd", "full", seed=3)
    assert (cwd.student.arch, cwd.teacher.arch, cwd.distill.weights) == ("deeplabv3plus", "deeplabv3plus", {"cwd": 3.0})
    attnfd = compare.variant_config("attnfd", "full", seed=0)
    assert attnfd.student.arch == attnfd.teacher.arch == "deeplabv3plus"
    assert attnfd.distill.options["points"] == ["layer4_pre", "aspp", "decoder"]
    kd = compare.variant_config("kd", "full", seed=0)
    assert kd.student.arch == kd.teacher.arch == "deeplabv3plus" and kd.student.aspp_rates == (1, 2, 3)
    assert kd.iters == 300 and kd.data.options["val"]["num_images"] == 1000 and kd.seed == 0
    assert compare.variant_config("lad", "full", seed=0).teacher.aux and not kd.teacher.aux
    # the sweep scales every loss weight, defaults included; the holdout split is evaluated
    skd = compare.variant_config("skd", "full", seed=0, factor=0.3, split="holdout")
    assert skd.distill.weights == pytest.approx({"pairwise": 3.0, "kd": 0.3}) and skd.data.val_split == "holdout"
    for c in (cwd, attnfd, kd, skd):
        validate(c, need_teacher_file=False)


def test_pairs_share_the_student_run():
    # every method has the same student: they pair with the very same student-alone run (same seed,
    # hence the same initial weights and batches)
    key = lambda m: compare._key(compare._settings(compare.baseline_of(compare.variant_config(m, "full", seed=1))))
    assert len({key(m) for m in (*compare.DEFAULT_METHODS, "cwd:onehot")}) == 1
    assert key("kd") != compare._key(compare._settings(compare.baseline_of(compare.variant_config("kd", "full",
                                                                                               seed=2))))


def test_teacher_cache_key():
    t = lambda m: compare._teacher_config(compare.variant_config(m, "full", seed=0), "cache")
    # one plain teacher for every method but LAD, whose teacher reads the labels too
    assert len({t(m).out for m in compare.DEFAULT_METHODS if m != "lad"}) == 1 and t("lad").out != t("kd").out
    kd = t("kd")
    assert compare.teacher_key(kd, code="a") != compare.teacher_key(kd, code="b")
    kd.iters += 1
    assert compare.teacher_key(kd) != compare.teacher_key(t("kd"))
    assert len(compare.code_version()) == 16


# -------------------------------------------------------------------------------------------- controls
def test_onehot_teacher_logits():
    labels = torch.tensor([[[0, 2], [255, 1]]])
    z = engine.onehot_logits(labels, 3, 10.0)
    assert z.shape == (1, 3, 2, 2)
    assert z[0, :, 0, 0].tolist() == [10, 0, 0] and z[0, :, 0, 1].tolist() == [0, 0, 10]
    assert z[0, :, 1, 0].tolist() == [0, 0, 0]  # ignored pixel: uniform


def test_balanced_weights_are_median_over_frequency():
    w = engine.balanced_class_weights(torch.tensor([0.6, 0.3, 0.1, 0.0], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.3 / 0.6, 1.0, 3.0, 0.0])


def test_onehot_control_needs_a_logit_method():
    cfg = compare.variant_config("skd", "smoke", seed=0)
    cfg.distill.teacher = "onehot"
    with pytest.raises(ConfigError, match="distill.teacher: the one-hot control teacher has logits only"):
        validate(cfg, need_teacher_file=False)
    cfg = compare.variant_config("cwd:onehot", "smoke", seed=0)
    validate(cfg, need_teacher_file=False)  # needs no teacher checkpoint
    cfg.distill.weights["feat"] = 1.0
    with pytest.raises(ConfigError, match="set distill.weights.feat=0"):
        validate(cfg, need_teacher_file=False)
    with pytest.raises(ConfigError, match="--controls: unknown control 'skd:onehot'"):
        compare.run_compare(methods=["kd"], controls=["skd:onehot"], preset="smoke", out="unused")


# ------------------------------------------------------------------------------------------- full runs
def test_compare_pairs_controls_cache_and_resume(tmp_path, capsys):
    out, cache = tmp_path / "cmp", tmp_path / "cache"
    kw = dict(methods=["kd"], controls=["kd:onehot", "balanced_ce"], seeds=2, preset="smoke", out=str(out),
              overrides=SMOKE, teacher_cache=str(cache))
    assert compare.run_compare(**kw) == 0
    first = capsys.readouterr().out
    assert first.count("training in") == 1 + 2 * 4  # one teacher; per seed: student alone, kd and 2 controls
    assert len(list(cache.iterdir())) == 1
    data = json.load(open(out / "compare.json"))
    runs = data["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in
                                                        ("kd", "kd:onehot", "balanced_ce")]
    for r in runs:
        assert r["diff"] == pytest.approx(r["miou"] - r["baseline_miou"])
    base = {r["seed"]: r["baseline_miou"] for r in runs}
    assert all(r["baseline_miou"] == base[r["seed"]] for r in runs)  # one student-alone run per seed
    kd = next(s for s in data["summary"]["main"] if s["method"] == "kd")
    assert kd["mean"] == pytest.approx(sum(r["diff"] for r in runs if r["method"] == "kd") / 2)
    table = open(out / "compare.md").read()
    assert "| kd:onehot (control) |" in table and "| balanced_ce (control) |" in table and "95% CI" in table
    assert (out / "compare.csv").read_text().count("\n") == 1 + 6

    # run again: nothing is trained; a second comparison reuses the cached teacher
    assert compare.run_compare(**kw) == 0
    again = capsys.readouterr().out
    assert "training in" not in again and again.count("finished earlier: reusing") == 1 + 2 * 4
    assert compare.run_compare(**{**kw, "out": str(tmp_path / "other"), "seeds": 1, "controls": []}) == 0
    other = capsys.readouterr().out
    assert other.count("training in") == 2 and "finished earlier: reusing " + str(cache) in other
    # a longer teacher schedule is another teacher (its own cache entry)
    assert compare.run_compare(**{**kw, "out": str(tmp_path / "third"), "seeds": 1, "controls": [],
                                  "teacher_iters": 3}) == 0
    assert len(list(cache.iterdir())) == 2
    t = json.load(open(next(p for p in cache.iterdir() if "metrics.json" in [q.name for q in p.iterdir()]
                            and json.load(open(p / "metrics.json"))["step"] == 3) / "config.json"))
    assert t["iters"] == 3 and t["stage"] == "teacher"


def test_compare_sweep_on_holdout(tmp_path, capsys):
    out = tmp_path / "sw"
    assert compare.run_compare(methods=["kd"], controls=[], seeds=1, preset="smoke", out=str(out), overrides=SMOKE,
                               sweep=True, sweep_seeds=1) == 0
    sweep = json.load(open(out / "sweep.json"))
    assert [s["factor"] for s in sweep["sweep"]] == [0.3, 1.0, 3.0]
    assert sum(s["best"] for s in sweep["sweep"]) == 1
    assert {r["split"] for r in sweep["runs"]} == {"holdout"}
    cfg = json.load(open(out / "kd_x3_holdout_seed0" / "config.json"))
    assert cfg["distill"]["weights"]["kd"] == 3.0 and cfg["data"]["val_split"] == "holdout"


def test_worker_processes_give_the_same_runs_and_record_their_cost(tmp_path, capsys):
    # the same runs trained in two worker processes (one thread each) and in this process (one thread):
    # each run seeds itself from its config, so the results are equal bit for bit
    kw = dict(methods=["kd"], controls=["balanced_ce"], seeds=2, preset="smoke", overrides=SMOKE,
              teacher_cache=str(tmp_path / "cache"))
    assert compare.run_compare(out=str(tmp_path / "one"), **kw) == 0
    assert compare.run_compare(out=str(tmp_path / "two"), workers=2, **kw) == 0
    log = capsys.readouterr().out
    assert log.count("training in") == 1 + 6 + 6 and log.count("finished earlier: reusing") == 1  # the teacher
    one, two = (json.load(open(tmp_path / d / "compare.json")) for d in ("one", "two"))
    assert [(r["method"], r["seed"], r["miou"]) for r in one["runs"]] == [
        (r["method"], r["seed"], r["miou"]) for r in two["runs"]]
    cost = two["meta"]["cost"]
    assert two["meta"]["workers"] == 2 and cost["main_runs"] == 6 and cost["teachers_runs"] == 1
    # every run's own record (CPU time of its process, wall time) is there and positive
    for r in two["runs"]:
        assert r["cpu_seconds"] > 0
    assert cost["main_cpu_seconds"] > 0 and cost["teachers_cpu_seconds"] > 0 and cost["cpu_seconds"] > 0
    assert "CPU / wall minutes" in open(tmp_path / "two" / "compare.md").read()
    with pytest.raises(ConfigError, match="--workers"):
        compare.run_compare(out=str(tmp_path / "bad"), workers=0, **kw)


def test_iters_cut_the_students_not_the_teacher():
    cfg = compare.variant_config("kd", "full", seed=0, iters=50)
    assert cfg.iters == 50
    assert compare._teacher_config(cfg, "cache", teacher_iters=600).iters == 600


@pytest.mark.slow  # about 40 CPU-seconds: 4 teachers and 11 students, even at the smoke size
def test_every_method_and_control_runs_through_compare(tmp_path):
    out = tmp_path / "all"
    assert compare.run_compare(seeds=1, preset="smoke", out=str(out), overrides=SMOKE, stream=open(
        tmp_path / "log.txt", "w")) == 0
    main = json.load(open(out / "compare.json"))["summary"]["main"]
    assert [s["method"] for s in main] == [*compare.DEFAULT_METHODS, *compare.DEFAULT_CONTROLS]
    # one teacher for every method, and LAD's label-assisted one
    assert len(list((out / "teachers").iterdir())) == 2


def test_runs_recorded_before_the_new_settings_still_resume():
    from segkd_kernels.train.config import Config, config_changes

    new = Config().to_dict()
    old = Config().to_dict()
    for d, k in ((old, "task_loss"), (old["distill"], "teacher"), (old["distill"], "onehot_scale"),
                 (old["student"], "aspp_rates"), (old["teacher"], "aspp_rates")):
        del d[k]
    assert config_changes(old, new) == {}
    new["task_loss"] = "balanced_ce"
    assert config_changes(old, new) == {"task_loss": ("ce", "balanced_ce")}


def test_aspp_rates_reach_the_model_and_its_spec():
    from segkd_kernels.train.config import ModelConfig

    spec = engine.model_spec(ModelConfig(width=0.0625, aspp_rates=(2, 3, 4)), 8)
    assert spec["aspp_rates"] == [2, 3, 4]
    model = engine.build_from_spec(spec)
    dil = sorted({m.dilation[0] for m in model.head.aspp.modules() if isinstance(m, torch.nn.Conv2d)
                  and m.kernel_size == (3, 3)})
    assert dil == [2, 3, 4]
    assert "aspp_rates" not in engine.model_spec(ModelConfig(), 8)  # older specs stay equal
    cfg = compare.variant_config("kd", "smoke", seed=0)
    cfg.student.aspp_rates = (0, 2)
    with pytest.raises(ConfigError, match="aspp_rates: expected a list of positive integer"):
        validate(cfg, need_teacher_file=False)


def test_conclusions_follow_the_intervals():
    # three seeds; kd beats the student alone on every seed by 2 +- 0.1, ssim is +-1 around 0, and the control
    # sits 1 above the student alone: kd beats it too (paired by seed: +1 +- 0.1)
    rows, base = [], {0: 20.0, 1: 22.0, 2: 21.0}
    for s, b in base.items():
        for name, d in (("kd", 2.0 + 0.1 * (s - 1)), ("ssim", (-1.0, 1.0, 0.2)[s]), ("balanced_ce", 1.0)):
            rows.append({"kind": "main", "method": name, "seed": s, "student": "x", "miou": b + d, "diff": d,
                         "sec_per_iter": 0.1, "factor": 1.0})
    summary = compare.summarize(rows, [{"student": "x", "split": "val", "seed": s, "miou": b, "sec_per_iter": 0.1}
                                       for s, b in base.items()], {})
    kd_vs = next(v for v in summary["vs_controls"] if v["method"] == "kd")
    assert kd_vs["control"] == "balanced_ce" and kd_vs["mean"] == pytest.approx(1.0) and kd_vs["lo"] > 0
    text = compare.conclusions(summary)
    assert "- better than the student alone: kd, balanced_ce (control)" in text
    assert "- not distinguishable from the student alone: ssim" in text
    assert "- better than the control balanced_ce: kd (+1.00" in text and "worse: none" in text
    assert "std 1.00 over 3 seeds" in text
