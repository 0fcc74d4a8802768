"""spatial_pool: every backend against an explicit-loop oracle, gradients, custom-op checks."""

import pytest
import torch

import segkd_kernels as sk
from segkd_kernels.ops.spatial_pool.cuda import spatial_pool_backward_cuda, spatial_pool_cuda
from segkd_kernels.ops.spatial_pool.triton import spatial_pool_backward_triton, spatial_pool_triton
from segkd_kernels.testing import assert_close, channels_last, make_tensor, non_contiguous

# H*W = 1, odd sizes, a row longer than the forward block (2048) and the backward block (1024).
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 47, 53), (3, 1, 1, 9)]


def loop_oracle(x: torch.Tensor):
    """Mean and max of each (n, c) plane with Python loops, plus the first argmax."""
    n, c = x.shape[:2]
    avg = torch.empty(n, c, dtype=torch.float64)
    mx = torch.empty(n, c, dtype=torch.float64)
    first = torch.empty(n, c, dtype=torch.int64)
    for i in range(n):
        for j in range(c):
            values = x[i, j].double().flatten().tolist()
            avg[i, j] = sum(values) / len(values)
            mx[i, j] = max(values)
            first[i, j] = values.index(max(values))
    return avg, mx, first


def grad_oracle(x, g_avg, g_max):
    _, _, first = loop_oracle(x)
    n, c, h, w = x.shape
    dx = g_avg.double()[:, :, None, None].expand(n, c, h, w) / (h * w)
    dx = dx.reshape(n, c, h * w).clone()
    dx.scatter_add_(2, first[:, :, None], g_max.double()[:, :, None])
    return dx.reshape(n, c, h, w)


def backends_on(device):
    names = ["reference", "triton"]
    if device == "cuda":
        names.append("cuda")
    return names


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_grads_against_loops(shape, backend, dtype, device):
    x = make_tensor(shape, dtype=dtype, device=device, seed=3, requires_grad=True)
    avg, mx = sk.spatial_pool(x, backend=backend)
    ref_avg, ref_max, _ = loop_oracle(x.detach().cpu())
    assert avg.dtype == dtype and mx.dtype == dtype and avg.shape == shape[:2]
    assert_close(avg.cpu(), ref_avg.to(dtype))
    assert_close(mx.cpu(), ref_max.to(dtype))
    # grad_output != 1: independent random weights on both outputs
    g_avg = make_tensor(shape[:2], dtype=dtype, device=device, seed=4)
    g_max = make_tensor(shape[:2], dtype=dtype, device=device, seed=5)
    (dx,) = torch.autograd.grad((avg * g_avg).sum() + (mx * g_max).sum(), x)
    assert_close(dx.cpu(), grad_oracle(x.detach().cpu(), g_avg.cpu(), g_max.cpu()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype, device):
    x = make_tensor((2, 3, 33, 35), dtype=dtype, device=device, seed=6) + 100  # large offset: fp16 sums lose bits
    for backend in backends_on(device):
        avg, mx = sk.spatial_pool(x, backend=backend)
        assert avg.dtype == dtype
        exact = x.double().mean(dim=(2, 3)).to(dtype)  # fp32 accumulation rounds to the same value
        # The Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest (GPUs round),
        # so on CPU the triton result may sit one bf16 step (0.5 at 100) below.
        interpreted_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
        torch.testing.assert_close(avg, exact, rtol=0, atol=0.5 if interpreted_bf16 else 0)
        torch.testing.assert_close(mx, x.amax(dim=(2, 3)), rtol=0, atol=0)


@pytest.mark.parametrize("layout", [non_contiguous, channels_last])
def test_layouts(layout, device):
    base = make_tensor((2, 5, 7, 9), device=device, seed=7, requires_grad=True)
    other = layout(base)
    for backend in backends_on(device):
        a = sk.spatial_pool(base, backend=backend)
        b = sk.spatial_pool(other, backend=backend)
        # same values up to summation order (torch's mean reduces strided inputs in another order)
        for out_a, out_b in zip(a, b):
            assert_close(out_b, out_a)
        ga = torch.autograd.grad(sum(o.sum() * (k + 1) for k, o in enumerate(a)), base)[0]
        gb = torch.autograd.grad(sum(o.sum() * (k + 1) for k, o in enumerate(b)), other)[0]
        assert_close(gb, ga)


def test_ties_route_the_max_gradient_to_the_first_maximum(device):
    x = torch.zeros(1, 2, 3, 4, device=device)
    x[0, 0, 1, 2] = x[0, 0, 2, 3] = 5.0  # tie at flat positions 6 and 11
    x.requires_grad_(True)
    _, mx = sk.spatial_pool(x, backend="triton")
    (dx,) = torch.autograd.grad(mx.sum(), x)
    assert dx[0, 0, 1, 2] == 1 and dx[0, 0, 2, 3] == 0
    assert dx[0, 1].flatten()[0] == 1 and dx[0, 1].sum() == 1  # all-zero plane: first element


def test_rows_of_minus_infinity_keep_a_valid_argmax(device):
    x = torch.full((1, 2, 3, 3), float("-inf"), device=device)
    avg, mx, argmax = spatial_pool_triton(x)
    assert torch.isinf(mx).all() and (argmax == 0).all()


def test_gradcheck_triton_fp64(device):
    x = make_tensor((2, 3, 4, 5), dtype=torch.float64, device=device, seed=8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sk.spatial_pool(t, backend="triton"), (x,))


def test_gradcheck_reference_fp64():
    x = make_tensor((2, 3, 4, 5), dtype=torch.float64, seed=9, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sk.spatial_pool(t, backend="reference"), (x,))


def test_opcheck_triton_ops(device):
    x = make_tensor((2, 3, 5, 7), device=device, seed=10, requires_grad=True)
    torch.library.opcheck(spatial_pool_triton, (x,))
    grads = (make_tensor((2, 3), device=device, seed=11), make_tensor((2, 3), device=device, seed=12))
    argmax = torch.randint(0, 35, (2, 3), device=device)
    torch.library.opcheck(spatial_pool_backward_triton, (*grads, argmax, 5, 7))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend, device):
    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    fn = torch.compile(lambda t: sk.spatial_pool(t, backend=backend), fullgraph=True, backend=compile_backend)
    x = make_tensor((2, 3, 6, 5), device=device, seed=13, requires_grad=True)
    avg, mx = fn(x)
    (g,) = torch.autograd.grad(avg.sum() + 2 * mx.sum(), x)
    ref = sk.spatial_pool(x, backend="reference")
    (g_ref,) = torch.autograd.grad(ref[0].sum() + 2 * ref[1].sum(), x)
    torch.testing.assert_close((avg, mx), ref)
    torch.testing.assert_close(g, g_ref)


