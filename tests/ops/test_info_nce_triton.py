"""Triton kernels (InfoNCE, SigLIP) against the naive reference: loss and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes, odd sizes
so every tile has a masked tail: B=37 rows over 32-row tiles, N=53, D=40 over 32-wide
chunks). With a GPU the same tests run compiled on CUDA tensors. Option combinations are a
fixed sample that touches every option at least twice (not the cross product), each in
float32, float16 and bfloat16.
"""

import pytest
import torch

import fastcl
from fastcl.ops.info_nce import naive
from fastcl.ops.siglip import naive as siglip_naive

from .compare import DEVICE, ON_GPU, TRITON_MARKS, assert_close

pytestmark = TRITON_MARKS + []


# Relative error bounds, measured against the largest reference magnitude: (loss, gradients).
# Low precision: the kernels read the same rounded inputs as the reference and accumulate in
# fp32, but round each gradient block to the input dtype for the tensor-core products and the
# gradients come back in the input dtype.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-4, 4e-3),
    torch.bfloat16: (1e-4, 3e-2),
}
DTYPES = list(TOLERANCE)


def make_inputs(dtype, batch, num_keys, dim, hard, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=generator) / dim**0.5
    key = torch.randn(num_keys, dim, generator=generator) / dim**0.5
    key[:batch] += 0.5 * query  # positives resemble their queries, so the loss is not flat
    tensors = {"query": query, "key": key}
    if hard:
        tensors["hard_negatives"] = torch.randn(batch, hard, dim, generator=generator) / dim**0.5
    tensors = {name: t.to(device=DEVICE, dtype=dtype) for name, t in tensors.items()}
    if classes:
        tensors["labels"] = torch.randint(0, classes, (batch,), generator=generator).to(DEVICE)
        tensors["key_labels"] = torch.randint(0, classes, (num_keys,), generator=generator).to(DEVICE)
    return tensors


# (id, (B, N, D, H, label classes), options). "temperature": "tensor" makes it a leaf that
# needs its gradient; "shifted_positive" uses positive[i] = (i + 1) % B (needed by exclude_self).
CASES = [
    ("plain", (37, 53, 40, 0, 0), {}),
    ("clip_tensor_temperature", (37, 37, 40, 0, 0), {"symmetric": True, "temperature": "tensor"}),
    ("symmetric_extra_keys_none", (37, 53, 24, 0, 0), {"symmetric": True, "reduction": "none"}),
    ("normalize_hard_sum", (37, 53, 40, 3, 0), {"normalize": True, "reduction": "sum", "temperature": "tensor"}),
    ("exclude_self_none", (37, 53, 40, 0, 0), {"exclude_self": True, "shifted_positive": True, "reduction": "none"}),
    ("labels_mask_margin_hard", (37, 53, 40, 2, 4), {"false_negative_margin": 0.05}),
    ("smoothing_labels_symmetric_normalize", (37, 45, 40, 0, 5),
     {"label_smoothing": 0.1, "symmetric": True, "normalize": True, "temperature": "tensor"}),
    ("margin_symmetric_smoothing_none", (37, 37, 33, 0, 0),
     {"false_negative_margin": 0.1, "symmetric": True, "label_smoothing": 0.2, "reduction": "none"}),
    ("smoothing_hard_margin_none", (37, 53, 40, 2, 0),
     {"label_smoothing": 0.1, "false_negative_margin": 0.0, "reduction": "none", "temperature": "tensor"}),
    ("supcon_exclude_self", (37, 53, 40, 0, 4), {"multi_positive": "supcon", "exclude_self": True}),
    ("supcon_symmetric_hard_none", (37, 45, 40, 2, 6),
     {"multi_positive": "supcon", "symmetric": True, "reduction": "none", "temperature": "tensor"}),
    ("pairwise_exclude_self_hard", (37, 53, 40, 2, 4), {"multi_positive": "pairwise", "exclude_self": True}),
    ("pairwise_symmetric_sum_normalize", (37, 37, 40, 0, 5),
     {"multi_positive": "pairwise", "symmetric": True, "reduction": "sum", "normalize": True}),
    ("pairwise_none", (37, 53, 24, 0, 3), {"multi_positive": "pairwise", "reduction": "none", "temperature": "tensor"}),
]


