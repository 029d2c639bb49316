"""Every module in this folder is imported here, so a new method is one new file with ``@register_method``."""

import importlib
import pkgutil

from locallearn.methods.base import (
    METHODS,
    ForwardTaps,
    LocalMethod,
    LocalOutput,
    MethodConfig,
    Phase,
    SetupInfo,
    create_method,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def any_model_methods() -> list[str]:
    """The registered methods that train any classifier cut into blocks (all but those tied to their own nets)."""
    return [name for name in METHODS.names() if METHODS.get(name).any_model]


__all__ = [
    "METHODS",
    "ForwardTaps",
    "LocalMethod",
    "LocalOutput",
    "MethodConfig",
    "Phase",
    "SetupInfo",
    "any_model_methods",
    "create_method",
    "register_method",
]
