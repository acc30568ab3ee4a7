"""Packages whose names are imported on first use, so that their torch-free parts (the scheduler, the simulator, the
benchmark client) load without torch and the models."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package` that imports each exported name from its module (`exports`: name ->
    module path) when it is first read."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