def test_bad_input():
    with pytest.raises(ValueError, match="x: expected a 4-d tensor"):
        sk.spatial_pool(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        sk.spatial_pool(torch.zeros(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="x: expected a non-empty tensor"):
        sk.spatial_pool(torch.zeros(2, 0, 4, 4))


def test_cuda_backend_on_cpu_tensor_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        sk.spatial_pool(torch.zeros(1, 2, 3, 3), backend="cuda")
    # the custom op itself, called directly, also explains instead of crashing
    with pytest.raises(RuntimeError, match="CUDA tensors|not built"):
        spatial_pool_cuda(torch.zeros(1, 2, 3, 3))


# ---- GPU only ---------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(8, 256, 64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_against_fp64_reference(shape, dtype, backend):
    from segkd_kernels.testing import within_error_budget

    x = make_tensor(shape, dtype=dtype, device="cuda", seed=14, requires_grad=True)
    avg, mx = sk.spatial_pool(x, backend=backend)
    ref64 = sk.spatial_pool(x.detach().double(), backend="reference")
    ref_lp = (ref64[0].to(dtype), ref64[1].to(dtype))  # the reference's own rounding in this dtype
    assert within_error_budget(avg, ref_lp[0], ref64[0])
    torch.testing.assert_close(mx.double(), ref64[1], rtol=0, atol=0)
    g_avg = make_tensor(shape[:2], dtype=dtype, device="cuda", seed=15)
    g_max = make_tensor(shape[:2], dtype=dtype, device="cuda", seed=16)
    (dx,) = torch.autograd.grad((avg * g_avg).sum() + (mx * g_max).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    a64, m64 = sk.spatial_pool(x64, backend="reference")
    (dx64,) = torch.autograd.grad((a64 * g_avg.double()).sum() + (m64 * g_max.double()).sum(), x64)
    assert within_error_budget(dx, dx64.to(dtype), dx64)


@pytest.mark.cuda
def test_opcheck_cuda_ops():
    x = make_tensor((2, 3, 5, 7), device="cuda", seed=17, requires_grad=True)
    torch.library.opcheck(spatial_pool_cuda, (x,))
    grads = (make_tensor((2, 3), device="cuda", seed=18), make_tensor((2, 3), device="cuda", seed=19))
    argmax = torch.randint(0, 35, (2, 3), device="cuda")
    torch.library.opcheck(spatial_pool_backward_cuda, (*grads, argmax, 5, 7))


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    x = make_tensor((4, 8, 33, 31), device="cuda", seed=20)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        avg, mx = sk.spatial_pool(x, backend="cuda")
    stream.synchronize()
    torch.testing.assert_close((avg, mx), sk.spatial_pool(x, backend="reference"))
