import os

import pytest
import torch

from locallearn.data import Batch

# The suite's tensors are tiny: one thread avoids the thread-pool overhead (and the oversubscription when two test
# processes share the 2-core CI machine) that made single small ops take milliseconds.
torch.set_num_threads(1)
# ... and the processes the tests start (`locallearn train`, bench rows, torchrun workers) one each too: the suite runs
# on two pytest-xdist workers, and a child with two OpenMP threads beside the other worker oversubscribes the cores
# (spinning threads then wait for each other). Results compared across processes are all made at one thread.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


def make_batches(n: int, shape=(1, 28, 28), batch_size: int = 8, num_classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        raw = torch.rand(batch_size, *shape, generator=g)
        out.append(Batch((raw - 0.5) / 0.5, torch.randint(0, num_classes, (batch_size,), generator=g), raw))
    return out
