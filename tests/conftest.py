import os
import sys

# Busy-waiting OpenMP threads (torch's and the native module's) starve each other on a
# loaded 2-core CI machine; passive waiting keeps the test run's time predictable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set
# before triton is first imported (the interpreter hooks into triton.language at import), so
# it is set here, when pytest loads this file, before any test module imports anything.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="module")
def triton_mode():
    """Triton tests run compiled on a GPU, else in the interpreter, which this file turns on
    (TRITON_INTERPRET=1) before triton is imported (tests/ops/compare.py's TRITON_MARKS use it)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (it must be set before triton is imported; tests/conftest.py does)")
    yield
