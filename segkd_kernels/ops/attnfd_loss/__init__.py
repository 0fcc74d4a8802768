from .api import attnfd_loss

__all__ = ["attnfd_loss"]
