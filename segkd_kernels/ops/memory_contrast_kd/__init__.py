from .api import memory_contrast_kd

__all__ = ["memory_contrast_kd"]
