from .api import knowledge_gap, pfs_pixel_kd, pixel_kd

__all__ = ["pixel_kd", "knowledge_gap", "pfs_pixel_kd"]
