"""gather_patches / select_patches / budget_split / patch_saliency against the naive reference
(interpolate + unfold + index; a full explicit sort) on every backend that runs here."""
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; must be set before triton.jit decorates them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcl  # noqa: E402
from fastcl.ops.patches import naive  # noqa: E402

# (H, W, size, patch, channels): odd sizes, down- and up-sampling, one axis unchanged, leftovers
GATHER_CASES = [
    (37, 41, (23, 29), 5, 3),   # downsample, sizes not divisible by P
    (15, 17, (40, 33), 7, 1),   # upsample
    (30, 30, (30, 47), 6, 4),   # rows unchanged, columns upsampled
    (26, 31, None, 4, 3),       # native size, leftovers floored
    (50, 20, (19, 61), 3, 2),   # mixed
]


def _cpu_backends():
    out = ["torch"]
    if fastcl.backends()["cpu"].available:
        out.append("cpu")
    return out


def _case_inputs(H, W, size, patch, channels, dtype=torch.float32, batch=2, count=6, device="cpu"):
    generator = torch.Generator().manual_seed(H * 131 + W)
    images = torch.randn(batch, channels, H, W, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    Hs, Ws = (H, W) if size is None else size
    grid = (Hs // patch) * (Ws // patch)
    index = torch.randint(0, grid, (batch, count), generator=generator)
    index[:, -1] = index[:, 0]  # a repeated patch: its gradient must be added twice
    index[0, 1] = grid - 1      # the bottom-right patch touches the clamped border taps
    return images, index.to(device)


def _check_against_naive(images, index, patch, size, backend, rtol, atol):
    reference_images = images.detach().clone().requires_grad_()
    expected, expected_positions = naive.gather_patches(reference_images, index, patch, size)
    grad_patches = torch.randn_like(expected)
    expected.backward(grad_patches)

    ours_images = images.detach().clone().requires_grad_()
    patches, positions = fastcl.gather_patches(ours_images, index, patch, size, backend=backend)
    patches.backward(grad_patches)
    assert patches.shape == expected.shape and patches.dtype == images.dtype
    torch.testing.assert_close(patches, expected, rtol=rtol, atol=atol)
    assert torch.equal(positions, expected_positions)
    torch.testing.assert_close(ours_images.grad, reference_images.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-P{c[3]}-C{c[4]}")
def test_gather_matches_interpolate_unfold_index(case, backend):
    H, W, size, patch, channels = case
    images, index = _case_inputs(H, W, size, patch, channels)
    # "exactly as interpolate" = within 1e-5 relative; values are O(1) so atol = 1e-5 too
    _check_against_naive(images, index, patch, size, backend, rtol=1e-5, atol=1e-5)


@given(height=st.integers(3, 40), width=st.integers(3, 40), size_h=st.integers(3, 50), size_w=st.integers(3, 50),
       patch=st.integers(1, 6), channels=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_gather_random_shapes_match_naive(height, width, size_h, size_w, patch, channels, seed):
    assume(size_h >= patch and size_w >= patch)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64)
    grid = (size_h // patch) * (size_w // patch)
    index = torch.randint(0, grid, (2, 3), generator=generator)
    for backend in _cpu_backends():
        _check_against_naive(images, index, patch, (size_h, size_w), backend, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gather_float64_is_exact_to_rounding(backend):
    images, index = _case_inputs(37, 41, (23, 29), 5, 3, dtype=torch.float64)
    _check_against_naive(images, index, 5, (23, 29), backend, rtol=1e-12, atol=1e-12)


def test_gather_bfloat16_torch_path_within_bf16_rounding():
    images, index = _case_inputs(37, 41, (23, 29), 5, 3)
    expected, _ = naive.gather_patches(images, index, 5, (23, 29))
    patches, _ = fastcl.gather_patches(images.bfloat16(), index, 5, (23, 29))
    assert patches.dtype == torch.bfloat16
    torch.testing.assert_close(patches.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gather_reads_strided_images_without_copy_semantics_change(backend):
    images, index = _case_inputs(33, 35, (21, 44), 4, 3)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    cropped = torch.randn(2, 3, 40, 45)[:, :, 3:36, 5:40]  # a view with row padding
    for view in (channels_last, cropped):
        _check_against_naive(view, index, 4, (21, 44), backend, rtol=1e-5, atol=1e-5)


def test_gather_positions_are_row_col_of_the_flat_index():
    images = torch.randn(1, 1, 30, 50)
    index = torch.tensor([[0, 4, 5, 14]])  # grid 3 x 5 at P = 10
    _, positions = fastcl.gather_patches(images, index, 10)
    assert positions.tolist() == [[[0, 0], [0, 4], [1, 0], [2, 4]]]


def test_gather_native_size_is_a_plain_crop():
    images = torch.arange(2 * 9 * 12, dtype=torch.float32).view(1, 2, 9, 12)
    patches, _ = fastcl.gather_patches(images, torch.tensor([[5]]), 3)  # grid 3 x 4: row 1, col 1
    assert torch.equal(patches.view(2, 3, 3), images[0, :, 3:6, 3:6])


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gather_never_resizes_or_unfolds_the_image(backend, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("gather_patches must not build the resized image or the patch grid")

    monkeypatch.setattr(F, "interpolate", forbidden)
    monkeypatch.setattr(F, "unfold", forbidden)
    monkeypatch.setattr(torch.Tensor, "unfold", forbidden)
    images, index = _case_inputs(37, 41, (23, 29), 5, 3)
    patches, _ = fastcl.gather_patches(images, index, 5, (23, 29), backend=backend)
    assert patches.shape == (2, 6, 75)


def test_auto_uses_native_cpu_kernel_when_built():
    from fastcl.ops.patches import resolve_gather_backend

    expected = "cpu" if fastcl.backends()["cpu"].available else "torch"
    assert resolve_gather_backend("auto", torch.device("cpu"), torch.float32) == expected
    assert resolve_gather_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"


@pytest.mark.triton
@pytest.mark.parametrize("case", GATHER_CASES[:3], ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-P{c[3]}-C{c[4]}")
def test_gather_triton_matches_naive(case):
    if not fastcl.backends()["triton"].available:
        pytest.skip(fastcl.backends()["triton"].reason)
    H, W, size, patch, channels = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images, index = _case_inputs(H, W, size, patch, channels, count=3, device=device)
    _check_against_naive(images, index, patch, size, "triton", rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-P{c[3]}-C{c[4]}")
def test_gather_gpu_matches_naive(case, backend):
    if not fastcl.backends()[backend if backend != "torch" else "naive"].available:
        pytest.skip(fastcl.backends()[backend].reason)
    H, W, size, patch, channels = case
    images, index = _case_inputs(H, W, size, patch, channels, device="cuda")
    _check_against_naive(images, index, patch, size, backend, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_gpu_half_precision_within_pytorch_error(dtype):
    images, index = _case_inputs(37, 41, (23, 29), 5, 3, device="cuda")
    exact, _ = naive.gather_patches(images.double(), index, 5, (23, 29))
    torch_error = (naive.gather_patches(images.to(dtype), index, 5, (23, 29))[0].double() - exact).abs().max()
    for backend in ("cuda", "triton"):
        if not fastcl.backends()[backend].available:
            continue
        ours, _ = fastcl.gather_patches(images.to(dtype), index, 5, (23, 29), backend=backend)
        assert (ours.double() - exact).abs().max() <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("call, error, message", [
    (lambda: fastcl.gather_patches(torch.randn(3, 8, 8), torch.zeros(3, 1, dtype=torch.long), 4), ValueError, "images must have shape"),
    (lambda: fastcl.gather_patches(torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 4), TypeError, "images must be float"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.zeros(1, 1, dtype=torch.int32), 4), TypeError, "int64"),
    (lambda: fastcl.gather_patches(torch.randn(2, 1, 8, 8), torch.zeros(1, 1, dtype=torch.long), 4), ValueError, r"index must have shape \(B, K\) = \(2, K\)"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[4]]), 4), ValueError, r"\[0, 4\)"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[-1]]), 4), ValueError, "index must hold"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[0]]), 4, size=(3, 9)), ValueError, "smaller than patch_size"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[0]]), 0), ValueError, "patch_size"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[0]]), 4, size="big"), TypeError, "size"),
    (lambda: fastcl.gather_patches(torch.randn(1, 1, 8, 8), torch.tensor([[0]]), 4, backend="fast"), ValueError, "backend"),
])
def test_gather_rejects_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- selection ---------------------------------------------------------------------------------

