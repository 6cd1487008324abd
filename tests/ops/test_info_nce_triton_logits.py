"""The Triton symmetric (CLIP) loss at large unnormalized logits, 1e2 to 1e7, against the float64
reference.

The key->query direction rides along the row pass (column sums shifted by a bound, added with
atomics); the columns whose shifted sum underflowed get their LSE from a filtered recompute, and
the backward kernels form exp(s_ij - LSE_j) from tiles they recompute. At |s| = 1e6 one ulp of a
similarity is 0.06-0.25 in that exponent, so the LSE must come from the very tiles the backward
kernels form. Each case also runs with tile products whose rounding depends on the element's
place in the tile, as numpy's OpenBLAS kernels for AVX2 CPUs (Haswell, Zen) round them: there a
recompute that read the transposed product (keys . queries) was 3-8 % off at 2e6. With the
positives along their queries the loss is exactly 0 past 1e3: LSE_j - s_jj must take s_jj from
the same tiles as LSE_j (it came out as -0.036 at 1e7 from another product).
"""

import numpy as np
import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive

from .compare import DEVICE, ON_GPU, TRITON_MARKS, assert_close

pytestmark = TRITON_MARKS + [pytest.mark.filterwarnings("ignore:underflow encountered")]


@pytest.fixture(params=["products", "placed_products"])
def products(request, monkeypatch):
    """"placed_products": the interpreter's tl.dot sums each row's products in an order set by the
    row's place in the tile (rows 0, 3, 6, ... from k = 0, rows 1, 4, ... from k = 7, ...), so
    a tile and its transpose round differently while the same tile always rounds the same."""
    if request.param == "products":
        return
    if ON_GPU:
        pytest.skip("emulates the interpreter's products")
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this triton's interpreter has no InterpreterBuilder.create_dot")
    original = builder.create_dot

    def create_dot(self, a, b, d, *rest):
        out = original(self, a, b, d, *rest)
        lhs, rhs, acc = a.data, b.data, d.data
        if lhs.dtype != np.float32 or lhs.ndim != 2:
            return out
        placed = np.empty_like(out.data)
        depth = lhs.shape[1]
        for start in range(3):
            order = np.roll(np.arange(depth), 7 * start)
            placed[start::3] = np.matmul(lhs[start::3][:, order], rhs[order, :]) + acc[start::3]
        return interpreter.TensorHandle(placed, out.dtype)

    monkeypatch.setattr(builder, "create_dot", create_dot)


def _embeddings(batch, num_keys, dim, layout, largest_logit, temperature, seed):
    """(query, key) scaled so that max_ij |q_i| |k_j| / tau = largest_logit. ``layout``: the
    positives along their queries ("aligned": the fused column sums hold), against them
    ("opposed": s_jj ~ -bound, every column is recomputed) or independent ("random")."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=generator)
    key = torch.randn(num_keys, dim, generator=generator)
    noise = 0.1 * key[:batch]
    if layout == "aligned":
        key[:batch] = query + noise
    elif layout == "opposed":
        key[:batch] = -query + noise
    scale = (largest_logit * temperature / (query.norm(dim=1).max() * key.norm(dim=1).max())) ** 0.5
    return (query * scale).to(DEVICE), (key * scale).to(DEVICE)


# (batch, keys, dim, temperature, layout) per largest logit: odd shapes (7 rows in a 32-row tile,
# 13 dims in a 32-wide chunk, keys beyond the batch), the unnormalized CLIP loss
CASES = [
    (1e2, (20, 20, 24, 0.05, "random")), (1e2, (7, 9, 13, 0.2, "opposed")),
    (1e3, (20, 20, 24, 0.01, "opposed")), (1e3, (7, 13, 13, 0.05, "aligned")),
    (1e4, (20, 24, 24, 0.05, "aligned")), (1e4, (7, 7, 13, 0.01, "random")),
    (1e5, (20, 20, 24, 0.2, "opposed")), (1e5, (7, 9, 13, 0.05, "random")),
    (1e6, (20, 20, 24, 0.01, "random")), (1e6, (7, 13, 13, 0.01, "opposed")),
    (1e7, (20, 20, 24, 0.01, "opposed")), (1e7, (7, 9, 13, 0.2, "aligned")),
]


@pytest.mark.parametrize("largest_logit,case", CASES,
                         ids=[f"{logit:.0e}-{b}x{d}-keys{n}-tau{t}-{layout}" for logit, (b, n, d, t, layout) in CASES])
def test_symmetric_unnormalized_large_logits_match_float64(products, largest_logit, case):
    batch, num_keys, dim, temperature, layout = case
    query, key = _embeddings(batch, num_keys, dim, layout, largest_logit, temperature, seed=batch + num_keys)
    q1, k1 = query.clone().requires_grad_(), key.clone().requires_grad_()
    q0, k0 = query.double().requires_grad_(), key.double().requires_grad_()
    loss = fastcl.info_nce(q1, k1, temperature=temperature, normalize=False, symmetric=True, backend="triton")
    expected = naive.info_nce(q0, k0, temperature=temperature, normalize=False, symmetric=True)
    assert torch.isfinite(loss)
    assert_close(loss, expected, 1e-5, "loss")
    loss.backward()
    expected.backward()
    assert_close(q1.grad, q0.grad, 1e-4, "dquery")
    assert_close(k1.grad, k0.grad, 1e-4, "dkey")
