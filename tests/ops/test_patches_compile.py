"""torch.compile(fullgraph=True) through fastcl.gather_patches, and torch.library.opcheck of its ops."""
import pytest
import torch

import fastcl
from fastcl.ops.patches import naive
from fastcl.ops.patches.sampling import axis_taps

BACKENDS = ["torch"] + (["cpu"] if fastcl.backends()["cpu"].available else [])


def _patches_loss(images, index, backend):
    patches, positions = fastcl.gather_patches(images, index, 5, (23, 29), backend=backend)
    return (patches * torch.linspace(-1, 1, patches.shape[-1])).sum() + positions.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches_eager_and_naive(backend):
    torch._dynamo.reset()
    images = torch.randn(2, 3, 37, 41)
    index = torch.tensor([[0, 7, 19], [3, 3, 12]])
    results = []
    for fn in (_patches_loss, torch.compile(_patches_loss, fullgraph=True, backend="aot_eager")):
        leaf = images.clone().requires_grad_()
        loss = fn(leaf, index, backend)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
    leaf = images.clone().requires_grad_()
    reference, _ = naive.gather_patches(leaf, index, 5, (23, 29))
    (reference * torch.linspace(-1, 1, reference.shape[-1])).sum().backward()
    torch.testing.assert_close(eager_grad, leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fastcl.backends()["cpu"].available, reason="native CPU kernels not built")
def test_opcheck():
    images = torch.randn(2, 3, 37, 41, requires_grad=True)
    index = torch.tensor([[0, 7, 19], [3, 3, 12]])
    rows, cols = axis_taps(37, 23, torch.float32, "cpu"), axis_taps(41, 29, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastcl.gather_patches_forward.default,
                          (images, index, *rows, *cols, 5, 5, "cpu"))
    grad = torch.randn(2, 3, 75)
    torch.library.opcheck(torch.ops.fastcl.gather_patches_backward.default,
                          (grad, index, *rows, *cols, 5, 5, 37, 41, "cpu"),
                          test_utils=("test_schema", "test_faketensor"))
