from .api import pairwise_kd

__all__ = ["pairwise_kd"]
