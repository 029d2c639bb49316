"""Every module in this folder is imported here, so a new method is one new file with ``@register_method``."""

import importlib
import pkgutil

from locallearn.methods.base import (
    METHODS,
    LocalMethod,
    LocalOutput,
    MethodConfig,
    SetupInfo,
    create_method,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "LocalMethod", "LocalOutput", "MethodConfig", "SetupInfo", "create_method", "register_method"]
