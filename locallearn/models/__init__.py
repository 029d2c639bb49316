"""Models as lists of atomic layers, the registry that builds them, and the splitter that cuts them."""

from torch import nn

from locallearn.errors import UserError
from locallearn.models import (  # noqa: F401  (importing registers the architectures)
    resnet_cifar,  # resnet20/32/56/110
    resnet_imagenet,  # resnet18/34/50/101/152, resnext101_32x8d
    softhebb,  # softhebb1/2/3, softhebb-stl4, softhebb-imagenet5
    vgg,  # vgg13
)
from locallearn.models.external import as_layered, create_external, layout_of
from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS
from locallearn.models.split import describe_split, resolve_split, split_model, split_names


def create_model(
    name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int | None = None, **kwargs
) -> nn.Module:
    """Build an architecture: a registered one (``create_model("resnet32", num_classes=10, in_channels=1)``, a
    :class:`LayeredModel`), or ``"torchvision:NAME"`` / ``"timm:NAME"`` (the library's own ``nn.Module``, adapted to
    ``num_classes`` and ``in_channels``; ``image_size`` and ``kwargs`` go to timm's constructor)."""
    if ":" in name:
        return create_external(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    factory = MODELS.get(name)
    allowed = getattr(factory, "options", ())
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no constructor options"
        raise UserError(f"{name} {takes} (got {', '.join(unknown)}); other options are for torchvision:/timm:")
    if getattr(factory, "sized", False):
        kwargs["image_size"] = image_size if image_size is not None else 32
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)


__all__ = [
    "LayeredModel",
    "MODELS",
    "as_layered",
    "create_model",
    "layout_of",
    "describe_split",
    "resolve_split",
    "split_model",
    "split_names",
]
