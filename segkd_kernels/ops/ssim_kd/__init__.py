from .api import ssim_kd

__all__ = ["ssim_kd"]
