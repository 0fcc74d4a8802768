"""Backend reporting and the single dispatch point (docs/api.md rules)."""

import contextlib

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels import _backends
from segkd_kernels._backends import BackendUnavailableError, select_backend
from segkd_kernels.ops import implemented_backends
from segkd_kernels.ops.spatial_pool.api import IMPLEMENTED as POOL_IMPLEMENTED

PUBLIC_OPS = ["channel_wise_kd", "pixel_kd", "pfs_pixel_kd", "pairwise_kd", "cross_image_kd", "memory_contrast_kd", "ssim_kd",
              "attnfd_loss", "spatial_pool", "channel_pool", "cbam_gate"]


def test_available_backends_reports_every_backend_with_a_reason():
    report = sk.available_backends()
    assert set(report) == {"reference", "triton", "cuda"}
    assert report["reference"] is True
    assert all(isinstance(v, bool) for v in report.values())
    assert all(isinstance(report.reasons[k], str) and report.reasons[k] for k in report)
    assert "triton" in repr(report) and "cuda" in repr(report)


def test_every_public_op_has_a_reference():
    impls = implemented_backends()
    assert sorted(impls) == sorted(PUBLIC_OPS)
    for op, backends in impls.items():
        assert "reference" in backends, op
        assert torch.float64 in backends["reference"], op


def test_unknown_backend_name():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        sk.spatial_pool(x, backend="fast")


