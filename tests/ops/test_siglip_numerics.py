"""SigLIP on the inputs users pass: no subnormal in a gradient block, huge scales and biases, NaN
and Inf exactly where the naive reference has them, scalars on another device, meta tensors."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl._native import backends, typed_kernel
from fastcl.ops.siglip import naive as siglip_naive

from .compare import assert_like_naive, no_subnormal

CPU_BACKENDS = ["torch", "cpu", "auto"]
native = pytest.mark.skipif(not backends()["cpu"].available, reason="native CPU kernels not built")


def run_siglip(backend, x, y, scale, bias):
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(scale, dtype=torch.float64,
              requires_grad=True), torch.tensor(bias, dtype=torch.float64, requires_grad=True)]
    if backend == "naive":
        loss = siglip_naive.siglip_loss(*leaves)
    else:
        loss = fastcl.siglip_loss(*leaves, backend=backend)
    return (loss, *torch.autograd.grad(loss * 0.7, leaves))


def compare_siglip(backend, x, y, scale, bias, rtol=1e-4):
    expected = run_siglip("naive", x, y, scale, bias)
    actual = run_siglip(backend, x, y, scale, bias)
    for name, a, e in zip(("loss", "dimage", "dtext", "dscale", "dbias"), actual, expected):
        assert_like_naive(a, e.to(a.dtype), f"siglip {backend} {name}", rtol)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_and_siglip_gradient_blocks_have_no_subnormal(dtype):
    from fastcl.ops.siglip.native import native_siglip_rows

    q, k = torch.randn(48, 128, dtype=dtype), torch.randn(48, 128, dtype=dtype)
    block = q @ k.T
    native_siglip_rows(block, 0, 10.0, -10.0, 1 / 48, True)
    assert no_subnormal(block)
    # two-pass symmetric: pass 2 of one block
    statistics = typed_kernel("info_nce_symmetric_statistics", dtype)
    gradient = typed_kernel("info_nce_symmetric_gradient", dtype)
    block = q @ k.T
    row_max, row_sum, diagonal = (torch.empty(48, dtype=dtype) for _ in range(3))
    column_max, column_sum = torch.full((48,), float("-inf"), dtype=dtype), torch.zeros(48, dtype=dtype)
    statistics(similarity=block.data_ptr(), ld=48, rows=48, cols=48, row0=0, tracked=48, inv_temperature=20.0,
               row_max_out=row_max.data_ptr(), row_sum_out=row_sum.data_ptr(), diagonal_out=diagonal.data_ptr(),
               column_max=column_max.data_ptr(), column_sum=column_sum.data_ptr(), num_threads=1)
    factor = torch.full((48,), 20.0 / 96, dtype=dtype)
    row_factor, column_factor, positive = factor / row_sum, factor / column_sum, 2 * factor  # kept alive
    dtemp = torch.zeros(48, dtype=dtype)
    gradient(similarity=block.data_ptr(), ld=48, rows=48, cols=48, row0=0, tracked=48, inv_temperature=20.0,
             row_max=row_max.data_ptr(), row_factor=row_factor.data_ptr(), column_max=column_max.data_ptr(),
             column_factor=column_factor.data_ptr(), positive=positive.data_ptr(),
             dtemp_out=dtemp.data_ptr(), num_threads=1)
    assert no_subnormal(block)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_siglip_huge_scale(backend):
    x, y = F.normalize(torch.randn(32, 16), dim=-1), F.normalize(torch.randn(32, 16), dim=-1)
    for scale, bias in ((1e30, 0.0), (1e4, -10.0), (10.0, -1e6)):
        compare_siglip(backend, x.double(), y.double(), scale, bias, rtol=1e-9)
        compare_siglip(backend, x, y, scale, bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["nan", "inf", "neg_inf", "overflow"])
def test_siglip_nonfinite_like_naive(backend, case):
    x, y = torch.randn(10, 6), torch.randn(10, 6)
    if case == "overflow":  # 1e20 inputs: logits overflow to +-inf, naive gives inf, not NaN
        x, y = x * 1e20, y * 1e20
    else:
        x[3, 2] = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[case]
    compare_siglip(backend, x, y, 10.0, -10.0)


def test_siglip_rejects_scale_or_bias_on_another_device():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="logit_scale must be on the inputs' device cpu"):
        fastcl.siglip_loss(image, text, torch.tensor(10.0, device="meta"), -10.0)
    with pytest.raises(ValueError, match="logit_bias must be on the inputs' device cpu"):
        fastcl.siglip_loss(image, text, 10.0, torch.tensor(-10.0, device="meta"))
    with pytest.raises(ValueError, match="temperature must be on the inputs' device cpu"):
        fastcl.info_nce(image, text, temperature=torch.tensor(0.1, device="meta"))
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="logit_scale must be a float or a tensor on the meta device"):
        fastcl.siglip_loss(meta, meta, torch.tensor(10.0), -10.0)


def test_siglip_meta_tensors_propagate_shapes():
    image = torch.randn(4, 3, device="meta", requires_grad=True)
    text = torch.randn(4, 3, device="meta", requires_grad=True)
    scale = torch.tensor(10.0, device="meta", requires_grad=True)
    loss = fastcl.siglip_loss(image, text, scale, -10.0)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert image.grad.shape == image.shape and scale.grad.device.type == "meta"
