"""segkd_kernels: fused knowledge-distillation losses for semantic segmentation.

Every loss has a readable PyTorch reference and, where written, fused Triton and CUDA kernels
behind one API (docs/api.md); semantics in docs/losses.md. Importing the package registers every custom op.
"""

from . import compat, nn
from ._backends import BackendUnavailableError, available_backends
from .ops.attnfd_loss import attnfd_loss
from .ops.cbam_gate import cbam_gate
from .ops.channel_pool import channel_pool
from .ops.channel_wise_kd import channel_wise_kd
from .ops.cross_image_kd import cross_image_kd
from .ops.memory_contrast_kd import memory_contrast_kd
from .ops.pairwise_kd import pairwise_kd
from .ops.pixel_kd import knowledge_gap, pfs_pixel_kd, pixel_kd
from .ops.spatial_pool import spatial_pool
from .ops.ssim_kd import ssim_kd

__version__ = "0.1.0"

__all__ = [
    "channel_wise_kd",
    "pixel_kd",
    "knowledge_gap",
    "pfs_pixel_kd",
    "pairwise_kd",
    "cross_image_kd",
    "memory_contrast_kd",
    "ssim_kd",
    "attnfd_loss",
    "spatial_pool",
    "channel_pool",
    "cbam_gate",
    "available_backends",
    "BackendUnavailableError",
    "nn",
    "compat",
    "__version__",
]