def run_both(dtype, sizes, options, seed=0):
    """(triton loss, naive loss, triton grads, naive grads, names), grad_output not all ones."""
    batch, num_keys, dim, hard, classes = sizes
    options = dict(options)
    temperature_kind = options.pop("temperature", "float")
    shifted = options.pop("shifted_positive", False)
    tensors = make_inputs(dtype, batch, num_keys, dim, hard, classes, seed)
    if shifted:
        tensors["positive"] = (torch.arange(batch, device=DEVICE) + 1) % batch
    losses, grads = [], []
    names = [name for name in ("query", "key", "hard_negatives") if name in tensors]
    for backend in ("triton", "naive"):
        leaves = {name: tensors[name].clone().requires_grad_() for name in names}
        temperature = 0.3
        if temperature_kind == "tensor":
            temperature = torch.tensor(0.3, device=DEVICE, requires_grad=True)
        extra = {name: tensors[name] for name in ("positive", "labels", "key_labels") if name in tensors}
        if backend == "triton":
            loss = fastcl.info_nce(**leaves, **extra, temperature=temperature, backend="triton", **options)
        else:
            loss = naive.info_nce(**leaves, **extra, temperature=temperature, **options)
        if loss.dim() == 0:
            grad_output = torch.tensor(0.7, device=DEVICE)
        else:
            grad_output = torch.linspace(-1.0, 2.0, loss.numel(), device=DEVICE)
        inputs = list(leaves.values()) + ([temperature] if temperature_kind == "tensor" else [])
        grads.append(torch.autograd.grad(loss, inputs, grad_output))
        losses.append(loss)
    return losses[0], losses[1], grads[0], grads[1], names + (["temperature"] if temperature_kind == "tensor" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_info_nce_matches_naive(case, dtype):
    _, sizes, options = case
    loss, expected, grads, expected_grads, names = run_both(dtype, sizes, options)
    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert loss.dtype == torch.float32
    assert_close(loss, expected, loss_tolerance, "loss")
    for name, grad, reference in zip(names, grads, expected_grads):
        assert grad.dtype == reference.dtype, name
        assert_close(grad, reference, grad_tolerance, f"d{name}")


# The GPU's product path (operands in their own dtype, no float32 widening) run in the
# interpreter for float16 and float32, where the interpreter's products are right (its bfloat16
# products are not: the reason CPU tensors take the widening path). One case per mode.
GPU_PATH_CASES = [CASES[i] for i in (3, 6, 10, 11)]


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test takes this path")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", GPU_PATH_CASES, ids=[c[0] for c in GPU_PATH_CASES])
def test_gpu_product_path_in_the_interpreter(monkeypatch, case, dtype):
    import fastcl.ops.info_nce.triton as kernels

    monkeypatch.setattr(kernels, "dot_settings", lambda tensor: (False, "ieee"))
    _, sizes, options = case
    loss, expected, grads, expected_grads, names = run_both(dtype, sizes, options)
    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert_close(loss, expected, loss_tolerance, "loss")
    for name, grad, reference in zip(names, grads, expected_grads):
        assert_close(grad, reference, grad_tolerance, f"d{name}")


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test takes this path")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
def test_siglip_gpu_product_path_in_the_interpreter(monkeypatch, dtype):
    import fastcl.ops.siglip.triton as kernels
    from fastcl.ops.siglip import naive as siglip_naive

    monkeypatch.setattr(kernels, "dot_settings", lambda tensor: (False, "ieee"))
    generator = torch.Generator().manual_seed(2)
    image = (torch.randn(37, 40, generator=generator) / 40**0.5).to(dtype)
    text = (torch.randn(37, 40, generator=generator) / 40**0.5).to(dtype)
    results = []
    for backend in ("triton", "naive"):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(10.0, requires_grad=True)]
        if backend == "triton":
            loss = fastcl.siglip_loss(*leaves, -3.0, backend="triton")
        else:
            loss = siglip_naive.siglip_loss(*leaves, -3.0)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, grads), (expected, expected_grads) = results
    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert_close(loss, expected, loss_tolerance, "loss")
    for name, grad, reference in zip(("dimage", "dtext", "dscale"), grads, expected_grads):
        assert_close(grad, reference, grad_tolerance, name)


