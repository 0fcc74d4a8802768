from .api import spatial_pool

__all__ = ["spatial_pool"]