def test_segkd_backend_overrides_auto(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.setenv("SEGKD_BACKEND", "reference")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"
    # an explicit backend argument wins over the environment
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    assert select_backend("spatial_pool", "reference", POOL_IMPLEMENTED, x) == "reference"


def test_segkd_backend_that_cannot_run_raises_and_names_the_variable(monkeypatch):
    monkeypatch.setenv("SEGKD_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="SEGKD_BACKEND='cuda'"):
        sk.spatial_pool(torch.zeros(1, 1, 2, 2))
    monkeypatch.setenv("SEGKD_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SEGKD_BACKEND"):
        sk.spatial_pool(torch.zeros(1, 1, 2, 2))


def test_explicit_backend_never_falls_back():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(BackendUnavailableError, match="has no triton backend"):
        select_backend("some_op", "triton", {"reference": POOL_IMPLEMENTED["reference"]}, x)
    with pytest.raises(BackendUnavailableError, match="tensor on cpu|not built"):
        sk.spatial_pool(x, backend="cuda")


def test_dtype_the_backend_does_not_support():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    assert torch.float64 not in POOL_IMPLEMENTED["cuda"]
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 not supported by the cuda backend"):
        select_backend("spatial_pool", "cuda", POOL_IMPLEMENTED, x)


def test_error_type_is_both_runtime_and_value_error():
    assert issubclass(BackendUnavailableError, RuntimeError)
    assert issubclass(BackendUnavailableError, ValueError)


def test_auto_on_cpu_uses_triton_only_under_the_interpreter(monkeypatch):
    x = torch.zeros(1, 1, 2, 2)
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", True)
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "triton"
    assert select_backend("channel_wise_kd", "auto", {"reference": POOL_IMPLEMENTED["reference"]}, x) == "reference"
    monkeypatch.setattr(_backends, "TRITON_INTERPRET", False)
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        select_backend("spatial_pool", "triton", POOL_IMPLEMENTED, x)


def test_missing_libraries_are_reported(monkeypatch):
    monkeypatch.setattr(_backends, "_TRITON_STATUS", (False, "triton not installed (ImportError: x)"))
    monkeypatch.setattr(_backends, "_CUDA_LIBRARY", (None, "CUDA library not built (test)"))
    report = sk.available_backends()
    assert report == {"reference": True, "triton": False, "cuda": False}
    assert "not installed" in report.reasons["triton"] and "not built" in report.reasons["cuda"]
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(BackendUnavailableError, match="triton not installed"):
        sk.spatial_pool(x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA library not built"):
        sk.spatial_pool(x, backend="cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) == "reference"


@pytest.mark.cuda
def test_auto_on_cuda_picks_a_fused_backend():
    x = torch.zeros(1, 1, 2, 2, device="cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x) in ("triton", "cuda")
    assert select_backend("spatial_pool", "auto", POOL_IMPLEMENTED, x.double()) in ("triton", "reference")


# ---- the eager fast path of the custom ops (ops/_eager.py) ------------------------------------------

def _forward_backward(case, inputs, backend="triton"):
    """Outputs, the autograd node names of the differentiable ones, and the gradients (grad_output 1,
    then 2 through a retained graph, so that saved tensors are used twice)."""
    out = case.api(*inputs.tensors, backend=backend, **inputs.kwargs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    diff = [o for o in outs if o.requires_grad]
    leaves = [inputs.tensors[i] for i in inputs.grad_of]
    grads1 = torch.autograd.grad(diff, leaves, [torch.ones_like(o) for o in diff], retain_graph=True,
                                 allow_unused=True)
    grads2 = torch.autograd.grad(diff, leaves, [torch.full_like(o, 2.0) for o in diff], allow_unused=True)
    nodes = sorted({type(o.grad_fn).__name__ for o in diff})
    return [o.detach() for o in outs], nodes, list(grads1) + list(grads2)


def _case_and_inputs(op):
    """The bench case of an op and its quick inputs; memory_contrast_kd, which has no bench case
    yet, gets inputs of its own shape here (anchors (M, C) and a bank (Q, C))."""
    from types import SimpleNamespace

    from segkd_kernels.bench import cases

    torch.manual_seed(0)
    if op == "memory_contrast_kd":
        s = torch.randn(37, 12, requires_grad=True)
        t, bank = torch.randn(37, 12), torch.nn.functional.normalize(torch.randn(45, 12), dim=1)
        return (SimpleNamespace(api=sk.memory_contrast_kd),
                SimpleNamespace(tensors=[s, t, bank], kwargs={}, grad_of=[0]))
    case = cases.CASES[op]
    return case, case.make(case.quick_shapes[0], torch.float32, "cpu")


@pytest.mark.skipif(not _backends.TRITON_INTERPRET, reason="the triton backend on CPU needs the interpreter")
@pytest.mark.parametrize("op", PUBLIC_OPS + ["knowledge_gap"])
def test_eager_fast_path_matches_the_dispatcher_path(op):
    """Same values and gradients, bit for bit, through the fast path and through the custom op; the
    fast path is the one taken in eager mode (its autograd node replaces the dispatcher's)."""
    from segkd_kernels.ops._eager import dispatcher_path

    if op == "knowledge_gap":  # not a bench case: no gradient, a custom op called without grad
        s, t = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)
        fast = sk.knowledge_gap(s, t, 2.0)  # auto: triton under the interpreter
        with dispatcher_path():
            slow = sk.knowledge_gap(s, t, 2.0)
        assert torch.equal(fast, slow)
        return
    case, inputs = _case_and_inputs(op)
    out_f, nodes_f, grads_f = _forward_backward(case, inputs)
    with dispatcher_path():
        out_s, nodes_s, grads_s = _forward_backward(case, inputs)
    assert len(out_f) == len(out_s) and all(torch.equal(a, b) for a, b in zip(out_f, out_s))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_f, grads_s))
    assert any(n.startswith("EagerBackwardFor_segkd") for n in nodes_f), nodes_f
    assert not any(n.startswith("EagerBackwardFor") for n in nodes_s), nodes_s


@pytest.mark.skipif(not _backends.TRITON_INTERPRET, reason="the triton backend on CPU needs the interpreter")
def test_torch_compile_still_traces_the_custom_ops():
    """Under torch.compile(fullgraph=True) the graph holds the segkd custom ops (not their Python
    bodies), forward and backward, and the result matches eager mode."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    mc, ms = torch.rand(2, 3), torch.rand(2, 1, 4, 5)
    compiled = torch.compile(lambda x, mc, ms: sk.cbam_gate(x, mc, ms, backend="triton").sum(), backend=backend,
                             fullgraph=True)
    torch._dynamo.reset()
    loss = compiled(x, mc, ms)
    (grad,) = torch.autograd.grad(loss, x)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("segkd.cbam_gate_triton" in t for t in targets), targets
    eager_loss = sk.cbam_gate(x, mc, ms, backend="triton").sum()
    (eager_grad,) = torch.autograd.grad(eager_loss, x)
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, eager_grad, rtol=0, atol=0)


def test_fast_path_leaves_meta_tensors_to_the_fake_implementation():
    from segkd_kernels.ops.cbam_gate.triton import cbam_gate_triton

    x = torch.empty(2, 3, 4, 5, device="meta")
    out = cbam_gate_triton(x, torch.empty(2, 3, device="meta"), torch.empty(2, 4, 5, device="meta"))
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.skipif(_backends.host_library()[0] is None, reason="host build of the CUDA kernels not available")
@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_eager_fast_path_matches_the_dispatcher_path_for_the_cuda_kernels(op):
    """The same for the cuda backend's custom ops, run on CPU tensors by the host build of csrc/."""
    from segkd_kernels.ops._eager import dispatcher_path

    if "cuda" not in implemented_backends()[op]:
        pytest.skip(f"{op} has no cuda backend")
    case, inputs = _case_and_inputs(op)
    with _backends.host_execution() as host:
        # the host layer runs blocks and threads in a seeded random order (atomic adds follow it):
        # the same seed for both paths, so that bit-identical is the expectation
        host.host_set_seed(1234)
        out_f, nodes_f, grads_f = _forward_backward(case, inputs, "cuda")
        host.host_set_seed(1234)
        with dispatcher_path():
            out_s, nodes_s, grads_s = _forward_backward(case, inputs, "cuda")
    assert len(out_f) == len(out_s) and all(torch.equal(a, b) for a, b in zip(out_f, out_s))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_f, grads_s))
    assert any(n.startswith("EagerBackwardFor_segkd") for n in nodes_f), nodes_f
    assert not any(n.startswith("EagerBackwardFor") for n in nodes_s), nodes_s


def test_host_grid_helpers_match_triton_and_leave_triton_alone():
    """The wrappers' plain-int cdiv / next_power_of_2 give what Triton's own functions give for host
    ints, and importing the library (which installs the eager fast path) leaves Triton's objects as
    they are: no process-wide patching of a third-party module."""
    triton = pytest.importorskip("triton")
    from triton.runtime.jit import ConstexprFunction

    from segkd_kernels.ops._triton_common import cdiv, next_power_of_2

    for n in [*range(-3, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**40 + 7]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            if n >= 0:
                assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    for fn in (triton.cdiv, triton.next_power_of_2):
        assert type(fn) in (ConstexprFunction, type(cdiv)), type(fn)


@pytest.mark.skipif(not _backends.TRITON_INTERPRET, reason="the triton backend on CPU needs the interpreter")
def test_cached_launch_plans_follow_layout_and_tuning_constants(monkeypatch):
    """A wrapper's cached plan is found again only for the same shapes, strides and tuning constants:
    a changed constant or layout at the same shape gets its own plan (and the same loss)."""
    from segkd_kernels.ops.channel_wise_kd import triton as cwd

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    modes = lambda: sorted(plan[0] for plan in cwd._PLANS.values())  # noqa: E731
    cwd._PLANS.clear()
    base = cwd.channel_wise_kd_triton(s, t, 2.0, False)[0]
    assert modes() == ["one"]
    monkeypatch.setattr(cwd, "_MAX_TILE", 16)
    monkeypatch.setattr(cwd, "_BLOCK", 8)
    split = cwd.channel_wise_kd_triton(s, t, 2.0, False)[0]
    assert modes() == ["one", "split"]
    cl = cwd.channel_wise_kd_triton(s.to(memory_format=torch.channels_last), t, 2.0, False)[0]
    assert len(cwd._PLANS) == 3
    # the same sums in other orders: fp32 rounding of 6 rows x 35 terms, far inside 1e-5 relative
    torch.testing.assert_close(split, base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cl, base, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not _backends.TRITON_INTERPRET, reason="the triton backend on CPU needs the interpreter")
def test_cbam_gate_direct_entry_leaves_dispatch_modes_to_the_custom_op():
    """sk.cbam_gate's Triton entry (ops/cbam_gate/triton.cbam_gate_eager) and its backward run the
    kernels' wrapper themselves only outside dispatch modes: under FakeTensorMode, forward and
    backward reach the op's fake implementations (the wrapper would launch on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 5, requires_grad=True)
        mc, ms = torch.empty(2, 3, requires_grad=True), torch.empty(2, 1, 4, 5, requires_grad=True)
        out = sk.cbam_gate(x, mc, ms, backend="triton")
        out.sum().backward()
    assert isinstance(out, FakeTensor) and out.shape == x.shape
    assert all(isinstance(t.grad, FakeTensor) and t.grad.shape == t.shape for t in (x, mc, ms))


@pytest.mark.skipif(_backends.host_library()[0] is None, reason="host build of the CUDA kernels not available")
def test_cbam_gate_cuda_direct_entry_leaves_dispatch_modes_to_the_custom_op():
    """The same for the cuda entry (ops/cbam_gate/cuda.cbam_gate_cuda_eager), on the host build of
    csrc/: under FakeTensorMode forward and backward reach the ops' fake implementations, and no
    kernel is launched (the wrapper would hand fake tensors' pointers to the launcher)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with _backends.host_execution() as host:
        host.host_reset()
        with FakeTensorMode():
            x = torch.empty(2, 3, 4, 5, requires_grad=True)
            mc, ms = torch.empty(2, 3, requires_grad=True), torch.empty(2, 1, 4, 5, requires_grad=True)
            out = sk.cbam_gate(x, mc, ms, backend="cuda")
            out.sum().backward()
        launches = host.host_stats()["launches"]
    assert launches == 0
    assert isinstance(out, FakeTensor) and out.shape == x.shape
    assert all(isinstance(t.grad, FakeTensor) and t.grad.shape == t.shape for t in (x, mc, ms))


@pytest.mark.skipif(_backends.host_library()[0] is None, reason="host build of the CUDA kernels not available")
def test_cbam_gate_cuda_direct_entry_skips_the_custom_ops_in_eager_mode(monkeypatch):
    """In eager mode the cuda entry and its backward call the kernels' wrappers themselves (the point
    of the entry: no dispatcher round trip), with the values of the ops' own path; under
    dispatcher_path() they go through the ops."""
    from segkd_kernels.ops import _eager
    from segkd_kernels.ops._eager import dispatcher_path

    calls = []
    op_call = _eager._EagerCustomOpDef.__call__

    def counted(self, *args, **kwargs):  # every call of a segkd custom op, whoever makes it
        calls.append(self._qualname.split("::")[1])
        return op_call(self, *args, **kwargs)

    monkeypatch.setattr(_eager._EagerCustomOpDef, "__call__", counted)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    # a strided fp32 gate view (a column of a wider tensor): the wrapper makes it contiguous
    mc = torch.randn(2, 3, 2)[..., 0].requires_grad_()
    ms = torch.rand(2, 1, 4, 5, requires_grad=True)
    up = torch.randn(2, 3, 4, 5)
    with _backends.host_execution() as host:
        results = []
        for path in (contextlib.nullcontext, dispatcher_path):
            host.host_set_seed(1234)
            with path():
                out = sk.cbam_gate(x, mc, ms, backend="cuda")
                results.append((out, *torch.autograd.grad(out, (x, mc, ms), up)))
            assert calls == ([] if path is contextlib.nullcontext else ["cbam_gate_cuda", "cbam_gate_backward_cuda"])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # and the values are M_s * M_c * x: two fp32 products on either side, in any order, each within
    # a relative u = eps / 2, so the two differ by at most 4u (+ O(u^2)) relative
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(results[0][0], ms * (mc[..., None, None] * x), rtol=2.5 * eps, atol=0)