def test_select_matches_topk_sorted_ascending():
    scores = torch.randn(3, 17, 23)  # continuous: no ties, topk's set is unique
    index = fastcl.select_patches(scores, 40)
    expected = torch.topk(scores.flatten(1), 40, dim=1).indices.sort(dim=1).values
    assert torch.equal(index, expected)
    assert index.dtype == torch.int64 and torch.all(index[:, 1:] > index[:, :-1])


def test_select_breaks_ties_by_lower_index():
    scores = torch.tensor([[[0.5, 0.9, 0.5], [0.9, 0.5, 0.1]]])
    assert fastcl.select_patches(scores, 3).tolist() == [[0, 1, 3]]
    flat = torch.zeros(1, 4, 5)  # all tied: the first K indices
    assert fastcl.select_patches(flat, 6).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_select_with_exclude_never_picks_excluded_and_matches_reference():
    scores = torch.randn(2, 9, 11)
    scores[0, 0, :4] = float("-inf")  # selectable -inf scores still beat excluded patches
    exclude = torch.rand(2, 9, 11) < 0.5
    exclude[0, 0, :4] = False
    available = int((~exclude).flatten(1).sum(1).min())
    index = fastcl.select_patches(scores, available, exclude=exclude)
    assert not torch.gather(exclude.flatten(1), 1, index).any()
    assert torch.equal(index, naive.select_patches(scores, available, exclude))
    with pytest.raises(ValueError, match="selectable"):
        fastcl.select_patches(scores, available + 1, exclude=exclude)


