"""Shared fixtures: every SDE, dtypes and devices the core must support."""

import pytest
import torch

import scoresde

ALL_SDES = scoresde.SDES  # name -> class, each constructible with its defaults

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=sorted(ALL_SDES))
def sde(request):
    return ALL_SDES[request.param]()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use small tensors: a second intra-op thread only waits (and costs ~15x CPU time on a
    loaded 2-core machine). One thread keeps the suite fast and deterministic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
