from .api import cbam_gate

__all__ = ["cbam_gate"]