def test_select_several_scales_splits_the_budget():
    s756, s1512 = torch.randn(2, 54, 54), torch.randn(2, 108, 108)
    i756, i1512 = fastcl.select_patches([s756, s1512], 2560)
    assert i756.shape == (2, 512) and i1512.shape == (2, 2048)
    assert torch.equal(i1512, naive.select_patches(s1512, 2048))
    a, b = fastcl.select_patches([s756, s1512], [10, 0])
    assert a.shape == (2, 10) and b.shape == (2, 0)


@pytest.mark.parametrize("budget, counts, expected", [
    (2560, [54 * 54, 108 * 108], [512, 2048]),
    (10, [4, 4, 4], [4, 3, 3]),            # equal remainders: the lower scale first
    (7, [5, 3, 2], [4, 2, 1]),             # 3.5, 2.1, 1.4 -> 3, 2, 1 + one seat to 3.5
    (6, [3, 3], [3, 3]),
    (0, [4, 9], [0, 0]),
])
def test_budget_split_largest_remainder(budget, counts, expected):
    assert fastcl.budget_split(budget, counts) == expected


def test_budget_split_properties():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        counts = torch.randint(1, 500, (int(torch.randint(1, 5, (1,), generator=generator)),), generator=generator).tolist()
        budget = int(torch.randint(0, sum(counts) + 1, (1,), generator=generator))
        shares = fastcl.budget_split(budget, counts)
        assert sum(shares) == budget
        for share, count in zip(shares, counts):
            quota = budget * count / sum(counts)
            assert quota - 1 < share < quota + 1 and share <= count


@pytest.mark.parametrize("call, error, message", [
    (lambda: fastcl.select_patches(torch.randn(4, 4), 2), ValueError, r"\(B, Hp, Wp\)"),
    (lambda: fastcl.select_patches(torch.ones(1, 2, 2, dtype=torch.long), 2), TypeError, "floating"),
    (lambda: fastcl.select_patches(torch.full((1, 2, 2), float("nan")), 2), ValueError, "NaN"),
    (lambda: fastcl.select_patches(torch.randn(1, 2, 2), 5), ValueError, "exceeds"),
    (lambda: fastcl.select_patches(torch.randn(1, 2, 2), 2.5), TypeError, "budget"),
    (lambda: fastcl.select_patches(torch.randn(1, 2, 2), -1), ValueError, "budget must be >= 0"),
    (lambda: fastcl.budget_split(3, [2, 0]), ValueError, r"counts\[1\]"),
    (lambda: fastcl.select_patches([torch.randn(1, 2, 2), torch.randn(2, 2, 2)], 2), ValueError, "batch size"),
    (lambda: fastcl.select_patches([torch.randn(1, 2, 2)], [1, 1]), ValueError, "one entry per scale"),
    (lambda: fastcl.select_patches(torch.randn(1, 2, 2), 1, exclude=torch.zeros(1, 2, 2)), TypeError, "bool"),
    (lambda: fastcl.select_patches(torch.randn(1, 2, 2), 1, exclude=torch.zeros(1, 4, dtype=torch.bool)), ValueError, "shape"),
])
def test_select_rejects_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- saliency ----------------------------------------------------------------------------------

def test_patch_saliency_formula_bottom_up_and_top_down():
    features = torch.randn(2, 7, 5, dtype=torch.float64)
    prompt = torch.randn(5, dtype=torch.float64)
    cosine = (features @ prompt) / (features.norm(dim=-1) * prompt.norm())
    torch.testing.assert_close(fastcl.patch_saliency(features, prompt), torch.sigmoid(5 * cosine))
    text = torch.randn(2, 5, dtype=torch.float64)
    cosine = torch.einsum("bnd,bd->bn", features, text) / (features.norm(dim=-1) * text.norm(dim=-1)[:, None])
    logits = fastcl.patch_saliency(features, text, logit_scale=30.0, return_logits=True)
    torch.testing.assert_close(logits, (30 * cosine).clamp(-10, 10))
    assert logits.abs().max() == 10  # the clamp binds at this scale


def test_patch_saliency_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        fastcl.patch_saliency(torch.randn(7, 5), torch.randn(5))
    with pytest.raises(ValueError, match=r"prompt must have shape \(5,\) or \(2, 5\)"):
        fastcl.patch_saliency(torch.randn(2, 7, 5), torch.randn(3, 5))
