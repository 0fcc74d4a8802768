from .api import channel_wise_kd

__all__ = ["channel_wise_kd"]
