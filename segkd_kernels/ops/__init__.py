"""One folder per op: api.py (validation + the single dispatch), reference.py (pure PyTorch oracle),
triton.py and cuda.py (fused kernels registered as torch.library custom ops) where they exist."""

import importlib

# Public op name -> the ops/<folder> whose api.py holds its IMPLEMENTED table.
OP_FOLDERS = {
    "channel_wise_kd": "channel_wise_kd",
    "pixel_kd": "pixel_kd",
    "pfs_pixel_kd": "pixel_kd",
    "pairwise_kd": "pairwise_kd",
    "cross_image_kd": "cross_image_kd",
    "memory_contrast_kd": "memory_contrast_kd",
    "ssim_kd": "ssim_kd",
    "attnfd_loss": "attnfd_loss",
    "spatial_pool": "spatial_pool",
    "channel_pool": "channel_pool",
    "cbam_gate": "cbam_gate",
}


def implemented_backends() -> dict[str, dict]:
    """{op: {backend: supported dtypes}} for every op that takes a `backend` argument."""
    return {op: dict(importlib.import_module(f"{__name__}.{folder}.api").IMPLEMENTED)
            for op, folder in OP_FOLDERS.items()}