def test_forward_without_grad_matches_naive():
    tensors = make_inputs(torch.float32, 37, 53, 40, 2, 4)
    options = dict(temperature=0.2, false_negative_margin=0.1, label_smoothing=0.1)
    with torch.no_grad():
        loss = fastcl.info_nce(**tensors, backend="triton", **options)
    assert_close(loss, naive.info_nce(**tensors, **options), 1e-5, "loss")


def test_backward_only_scales_gradients_computed_in_forward():
    """Scalar loss with inputs needing grad: gradients come from the forward pass; calling the
    loss twice with different grad_outputs must scale them linearly."""
    tensors = make_inputs(torch.float32, 37, 53, 40, 0, 0)
    query = tensors["query"].clone().requires_grad_()
    loss = fastcl.info_nce(query, tensors["key"], symmetric=True, backend="triton")
    (grad_one,) = torch.autograd.grad(loss, query, torch.tensor(1.0, device=DEVICE), retain_graph=True)
    (grad_three,) = torch.autograd.grad(loss, query, torch.tensor(-3.0, device=DEVICE))
    torch.testing.assert_close(grad_three, -3.0 * grad_one)


def test_float64_runs_on_the_chunked_path():
    tensors = make_inputs(torch.float64, 9, 11, 8, 0, 0)
    loss = fastcl.info_nce(**tensors, symmetric=True, backend="triton")
    assert loss.dtype == torch.float64
    assert_close(loss, naive.info_nce(**tensors, symmetric=True), 1e-12, "loss")
    image, text = tensors["query"], tensors["key"][:9]
    siglip = fastcl.siglip_loss(image, text, 5.0, -1.0, backend="triton")
    assert siglip.dtype == torch.float64
    assert_close(siglip, siglip_naive.siglip_loss(image, text, 5.0, -1.0), 1e-12, "siglip loss")


# The tile selection (pinned configurations, the tuner's key, file cache and ranks) is tested in
# tests/ops/test_gpu_paths.py.


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_siglip_matches_naive(dtype):
    generator = torch.Generator().manual_seed(1)
    image = (torch.randn(37, 40, generator=generator) / 40**0.5).to(device=DEVICE, dtype=dtype)
    text = (torch.randn(37, 40, generator=generator) / 40**0.5).to(device=DEVICE, dtype=dtype)
    results = []
    for backend in ("triton", "naive"):
        x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
        scale = torch.tensor(10.0, device=DEVICE, requires_grad=True)
        bias = torch.tensor(-3.0, device=DEVICE, requires_grad=True)
        if backend == "triton":
            loss = fastcl.siglip_loss(x, y, scale, bias, backend="triton")
        else:
            loss = siglip_naive.siglip_loss(x, y, scale, bias)
        grads = torch.autograd.grad(loss, [x, y, scale, bias], torch.tensor(1.5, device=DEVICE))
        results.append((loss, grads))
    (loss, grads), (expected, expected_grads) = results
    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert_close(loss, expected, loss_tolerance, "loss")
    for name, grad, reference in zip(("dimage", "dtext", "dscale", "dbias"), grads, expected_grads):
        assert_close(grad, reference, grad_tolerance, name)


@pytest.mark.parametrize("sizes,options", [((1, 3, 5, 0), {"symmetric": True}), ((6, 9, 17, 0), {"hard": 0})],
                         ids=["single_row_symmetric", "zero_hard_negatives"])
def test_degenerate_shapes(sizes, options):
    batch, num_keys, dim, _ = sizes
    options = dict(options)
    tensors = make_inputs(torch.float32, batch, num_keys, dim, 0, 0)
    if options.pop("hard", None) == 0:
        tensors["hard_negatives"] = torch.zeros(batch, 0, dim, device=DEVICE)
    results = []
    for backend in ("triton", "naive"):
        leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
        if backend == "triton":
            loss = fastcl.info_nce(**leaves, backend="triton", **options)
        else:
            loss = naive.info_nce(**leaves, **options)
        results.append((loss, torch.autograd.grad(loss, list(leaves.values()))))
    (loss, grads), (expected, expected_grads) = results
    assert_close(loss, expected, 1e-5, "loss")
    for grad, reference in zip(grads, expected_grads):
        assert grad.shape == reference.shape
        if reference.numel():
            assert_close(grad, reference, 1e-4, "gradient")
