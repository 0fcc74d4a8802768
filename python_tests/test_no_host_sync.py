"""No host sync in the hot path: no wrapper of the triton backend reads a tensor value on the host.

On a GPU every such read (`.item()`, `bool(t)`, `float(t)`, `int(t)`, `.tolist()`, `torch.equal`,
an output sized by device values such as a boolean-mask index) waits for the device. On CPU the
same reads are visible: every op's forward and backward runs through the real triton wrappers on
CPU tensors with every kernel launch intercepted (nothing runs, so values never matter) under
`segkd_kernels.bench.host.host_read_guard` (Python-level reads, patched so that no code path
changes) and then under a dispatch mode listing the aten ops that read device values
(`bench.host.SYNC_OPS`). The launches are intercepted on real JITFunctions, so the checks run in
a child process without TRITON_INTERPRET.

One read is allowed by design, and only for CPU tensors: pixel_kd's check for negative weights
(ops/pixel_kd/api.py `_nonnegative_weight`) raises on a CPU tensor, where reading is free; for a
CUDA tensor the same check is a device-side NaN. The variant with a weight runs that check's
device path (`host_check=False`) as a CUDA tensor would, so the test holds it to zero reads too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _variants():
    """(name, callable(backend) -> (tensors needing grad, output)) for every op and option that
    changes the wrappers' code path."""
    import torch

    import segkd_kernels as sk
    from segkd_kernels.bench import cases

    out = []
    for op, case in cases.CASES.items():
        def call(case=case):
            inputs = case.make(case.quick_shapes[0], torch.float32, "cpu")
            res = case.api(*inputs.tensors, backend="triton", **inputs.kwargs)
            return [inputs.tensors[i] for i in inputs.grad_of], res
        out.append((op, call))

    def pixel(fn, **kw):
        def call():
            s = torch.randn(2, 5, 9, 13, requires_grad=True)
            t = torch.randn(2, 5, 9, 13)
            extra = {}
            if kw.get("weight"):
                extra["weight"] = torch.rand(2, 9, 13)
            if kw.get("mask"):
                extra["ignore_mask"] = torch.rand(2, 9, 13) < 0.3
            return [s], getattr(sk, fn)(s, t, 2.0, backend="triton", **extra)
        return call

    out += [("pixel_kd+weight+mask", pixel("pixel_kd", weight=True, mask=True)),
            ("pixel_kd+mask", pixel("pixel_kd", mask=True)),
            ("pfs_pixel_kd+mask", pixel("pfs_pixel_kd", mask=True))]
    return out


def _check_all() -> dict:
    """Run every variant forward + backward (grad_output 1 and 2, and a retained graph's second
    backward) with launches intercepted; {variant: [host reads]}."""
    import torch

    from segkd_kernels.bench.host import PLANS, SYNC_OPS, host_read_guard
    from segkd_kernels.bench.static import _Capture, _cpu_tensors_for_triton, _torch_ops_mode
    from segkd_kernels.ops.pixel_kd import api as pixel_api

    # the device path of the weight check, as for a CUDA tensor (see the module docstring)
    real_check = pixel_api._nonnegative_weight
    pixel_api._nonnegative_weight = lambda w, m=None, host_check=False: real_check(w, m, host_check=False)

    def run(call):
        leaves, out = call()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        for scale in (1.0, 2.0):
            grads = [torch.full_like(o, scale) for o in outs]
            torch.autograd.backward(outs, grads, retain_graph=True)
        return leaves

    found, launches = {}, {}
    try:
        with _cpu_tensors_for_triton(), _Capture((90,), hot_path=True) as cap:
            variants = list(_variants())
            for op, plans in PLANS.items():
                for plan, force in plans.items():
                    name = dict(variants)[op]

                    def forced(name=name, force=force):
                        with force():
                            return name()
                    variants.append((f"{op}[{plan}]", forced))
            for name, call in variants:
                sites: list = []
                cap.count = 0
                with host_read_guard(sites):
                    run(call)
                mode = _torch_ops_mode()
                with mode:
                    run(call)
                sites += [f"aten:{o}" for o in mode.ops if o in SYNC_OPS]
                found[name] = sites
                launches[name] = cap.count
    finally:
        pixel_api._nonnegative_weight = real_check
    return {"reads": found, "launches": launches}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_op_and_option_ran_its_kernels(report):
    from segkd_kernels.bench import cases

    assert set(cases.CASES) <= set(report["launches"])
    assert {"pixel_kd+weight+mask", "channel_wise_kd[split]"} <= set(report["launches"])
    # every variant went through Triton launches (the interception saw the wrappers run)
    assert all(n > 0 for n in report["launches"].values()), report["launches"]


def test_no_wrapper_reads_a_tensor_value_on_the_host(report):
    bad = {name: sites for name, sites in report["reads"].items() if sites}
    assert not bad, f"host reads of tensor values (device syncs on a GPU): {bad}"


def test_the_check_sees_host_reads():
    """The detector is not vacuous: the CPU weight check (a host read on purpose) and a sync in a
    backward are both reported."""
    import torch

    import segkd_kernels as sk
    from segkd_kernels.bench.host import host_read_guard

    sites: list = []
    with host_read_guard(sites):
        s = torch.randn(2, 5, 9, 13, requires_grad=True)
        sk.pixel_kd(s, torch.randn(2, 5, 9, 13), 2.0, weight=torch.rand(2, 9, 13), backend="reference")
    assert any(site.startswith("api.py") for site in sites), sites

    class Syncing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return torch.ones(2) * (2.0 if bool(g == 1) else 1.0)

    sites.clear()
    with host_read_guard(sites):
        Syncing.apply(torch.ones(2, requires_grad=True)).backward()
    assert [s.rsplit(":", 1)[1] for s in sites] == ["__bool__"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET: the launches are intercepted on real kernels")
    print(json.dumps(_check_all()))
