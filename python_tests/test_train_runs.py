"""Nothing is lost by running a command again: a run folder is not silently replaced, a resumed run
keeps the settings it was made with (or records the change), evaluations due at an interruption are
run on resume, later signals never abort the checkpoint, and demo/compare continue stage by stage."""

import functools
import json
import os
import signal

import pytest

from segkd_kernels import cli
from segkd_kernels.train import checkpoint as ckpt
from segkd_kernels.train import engine
from segkd_kernels.train.config import load_config

TINY = ["data.options.image_size=16", "data.options.train={num_images: 8}", "data.options.val={num_images: 3}",
        "data.batch_size=4", "data.crop_size=16", "student.width=0.0625", "teacher.width=0.0625",
        "teacher.arch=deeplabv3", "teacher.backbone=resnet18", "log_every=1", "progress=false", "ckpt_every=2",
        "iters=4", "data.eval_batch_size=1", "device=cpu"]


# tiny models and tensors: see conftest.one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(out, *extra):
    return load_config(None, [*TINY, f"out={out}", *extra])


def cli_args(out, *extra, iters=4):
    settings = [s for s in TINY if not s.startswith("iters=")]
    return ["train", "--iters", str(iters), "--out", str(out)] + [a for s in (*settings, *extra) for a in ("--set", s)]


def records(out, kind=None):
    rs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [r for r in rs if kind is None or r["kind"] == kind]


