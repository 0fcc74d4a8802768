"""Two processes (gloo, CPU) reproduce the single-process run.

What "matches" means here: the sampler gives every step the same global batch whatever the number of
processes (rank r takes the r-th slice), DDP averages the ranks' gradients, and with BatchNorm using its
running statistics (bn_eval) and no ignored pixels (no scale-down padding), the mean of the two ranks'
per-half-batch losses is exactly the single process's loss over the whole batch. Only floating-point
summation order differs, so losses and weights agree to ~1e-6, not bit for bit. Dropout masks are
per-rank random draws (no process count reproduces them), so dropout is switched off in this test.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from segkd_kernels.train import checkpoint as ckpt
from segkd_kernels.train import engine
from segkd_kernels.train.config import load_config

SETTINGS = ["data.options.image_size=16", "data.options.train={num_images: 16}", "data.options.val={num_images: 5}",
            "data.batch_size=4", "data.crop_size=16", "data.scale_range=[1.0, 1.0]", "student.width=0.0625",
            "bn_eval=true", "iters=3", "ckpt_every=0", "log_every=1", "progress=false", "device=cpu",
            "optim.lr=0.05"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_dropout(self, x):
    return x


def _worker(rank: int, world: int, port: int, out: str, result_file: str) -> None:
    torch.set_num_threads(1)
    torch.nn.Dropout.forward = _no_dropout
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    r = engine.train(load_config(None, [*SETTINGS, f"out={out}"]))
    torch.save({"history": r["history"], "miou": r["metrics"]["miou"], "pixels": r["metrics"]["pixels"]},
               f"{result_file}.{rank}")


def test_two_gloo_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.Dropout, "forward", _no_dropout)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = engine.train(load_config(None, [*SETTINGS, f"out={tmp_path / 'single'}"]))
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path / "res")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=False) for r in (0, 1)]

    # the logged losses are reduced across ranks: both ranks report the same numbers
    assert ranks[0]["history"] == ranks[1]["history"]
    for h_ddp, h_one in zip(ranks[0]["history"], single["history"]):
        assert h_ddp.keys() == h_one.keys()
        for k in h_one:
            assert h_ddp[k] == pytest.approx(h_one[k], rel=1e-5, abs=1e-6), (k, h_ddp, h_one)
    a = ckpt.load_checkpoint(str(tmp_path / "single" / "last.pt"))["model"]
    b = ckpt.load_checkpoint(str(tmp_path / "ddp" / "last.pt"))["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # evaluation shards the images over ranks and sums the confusion matrices: every pixel once
    assert ranks[0]["pixels"] == ranks[1]["pixels"] == single["metrics"]["pixels"] == 5 * 16 * 16
    assert ranks[0]["miou"] == pytest.approx(single["metrics"]["miou"], abs=0.5)
    # only rank 0 writes: one log, one checkpoint
    assert sorted(os.listdir(tmp_path / "ddp")) == ["config.json", "last.pt", "log.jsonl", "metrics.json"]


def test_torchrun_reports_once(tmp_path):
    """Under torchrun every process runs the command; only the main one prints the summary."""
    import subprocess
    import sys

    out = tmp_path / "run"
    settings = [s for s in SETTINGS if not s.startswith("iters=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "segkd_kernels.cli", "train", "--iters", "2", "--out", str(out),
           *[a for s in settings for a in ("--set", s)], "--set", "threads=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("step 2: mIoU") == 1, r.stdout
    assert json.load(open(out / "metrics.json"))["step"] == 2
