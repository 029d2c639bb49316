"""locallearn: supervised local learning for PyTorch.

A network is cut into K gradient-isolated blocks; each block learns from its own auxiliary network and loss, and no
gradient crosses a block boundary. See README.md for the methods (E2E, DGL, …) and the engine's data flow.
"""

from locallearn.config import RunConfig
from locallearn.data import Batch, DataConfig, build_data
from locallearn.errors import UserError
from locallearn.learner import LocalLearner
from locallearn.methods import METHODS, LocalMethod, create_method, register_method
from locallearn.mixing import BatchMixer
from locallearn.models import MODELS, LayeredModel, create_model, resolve_split, split_model
from locallearn.optim import OptimConfig, lr_at
from locallearn.version import __version__

__all__ = [
    "__version__",
    "Batch",
    "BatchMixer",
    "DataConfig",
    "LayeredModel",
    "LocalLearner",
    "LocalMethod",
    "METHODS",
    "MODELS",
    "OptimConfig",
    "RunConfig",
    "UserError",
    "build_data",
    "create_method",
    "create_model",
    "lr_at",
    "register_method",
    "resolve_split",
    "split_model",
]
