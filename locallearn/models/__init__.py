"""Models as lists of atomic layers, the registry that builds them, and the splitter that cuts them."""

from locallearn.models import (  # noqa: F401  (importing registers the architectures)
    resnet_cifar,  # resnet20/32/56/110
    resnet_imagenet,  # resnet18/34/50/101/152, resnext101_32x8d
    vgg,  # vgg13
)
from locallearn.models.layered import LayeredModel
from locallearn.models.registry import MODELS
from locallearn.models.split import describe_split, resolve_split, split_model, split_names


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3) -> LayeredModel:
    """Build a registered architecture, e.g. ``create_model("resnet32", num_classes=10, in_channels=1)``."""
    return MODELS.create(name, num_classes=num_classes, in_channels=in_channels)


__all__ = ["LayeredModel", "MODELS", "create_model", "describe_split", "resolve_split", "split_model", "split_names"]
