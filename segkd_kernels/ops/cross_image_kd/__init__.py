from .api import cross_image_kd

__all__ = ["cross_image_kd"]
