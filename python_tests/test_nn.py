"""The loss modules of segkd_kernels.nn: each equals its functional counterpart with the same
hyper-parameters (value and student gradient), passes `backend` through, shows its hyper-parameters
in repr, and works under torch.compile. CBAM and AttnFD are tested in test_attnfd.py."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels.testing import assert_close, make_tensor

COMPILE = {"fullgraph": True, "backend": "aot_eager"}


@dataclass
class Case:
    """A module with non-default hyper-parameters and the functional call it must equal."""

    name: str
    module: Callable[..., torch.nn.Module]  # backend -> module
    functional: Callable  # (s, t, **kw, backend) -> loss, with the same hyper-parameters
    default: Callable  # (s, t, **kw) -> loss with default hyper-parameters (must differ)
    shapes: tuple  # student, teacher
    kwargs: Callable[[], dict] = field(default=lambda: {})  # forward keyword arguments
    repr_parts: tuple = ()
    differs_in: str = "value"  # "value" or "grad": where the non-default hyper-parameters show
    op: str = ""


def _pixel_maps():
    n, h, w = 2, 5, 7
    weight = torch.rand(n, h, w, generator=torch.Generator().manual_seed(3)) + 0.5
    ignore = torch.zeros(n, h, w, dtype=torch.bool)
    ignore[0, :2] = True
    ignore[1, :, -1] = True
    return {"weight": weight, "ignore_mask": ignore}


def _ignore_only():
    return {"ignore_mask": _pixel_maps()["ignore_mask"]}


CASES = [
    Case("ChannelWiseKD",
         lambda backend="auto": sk.nn.ChannelWiseKD(tau=2.5, backend=backend),
         lambda s, t, backend="auto": sk.channel_wise_kd(s, t, 2.5, backend=backend),
         lambda s, t: sk.channel_wise_kd(s, t),
         ((2, 3, 5, 7), (2, 3, 5, 7)), repr_parts=("tau=2.5",), op="channel_wise_kd"),
    Case("PixelKD",
         lambda backend="auto": sk.nn.PixelKD(tau=2.0, backend=backend),
         lambda s, t, backend="auto", **kw: sk.pixel_kd(s, t, 2.0, backend=backend, **kw),
         lambda s, t, **kw: sk.pixel_kd(s, t, **kw),
         ((2, 4, 5, 7), (2, 4, 5, 7)), kwargs=_pixel_maps, repr_parts=("tau=2.0",), op="pixel_kd"),
    Case("PFSPixelKD",
         lambda backend="auto": sk.nn.PFSPixelKD(tau=3.0, backend=backend),
         lambda s, t, backend="auto", **kw: sk.pfs_pixel_kd(s, t, 3.0, backend=backend, **kw),
         lambda s, t, **kw: sk.pfs_pixel_kd(s, t, **kw),
         ((2, 4, 5, 7), (2, 4, 5, 7)), kwargs=_ignore_only, repr_parts=("tau=3.0",), op="pfs_pixel_kd"),
    Case("PairwiseKD-pool",
         lambda backend="auto": sk.nn.PairwiseKD(pool=2, backend=backend),
         lambda s, t, backend="auto": sk.pairwise_kd(s, t, pool=2, backend=backend),
         lambda s, t: sk.pairwise_kd(s, t),
         ((2, 3, 5, 7), (2, 6, 5, 7)), repr_parts=("pool=2", "detach_norm=False"), op="pairwise_kd"),
    Case("PairwiseKD-detach_norm",
         lambda backend="auto": sk.nn.PairwiseKD(detach_norm=True, backend=backend),
         lambda s, t, backend="auto": sk.pairwise_kd(s, t, detach_norm=True, backend=backend),
         lambda s, t: sk.pairwise_kd(s, t),
         ((2, 3, 5, 7), (2, 6, 5, 7)), repr_parts=("pool=None", "detach_norm=True"), differs_in="grad",
         op="pairwise_kd"),
    Case("CrossImageKD",
         lambda backend="auto": sk.nn.CrossImageKD(tau=0.5, backend=backend),
         lambda s, t, backend="auto": sk.cross_image_kd(s, t, 0.5, backend=backend),
         lambda s, t: sk.cross_image_kd(s, t),
         ((3, 4, 3, 5), (3, 6, 3, 5)), repr_parts=("tau=0.5",), op="cross_image_kd"),
    Case("SSIMKD-zeros",
         lambda backend="auto": sk.nn.SSIMKD(window_size=7, padding="zeros", backend=backend),
         lambda s, t, backend="auto": sk.ssim_kd(s, t, window_size=7, padding="zeros", backend=backend),
         lambda s, t: sk.ssim_kd(s, t),
         ((2, 3, 9, 10), (2, 3, 9, 10)), repr_parts=("window_size=7", "padding='zeros'"), op="ssim_kd"),
    Case("SSIMKD-all",
         lambda backend="auto": sk.nn.SSIMKD(window_size=5, sigma=0.8, data_range=2.0, padding="valid",
                                             normalize=False, backend=backend),
         lambda s, t, backend="auto": sk.ssim_kd(s, t, window_size=5, sigma=0.8, data_range=2.0,
                                                 padding="valid", normalize=False, backend=backend),
         lambda s, t: sk.ssim_kd(s, t),
         ((2, 3, 9, 10), (2, 3, 9, 10)),
         repr_parts=("window_size=5", "sigma=0.8", "data_range=2.0", "padding='valid'", "normalize=False"),
         op="ssim_kd"),
    Case("SSIMKD-sigma",  # one hyper-parameter at a time: each one must reach the function
         lambda backend="auto": sk.nn.SSIMKD(sigma=3.0, backend=backend),
         lambda s, t, backend="auto": sk.ssim_kd(s, t, sigma=3.0, backend=backend),
         lambda s, t: sk.ssim_kd(s, t),
         ((2, 3, 12, 12), (2, 3, 12, 12)), repr_parts=("sigma=3.0",), op="ssim_kd"),
    Case("SSIMKD-data_range",
         lambda backend="auto": sk.nn.SSIMKD(data_range=0.25, backend=backend),
         lambda s, t, backend="auto": sk.ssim_kd(s, t, data_range=0.25, backend=backend),
         lambda s, t: sk.ssim_kd(s, t),
         ((2, 3, 12, 12), (2, 3, 12, 12)), repr_parts=("data_range=0.25",), op="ssim_kd"),
    Case("SSIMKD-normalize",
         lambda backend="auto": sk.nn.SSIMKD(normalize=False, backend=backend),
         lambda s, t, backend="auto": sk.ssim_kd(s, t, normalize=False, backend=backend),
         lambda s, t: sk.ssim_kd(s, t),
         ((2, 3, 12, 12), (2, 3, 12, 12)), repr_parts=("normalize=False",), op="ssim_kd"),
]
IDS = [c.name for c in CASES]


def _inputs(case: Case, dtype=torch.float64):
    s = make_tensor(case.shapes[0], dtype=dtype, seed=1, requires_grad=True)
    t = make_tensor(case.shapes[1], dtype=dtype, seed=2)
    return s, t


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_equals_functional(case, dtype):
    s, t = _inputs(case, dtype)
    kw = case.kwargs()
    loss_m = case.module()(s, t, **kw)
    (grad_m,) = torch.autograd.grad(1.5 * loss_m, s)
    loss_f = case.functional(s, t, **kw)
    (grad_f,) = torch.autograd.grad(1.5 * loss_f, s)
    assert loss_m.shape == () and loss_m.dtype == dtype
    assert_close(loss_m, loss_f)
    assert_close(grad_m, grad_f)
    # the non-default hyper-parameters matter for these inputs, so the comparison above can fail
    loss_d = case.default(s, t, **kw)
    (grad_d,) = torch.autograd.grad(loss_d, s)
    if case.differs_in == "value":
        assert abs(loss_d.item() - loss_f.item()) > 1e-4 * max(1.0, abs(loss_f.item()))
    else:
        assert (1.5 * grad_d - grad_f).abs().max() > 1e-4 * grad_f.abs().max()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_teacher_gets_no_gradient(case):
    s, _ = _inputs(case)
    t = make_tensor(case.shapes[1], dtype=torch.float64, seed=2, requires_grad=True)
    case.module()(s, t, **case.kwargs()).backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert t.grad is None or not t.grad.any()


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_module_backend_passthrough(case, backend):
    """The module runs exactly the functional call with its backend: same value where that backend
    can run these inputs, the same refusal (never a silent fallback) where it cannot."""
    s, t = _inputs(case, torch.float32)
    kw = case.kwargs()
    try:
        want = case.functional(s, t, backend=backend, **kw)
    except sk.BackendUnavailableError as err:
        with pytest.raises(sk.BackendUnavailableError, match=re.escape(str(err).split(":")[0])):
            case.module(backend)(s, t, **kw)
    else:
        assert_close(case.module(backend)(s, t, **kw), want)
    with pytest.raises(ValueError, match="backend"):
        case.module("fastest")(s, t, **kw)
    assert_close(case.module("reference")(s, t, **kw), case.functional(s, t, backend="reference", **kw))
    assert case.module("reference").backend == "reference"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_module_repr_shows_hyper_parameters(case):
    text = repr(case.module())
    assert text.startswith(case.name.split("-")[0] + "(")
    for part in case.repr_parts:
        assert part in text, f"{part!r} missing from {text!r}"


@pytest.mark.parametrize(
    "module, expected",
    [(sk.nn.ChannelWiseKD, "tau=4.0"), (sk.nn.PixelKD, "tau=1.0"), (sk.nn.PFSPixelKD, "tau=1.0"),
     (sk.nn.CrossImageKD, "tau=0.1"), (sk.nn.PairwiseKD, "pool=None, detach_norm=False"),
     (sk.nn.SSIMKD, "window_size=11, sigma=1.5, data_range=1.0, padding='reflect', normalize=True")],
)
def test_module_defaults_follow_the_api(module, expected):
    """Default hyper-parameters as in docs/api.md / docs/losses.md."""
    assert expected in repr(module())


def test_modules_have_no_parameters_and_save_their_settings():
    for case in CASES:
        m = case.module()
        assert list(m.parameters()) == [] and list(m.buffers()) == []
        assert copy.deepcopy(m).extra_repr() == m.extra_repr()


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 4, 5, 7)],
                         ids=[IDS[i] for i in (0, 1, 2, 4, 5, 7)])
def test_module_compiles(case):
    s, t = _inputs(case, torch.float32)
    kw = case.kwargs()
    m = case.module()
    loss_e = m(s, t, **kw)
    (grad_e,) = torch.autograd.grad(2.0 * loss_e, s)
    compiled = torch.compile(m, **COMPILE)
    loss_c = compiled(s, t, **kw)
    (grad_c,) = torch.autograd.grad(2.0 * loss_c, s)
    assert_close(loss_c, loss_e)
    assert_close(grad_c, grad_e)


def test_modules_reexported():
    for name in sk.nn.__all__:
        assert issubclass(getattr(sk.nn, name), torch.nn.Module)
    assert set(sk.nn.__all__) >= {"ChannelWiseKD", "PixelKD", "PFSPixelKD", "PairwiseKD", "CrossImageKD",
                                  "SSIMKD", "CBAM", "AttnFD"}


@pytest.mark.parametrize(
    "make, shapes, name",
    [(lambda: sk.nn.ChannelWiseKD(tau=0.0), ((1, 2, 3, 3), (1, 2, 3, 3)), "tau"),
     (lambda: sk.nn.PixelKD(tau=-1.0), ((1, 2, 3, 3), (1, 2, 3, 3)), "tau"),
     (lambda: sk.nn.CrossImageKD(tau=float("inf")), ((1, 2, 3, 3), (1, 2, 3, 3)), "tau"),
     (lambda: sk.nn.PairwiseKD(pool=0), ((1, 2, 3, 3), (1, 2, 3, 3)), "pool"),
     (lambda: sk.nn.SSIMKD(window_size=4), ((1, 2, 8, 8), (1, 2, 8, 8)), "window_size"),
     (lambda: sk.nn.SSIMKD(padding="same"), ((1, 2, 8, 8), (1, 2, 8, 8)), "padding"),
     (lambda: sk.nn.ChannelWiseKD(), ((1, 2, 3, 3), (1, 3, 3, 3)), "teacher")],
    ids=["cwd_tau", "pixel_tau", "cirkd_tau", "pairwise_pool", "ssim_window", "ssim_padding", "cwd_shape"],
)
def test_module_bad_settings_raise_on_call(make, shapes, name):
    """The modules forward their settings to the functions, whose checks name the argument."""
    with pytest.raises(ValueError, match=name):
        make()(torch.randn(*shapes[0]), torch.randn(*shapes[1]))


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: sk.nn.ChannelWiseKD(tau=0), "tau"),
        (lambda: sk.nn.PixelKD(tau=-1.0), "tau"),
        (lambda: sk.nn.PFSPixelKD(tau=float("nan")), "tau"),
        (lambda: sk.nn.CrossImageKD(tau=0.0), "tau"),
        (lambda: sk.nn.PairwiseKD(pool=0), "pool"),
        (lambda: sk.nn.SSIMKD(window_size=8), "window_size"),
        (lambda: sk.nn.SSIMKD(padding="same"), "padding"),
        (lambda: sk.nn.SSIMKD(sigma=0), "sigma"),
        (lambda: sk.nn.SSIMKD(data_range=-1), "data_range"),
        (lambda: sk.nn.ChannelWiseKD(backend="fastest"), "backend"),
        (lambda: sk.nn.CBAM(8, backend="gpu"), "backend"),
        # flags must be bools, as the functions require (a string would be read by its truth value)
        (lambda: sk.nn.SSIMKD(normalize="yes"), "normalize"),
        (lambda: sk.nn.SSIMKD(normalize=None), "normalize"),
        (lambda: sk.nn.PairwiseKD(detach_norm=1), "detach_norm"),
        (lambda: sk.nn.CBAM(8.0), "channels"),
        (lambda: sk.nn.CBAM(8, reduction=True), "reduction"),
        (lambda: sk.nn.CBAM(8, kernel_size=6), "kernel_size"),
        (lambda: sk.nn.CBAM(8, kernel_size="7"), "kernel_size"),
        (lambda: sk.nn.AttnFD(4, 0), "teacher_channels"),
        (lambda: sk.nn.AttnFD(4.5, 8), "student_channels"),
    ],
)
def test_bad_hyper_parameters_raise_when_the_module_is_built(build, argument):
    with pytest.raises(ValueError, match=argument) as err:
        build()
    assert "\n" not in str(err.value)  # one line


def test_cbam_repr_shows_its_shape():
    assert "channels=32, reduction=8, kernel_size=5" in repr(sk.nn.CBAM(32, reduction=8, kernel_size=5))


def test_cbam_spatial_batchnorm_momentum_and_hidden_width():
    """The spatial gate's BatchNorm moves its running mean by 1% of the batch mean per step (AttnFD's
    CBAM), and the MLP keeps one hidden unit when channels < reduction (C // r would be 0)."""
    torch.manual_seed(0)
    m = sk.nn.CBAM(32, reduction=16, kernel_size=3, backend="reference").train()
    assert m.mlp[0].out_features == 2
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        pre = m.conv(sk.channel_pool(x, m.channel_gate(x), backend="reference"))
        m(x)
    torch.testing.assert_close(m.bn.running_mean, 0.01 * pre.mean().reshape(1))
    var = pre.var(unbiased=True).reshape(1)
    torch.testing.assert_close(m.bn.running_var, 0.99 * torch.ones(1) + 0.01 * var)
    assert sk.nn.CBAM(8, reduction=16).mlp[0].out_features == 1
