"""The model registry: ``MODELS.create("resnet32", num_classes=10, in_channels=1)``."""

from locallearn.models.layered import LayeredModel
from locallearn.registry import Registry

MODELS: Registry[LayeredModel] = Registry("arch")
