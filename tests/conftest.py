import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several row blocks at test-sized shapes so the block loop itself is exercised."""
    monkeypatch.setenv("FASTCL_BLOCK_ROWS", "7")
    yield
