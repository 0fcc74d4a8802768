from .api import channel_pool

__all__ = ["channel_pool"]
