import pytest
import torch

# The tests use small tensors: one intra-op thread is as fast, and immune to the 10-25x slowdown
# OpenMP's spinning threads suffer when the machine's cores are shared with other processes.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible to torch on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
