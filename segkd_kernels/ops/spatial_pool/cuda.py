"""spatial_pool on the hand-written CUDA kernels of csrc/spatial_pool.cu."""

import torch

from .._cuda_common import cuda_lib, launch_args
from . import autograd


@torch.library.custom_op("segkd::spatial_pool_cuda", mutates_args=())
def spatial_pool_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = cuda_lib("spatial_pool")
    args = launch_args("spatial_pool", x)
    x = x.contiguous()
    n, c, h, w = x.shape
    avg = x.new_empty(n, c)
    mx = x.new_empty(n, c)
    argmax = x.new_empty(n, c, dtype=torch.int64)
    # rows that alone fill less than two waves are split over blocks: per-range partials (fp32)
    floats = lib.spatial_pool_workspace(n * c, h * w, args["dtype"], args["device"])
    ws = torch.empty(floats, dtype=torch.float32, device=x.device) if floats else None
    lib.spatial_pool_forward(x.data_ptr(), avg.data_ptr(), mx.data_ptr(), argmax.data_ptr(),
                             0 if ws is None else ws.data_ptr(), floats, n * c, h * w, **args)
    return avg, mx, argmax


@torch.library.custom_op("segkd::spatial_pool_backward_cuda", mutates_args=())
def spatial_pool_backward_cuda(grad_avg: torch.Tensor, grad_max: torch.Tensor, argmax: torch.Tensor,
                               h: int, w: int) -> torch.Tensor:
    lib = cuda_lib("spatial_pool")
    args = launch_args("spatial_pool", grad_avg)
    grad_avg, grad_max, argmax = grad_avg.contiguous(), grad_max.contiguous(), argmax.contiguous()
    n, c = grad_avg.shape
    dx = grad_avg.new_empty(n, c, h, w)
    lib.spatial_pool_backward(grad_avg.data_ptr(), grad_max.data_ptr(), argmax.data_ptr(), dx.data_ptr(),
                              n * c, h * w, **args)
    return dx


autograd.register(spatial_pool_cuda, spatial_pool_backward_cuda)
