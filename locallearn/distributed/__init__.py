"""Scale-out on ``torch.distributed``: data-parallel local learning and blocks pipelined across processes.

* :mod:`locallearn.distributed.context` — the process group from torchrun's environment.
* :mod:`locallearn.distributed.data_parallel` — every rank all blocks, gradients averaged block by block.
* :mod:`locallearn.distributed.pipeline` — one contiguous stage of blocks per rank, no backward message.
* :mod:`locallearn.distributed.runtime` — how the runner's loop calls each mode.

See docs/distributed.md for how to launch each mode and what is exact.
"""

from locallearn.distributed.context import DistContext, init_from_env, launched
from locallearn.distributed.data_parallel import DataParallel
from locallearn.distributed.pipeline import PipelineStage, balance

__all__ = ["DataParallel", "DistContext", "PipelineStage", "balance", "init_from_env", "launched"]