def sigterm_at(*steps, times=1):
    def callback(step, _losses):
        if step in steps:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
    return callback


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# ------------------------------------------------------------------------------------- the run folder
def test_rerun_into_a_run_folder_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args(out, iters=3)) == 0  # saves at 2 and 3: last.pt and prev.pt
    capsys.readouterr()
    before = snapshot(out)
    assert {"last.pt", "prev.pt", "log.jsonl", "metrics.json", "config.json"} <= set(before)
    assert cli.main(cli_args(out, iters=2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("segkd train: error: out: ") and "--resume" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == before  # nothing touched

    (out / "notes.txt").write_text("mine")
    assert cli.main([*cli_args(out, iters=2), "--overwrite"]) == 0
    assert "prev.pt" not in os.listdir(out)  # the old run's checkpoints are gone, not mixed in
    assert [r["step"] for r in records(out, "train")] == [1, 2]  # one run's log, not appended
    assert json.load(open(out / "metrics.json"))["step"] == 2
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the run's stay


def test_overwrite_deletes_checkpoints_first(tmp_path, monkeypatch):
    """A clear that fails halfway leaves no checkpoint beside the old logs, so nothing can resume them."""
    out = tmp_path / "run"
    engine.train(tiny(out, "iters=3"))
    real_remove = os.remove

    def failing_remove(path):
        if str(path).endswith("metrics.json"):
            raise OSError("disk error")
        real_remove(path)

    monkeypatch.setattr(engine.os, "remove", failing_remove)
    with pytest.raises(OSError, match="disk error"):
        engine.train(tiny(out, "iters=3"), overwrite=True)
    monkeypatch.undo()
    assert not (out / "last.pt").exists() and not (out / "prev.pt").exists()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        engine.train(tiny(out, "iters=3"), resume=True)


# ------------------------------------------------------------------------------ settings on resume
def test_resume_refuses_changed_settings_and_records_accepted_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args(out, iters=2)) == 0
    capsys.readouterr()
    config_before = (out / "config.json").read_bytes()
    argv = [*cli_args(out, "optim.lr=0.05", iters=3), "--seed", "7", "--resume"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for change in ("iters 2 -> 3", "optim.lr 0.01 -> 0.05", "seed 0 -> 7", "--allow-config-change"):
        assert change in err, err
    assert (out / "config.json").read_bytes() == config_before

    assert cli.main([*argv, "--allow-config-change"]) == 0
    capsys.readouterr()
    change = records(out, "config_change")
    assert change == [{"kind": "config_change", "step": 2, "changes": {
        "iters": {"old": 2, "new": 3}, "optim.lr": {"old": 0.01, "new": 0.05}, "seed": {"old": 0, "new": 7}}}]
    config = json.load(open(out / "config.json"))
    assert config["iters"] == 3 and config["seed"] == 7  # the settings in force now ...
    assert config["changes"] == [{"step": 2, "changes": {"iters": [2, 3], "optim.lr": [0.01, 0.05],
                                                         "seed": [0, 7]}}]  # ... and what changed when
    assert load_config(str(out / "config.json")).iters == 3  # still loadable as a config
    # a later exact resume keeps the history
    assert ckpt.load_checkpoint(str(out / "last.pt"))["config_changes"] == config["changes"]


def test_resume_below_the_saved_step_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args(out, iters=2)) == 0
    capsys.readouterr()
    for extra in ([], ["--allow-config-change"]):
        assert cli.main([*cli_args(out, iters=1), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert "iters: the checkpoint" in err and "step 2, past iters=1" in err and "nan" not in err


def test_resuming_a_finished_run_reports_it_without_running_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(cli_args(out, iters=2)) == 0
    first = capsys.readouterr().out
    before = snapshot(out)
    assert cli.main([*cli_args(out, iters=2), "--resume"]) == 0
    again = capsys.readouterr().out
    assert again.startswith("already finished at step 2: ") and "nan" not in again
    assert first.split("(")[0].split(":", 1)[1] == again.split("(")[0].split(":", 1)[1]  # the same metrics
    assert snapshot(out) == before


def test_free_settings_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    r = engine.train(tiny(out), callback=sigterm_at(1))
    assert r["status"] == "interrupted"
    r = engine.train(tiny(out, "log_every=2", "ckpt_every=0", "progress=true"), resume=True, quiet=True)
    assert r["status"] == "done" and "changes" not in json.load(open(out / "config.json"))


# ------------------------------------------------------------------------------------ interruptions
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    r = engine.train(tiny(out, "eval_every=2"))
    return out, r


def test_evaluation_due_at_the_interrupted_step_runs_on_resume(straight, tmp_path):
    ref_out, ref = straight
    out = tmp_path / "run"
    stopped = engine.train(tiny(out, "eval_every=2"), callback=sigterm_at(2))
    assert stopped["status"] == "interrupted" and stopped["step"] == 2
    assert records(out, "eval") == []  # stopped before its evaluation ...
    assert ckpt.load_checkpoint(str(out / "last.pt"))["eval_due"] is True  # ... which the checkpoint says is due
    resumed = engine.train(tiny(out, "eval_every=2"), resume=True)
    assert resumed["status"] == "done"
    strip = lambda rs: [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in rs]  # noqa: E731
    assert strip(records(out)) == strip(records(ref_out))  # same records, same order, same values
    assert [r["step"] for r in records(out, "eval")] == [2, 4]


def test_a_second_signal_does_not_abort_the_checkpoint(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def save_during_signals(state, path, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(state, path, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_during_signals)
    monkeypatch.setattr(engine, "train", functools.partial(engine.train, callback=sigterm_at(1, times=2)))
    rc = cli.main(cli_args(out, "ckpt_every=0"))
    err = capfd.readouterr().err  # the signal handler writes to file descriptor 2 directly
    assert rc == 128 + signal.SIGTERM
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    summary = [line for line in err.splitlines() if not line.startswith("segkd: already stopping")]
    assert len(summary) == 1 and summary[0].startswith("interrupted at step 1; ") and "--resume" in summary[0]
    assert "already stopping" in err  # the later signals are acknowledged, not acted on
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(out / "last.pt"))["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_third_signal_stops_at_once_outside_a_save(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    monkeypatch.setattr(engine, "train", functools.partial(engine.train, callback=sigterm_at(1, times=3)))
    assert cli.main(cli_args(out, "ckpt_every=0")) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "segkd train: interrupted"
    assert not (out / "last.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_the_final_evaluation(straight, tmp_path, monkeypatch, capsys):
    ref_out, ref = straight
    out = tmp_path / "run"
    real_evaluate = engine.evaluate

    def signalled_evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", signalled_evaluate)
    assert cli.main(cli_args(out, "ckpt_every=0", iters=4)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "during the final evaluation" in err and "--resume" in err, err
    assert not (out / "metrics.json").exists() and records(out, "eval") == []
    assert ckpt.load_checkpoint(str(out / "last.pt"))["step"] == 4

    before = (out / "last.pt").read_bytes()
    assert cli.main([*cli_args(out, "ckpt_every=0", iters=4), "--resume"]) == 0
    assert "step 4: mIoU" in capsys.readouterr().out
    assert (out / "last.pt").read_bytes() == before  # nothing trained again: the same checkpoint
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["status"] == "done" and metrics["metrics"]["miou"] == ref["metrics"]["miou"]
    assert [r["step"] for r in records(out, "eval")] == [4]


# -------------------------------------------------------------------------- the recorded teacher
def test_config_records_the_teacher_that_was_loaded(tmp_path):
    t = engine.train(tiny(tmp_path / "t", "stage=teacher", "teacher.arch=pspnet", "iters=1"))
    # teacher.* left at their defaults (DeepLabV3-R101 x1): the checkpoint decides
    cfg = load_config(None, [s for s in TINY if not s.startswith("teacher.")] +
                      [f"out={tmp_path / 's'}", "method=kd", f"teacher.checkpoint={t['checkpoint']}", "iters=1"])
    assert (cfg.teacher.arch, cfg.teacher.backbone, cfg.teacher.width) == ("deeplabv3", "resnet101", 1.0)
    engine.train(cfg)
    recorded = json.load(open(tmp_path / "s" / "config.json"))["teacher"]
    spec = ckpt.load_checkpoint(t["checkpoint"])["model_spec"]
    assert spec["arch"] == "pspnet"
    assert {k: recorded[k] for k in engine.MODEL_KEYS} == {k: spec[k] for k in engine.MODEL_KEYS}
    assert ckpt.load_checkpoint(str(tmp_path / "s" / "last.pt"))["config"]["teacher"]["arch"] == "pspnet"


# --------------------------------------------------------------------------- demo and compare
def interrupt_nth_run(monkeypatch, n: int, step: int):
    """engine.train with a SIGTERM at `step` in the n-th run started (0-based)."""
    real, count = engine.train, [0]

    def train(cfg, **kw):
        count[0] += 1
        if count[0] - 1 == n:
            kw["callback"] = sigterm_at(step)
        return real(cfg, **kw)

    monkeypatch.setattr(engine, "train", train)


def test_demo_continues_each_stage(tmp_path, monkeypatch, capsys):
    from segkd_kernels.train.demo import run_demo

    out = tmp_path / "demo"
    kw = dict(preset="smoke", method="kd", out=str(out), iters=3, overrides=["progress=false", "device=cpu"])
    interrupt_nth_run(monkeypatch, 1, 2)  # the student alone, at step 2
    with pytest.raises(engine.Interrupted, match="interrupted at step 2; .*run the same command again to continue"):
        run_demo(**kw)
    monkeypatch.undo()
    teacher = snapshot(out / "teacher")
    assert ckpt.load_checkpoint(str(out / "student" / "last.pt"))["step"] == 2

    assert run_demo(**kw) == 0
    text = capsys.readouterr().out
    assert "finished earlier: reusing" in text and "continuing from the checkpoint of step 2" in text
    assert snapshot(out / "teacher") == teacher  # reused, not retrained
    assert [r["step"] for r in records(out / "student", "train")] == [1, 2, 3]  # continued, not restarted

    students = {s: snapshot(out / s) for s in ("student", "student_kd")}
    assert run_demo(**kw) == 0  # everything finished: every stage reused, the table printed again
    text = capsys.readouterr().out
    assert text.count("finished earlier: reusing") == 3 and "student + kd" in text
    assert all(snapshot(out / s) == students[s] for s in students)

    # another budget into the same folder: refused with the way out, nothing retrained
    with pytest.raises(Exception, match=r"holds a run made with other settings \(iters 3 -> 4\).*--overwrite"):
        run_demo(**{**kw, "iters": 4})
    assert snapshot(out / "teacher") == teacher


def test_compare_continues_each_run(tmp_path, monkeypatch, capsys):
    from segkd_kernels.train.compare import run_compare

    out = tmp_path / "cmp"
    kw = dict(methods=["kd"], controls=[], seeds=1, preset="smoke", out=str(out),
              overrides=["progress=false", "device=cpu"])
    interrupt_nth_run(monkeypatch, 2, 1)  # teacher, student alone, then kd: stopped at its step 1
    with pytest.raises(engine.Interrupted):
        run_compare(**kw)
    monkeypatch.undo()
    capsys.readouterr()
    assert run_compare(**kw) == 0
    text = capsys.readouterr().out
    assert text.count("finished earlier: reusing") == 2 and "continuing from the checkpoint of step 1" in text
    assert [r["step"] for r in records(out / "kd_val_seed0", "train")] == [1, 2]
