"""Distillers: one file per method, registered by name.

Adding a method is one new file in this folder that subclasses `Distiller` and decorates it with
`@register("name")`; every module here is imported when the registry is first used.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Distiller, register

__all__ = ["Distiller", "register", "build_distiller", "methods", "get_method"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def methods() -> tuple[str, ...]:
    """Registered method names, sorted."""
    _load_all()
    return tuple(sorted(REGISTRY))


def get_method(name: str) -> type[Distiller]:
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"method: unknown distillation method {name!r}; choices: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_distiller(name: str, student_channels: dict[str, int], teacher_channels: dict[str, int],
                    num_classes: int, *, weights: dict | None = None, options: dict | None = None,
                    backend: str = "auto") -> Distiller:
    """The distiller `name`, its adapters sized from the two models' `feature_channels`."""
    cls = get_method(name)
    return cls(student_channels, teacher_channels, num_classes, weights=weights, options=options, backend=backend)
