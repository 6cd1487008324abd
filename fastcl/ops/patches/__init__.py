"""Selective high-resolution patch ops (PS3): score, select and gather only the patches that matter.

* :func:`patch_saliency` - cosine between projected low-res features and a learned or text
  prompt, ``sigmoid(clamp(scale * cos, -clamp, clamp))``.
* :func:`budget_split` / :func:`select_patches` - a token budget split across scales in
  proportion to their patch counts (largest remainder), top-k per scale (lower index wins
  ties, excluded patches never chosen, indices sorted ascending).
* :func:`gather_patches` - the chosen P x P patches of the image resized to ``size``, sampled
  straight from the original image: never the resized image, never the full patch grid.

Backends of ``gather_patches``: ``naive`` (interpolate + unfold + index, the reference),
``torch`` (one ``torch.gather`` of the four bilinear corners, any device), ``cpu`` (csrc/cpu,
float32/float64), ``cuda`` (csrc/cuda) and ``triton`` (blends in fp32 whatever the dtype);
``auto`` picks cuda, then triton on GPUs and cpu on CPUs (torch for half types on CPU).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..._native import backends as _backends
from ..._native import cuda_device_supported, requested_backend, warn_once
from ..._tracing import functorch_active
from . import naive
from .indexed import gather_patches_indexed
from .op import gather_patches_backward, gather_patches_forward
from .options import check_budget_list, check_exclude, check_gather_args, check_positive_int, check_scores
from .sampling import AxisTaps, accumulation_dtype, axis_taps

__all__ = ["gather_patches", "select_patches", "budget_split", "patch_saliency", "gather_patches_forward",
           "gather_patches_backward", "resolve_gather_backend"]


def resolve_gather_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run ``gather_patches``: ``auto`` never picks ``naive``, except inside
    a torch.func transform, where every backend runs the differentiable reference."""
    if backend != "naive" and functorch_active():
        return "naive"
    if backend == "auto":
        available = _backends()
        if device.type == "cuda":
            # the native kernels only where a cubin or PTX of theirs runs on this GPU
            if available["cuda"].available and cuda_device_supported(device)[0]:
                return "cuda"
            return "triton" if available["triton"].available else "torch"
        if device.type == "cpu":
            if available["cpu"].available and dtype in (torch.float32, torch.float64):
                return "cpu"
            if not available["cpu"].available:
                warn_once("patches-cpu-fallback",
                          f"fastcl: native CPU kernels unavailable ({available['cpu'].reason}); gather_patches uses PyTorch")
        return "torch"
    requested_backend(backend, device, "images")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors, got images on {device}")
    if backend == "cuda":
        supported, detail = cuda_device_supported(device)
        if not supported:
            raise RuntimeError(f"backend='cuda' cannot run on {device}: {detail}")
    return backend


def gather_patches(images: torch.Tensor, index: torch.Tensor, patch_size: int,
                   size: Optional[Union[int, Tuple[int, int]]] = None, *,
                   backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The chosen P x P patches of ``images`` resized to ``size``, without resizing the image.

    With ``R = F.interpolate(images, size, mode="bilinear", align_corners=False, antialias=False)``
    (``R = images`` when ``size`` is None or equal to (H, W)), the patch grid has
    ``grid_h = Hs // P`` rows and ``grid_w = Ws // P`` columns (leftover pixels dropped, as
    ``F.unfold`` does), and for flat index ``n = row * grid_w + col``::

        patches[b, k, (c, i, j)] = R[b, c, row * P + i, col * P + j],   n = index[b, k]

    Each pixel is blended from the 4 source pixels bilinear resizing would read, so the result
    equals interpolate + unfold + index to rounding (1e-5 relative in fp32), at a cost
    proportional to K * C * P * P. The backward scatter-adds into ``images`` when it requires
    grad.

    Args:
        images: (B, C, H, W) float16 / bfloat16 / float32 / float64 (any strides).
        index: (B, K) int64 flat patch indices into the (grid_h, grid_w) grid, row-major.
        patch_size: P.
        size: (Hs, Ws) (or an int for a square) the scale at which patches are cut; default (H, W).
        backend: "auto" | "naive" | "torch" | "cpu" | "triton" | "cuda".

    Returns:
        ``(patches, positions)``: (B, K, C*P*P) in (C, P, P) order (a Conv2d patch embedding's
        weight order) with the images' dtype, and (B, K, 2) int64 (row, col) in the grid.

    Example::

        >>> images = torch.randn(2, 3, 3780, 3780)
        >>> index = fastcl.select_patches(scores, 2560)          # scores (2, 270, 270)
        >>> patches, positions = fastcl.gather_patches(images, index, 14)
        >>> patches.shape, positions.shape
        (torch.Size([2, 2560, 588]), torch.Size([2, 2560, 2]))
    """
    size, (grid_h, grid_w) = check_gather_args(images, index, patch_size, size, backend)
    chosen = resolve_gather_backend(backend, images.device, images.dtype)
    positions = torch.stack([index // grid_w, index % grid_w], dim=-1)
    if chosen == "naive":
        return naive.gather_patches(images, index, patch_size, size)[0], positions
    compute = accumulation_dtype(images.dtype)
    row_taps = axis_taps(images.shape[2], size[0], compute, images.device)
    col_taps = axis_taps(images.shape[3], size[1], compute, images.device)
    if chosen == "torch":
        return gather_patches_indexed(images, index, patch_size, grid_w, row_taps, col_taps), positions
    if chosen == "triton":
        # the Triton kernels read the taps as fp32 whatever the image dtype
        row_taps = row_taps._replace(lambda1=row_taps.lambda1.float())
        col_taps = col_taps._replace(lambda1=col_taps.lambda1.float())
    patches = gather_patches_forward(images, index, *row_taps, *col_taps, patch_size, grid_w, chosen)
    return patches, positions


def budget_split(budget: int, counts: Sequence[int]) -> List[int]:
    """Split ``budget`` tokens across scales in proportion to their patch ``counts``.

    Largest-remainder (Hamilton) rounding, exact in integers: scale s gets
    ``floor(budget * counts[s] / total)``, and the seats left over go to the largest
    remainders ``budget * counts[s] mod total``, the lower scale index first on ties. The shares
    sum to ``budget`` and never exceed a scale's count.

    Example::

        >>> fastcl.budget_split(2560, [54 * 54, 108 * 108])
        [512, 2048]
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    counts = [check_positive_int(f"counts[{i}]", c) for i, c in enumerate(counts)]
    if not counts:
        raise ValueError("counts must name at least one scale")
    total = sum(counts)
    if budget > total:
        raise ValueError(f"budget {budget} exceeds the {total} patches of all scales together (counts {counts})")
    shares = [budget * c // total for c in counts]
    remainders = [budget * c % total for c in counts]
    left = budget - sum(shares)
    for s in sorted(range(len(counts)), key=lambda s: (-remainders[s], s))[:left]:
        shares[s] += 1
    return shares


def select_patches(scores, budget, exclude=None):
    r"""Top-``budget`` patches per image and scale, indices sorted ascending.

    ``scores``: (B, Hp, Wp) for one scale, or a list of such tensors (one per scale, each its
    own grid). ``budget``: an int (split across scales by :func:`budget_split`, in proportion to
    Hp * Wp) or a list of ints, one per scale. ``exclude``: a bool mask (or list of masks) of the
    scores' shape marking patches already chosen (a previous "look"); they are never selected.

    The chosen set is ``torch.topk`` of the flattened scores, except that ties go to the lower
    flat index (``topk`` leaves them unspecified). Selection is not differentiable: train the
    scorer through the returned scores (e.g. PS3's box BCE) or a straight-through gate.

    Returns: (B, K) int64 flat indices (row-major in the scale's grid) for a tensor input, a list
    of them for a list input.

    Example::

        >>> index = fastcl.select_patches(torch.rand(2, 54, 54), 512)            # (2, 512)
        >>> i756, i1512 = fastcl.select_patches([s756, s1512], 2560)           # 512 + 2048
    """
    single = isinstance(scores, torch.Tensor)
    score_list = [scores] if single else list(scores)
    if not score_list:
        raise ValueError("scores must be a (B, Hp, Wp) tensor or a non-empty list of them")
    for s, item in enumerate(score_list):
        check_scores("scores" if single else f"scores[{s}]", item)
    batch = score_list[0].shape[0]
    for s, item in enumerate(score_list):
        if item.shape[0] != batch:
            raise ValueError(f"every scale needs the same batch size B = {batch}, scores[{s}] has {item.shape[0]}")
    if exclude is None:
        exclude_list = [None] * len(score_list)
    elif isinstance(exclude, torch.Tensor):
        if not single:
            raise TypeError("exclude must be a list of masks (one per scale) when scores is a list")
        exclude_list = [exclude]
    else:
        exclude_list = list(exclude)
        if len(exclude_list) != len(score_list):
            raise ValueError(f"exclude needs one mask (or None) per scale ({len(score_list)}), got {len(exclude_list)}")
    exclude_list = [check_exclude("exclude" if single else f"exclude[{s}]", m, score_list[s])
                    for s, m in enumerate(exclude_list)]
    counts = [item.shape[1] * item.shape[2] for item in score_list]
    if isinstance(budget, (list, tuple)):
        shares = check_budget_list(budget, len(score_list))
    elif isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int or a list of ints, got {type(budget).__name__}")
    else:
        shares = budget_split(budget, counts)
    out = []
    for s, (item, k, mask) in enumerate(zip(score_list, shares, exclude_list)):
        available = counts[s] if mask is None else int((~mask.flatten(1)).sum(1).min())
        if k > available:
            raise ValueError(f"scale {s} needs {k} patches but has only {available} selectable "
                             f"(grid {tuple(item.shape[1:])}{', after exclude' if mask is not None else ''})")
        out.append(_top_k_sorted(item, k, mask))
    return out[0] if single else out


def _top_k_sorted(scores: torch.Tensor, k: int, exclude: Optional[torch.Tensor]) -> torch.Tensor:
    flat = scores.detach().flatten(1)
    if exclude is not None:
        flat = flat.masked_fill(exclude.flatten(1), float("-inf"))
        # an excluded patch must lose even against a selectable -inf score
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
        order = torch.gather(order, 1, torch.argsort(torch.gather(exclude.flatten(1), 1, order).to(torch.uint8),
                                                     dim=1, stable=True))
    else:
        # a stable descending sort keeps equal scores in index order: ties go to the lower index
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
    return order[:, :k].sort(dim=1).values


def patch_saliency(features: torch.Tensor, prompt: torch.Tensor, *, logit_scale=5.0, clamp: float = 10.0,
                   return_logits: bool = False) -> torch.Tensor:
    r"""PS3-style saliency of each low-res patch for a prompt.

    ``logits = clamp(logit_scale * cos(features, prompt), -clamp, clamp)``, saliency =
    ``sigmoid(logits)``. Bottom-up: ``prompt`` is a learned (D,) vector shared by the batch;
    top-down: a (B, D) projected text embedding, one per image.

    Args:
        features: (B, N, D) projected low-res features (N patches, e.g. a flattened Hp x Wp grid).
        prompt: (D,) or (B, D).
        logit_scale: float or scalar tensor (learnable scales are why the clamp matters).
        return_logits: return the clamped logits instead (for ``binary_cross_entropy_with_logits``).

    Returns: (B, N) in the features' dtype.

    Example::

        >>> scores = fastcl.patch_saliency(mlp(low_res_tokens), learned_prompt)   # (B, 729)
        >>> index = fastcl.select_patches(scores.view(B, 27, 27), 256)
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a tensor of shape (B, N, D), got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    batch, _, dim = features.shape
    if not isinstance(prompt, torch.Tensor) or prompt.dim() not in (1, 2):
        raise ValueError(f"prompt must be a tensor of shape (D,) or (B, D) with D = {dim}")
    if prompt.shape[-1] != dim or (prompt.dim() == 2 and prompt.shape[0] != batch):
        raise ValueError(f"prompt must have shape ({dim},) or ({batch}, {dim}), got {tuple(prompt.shape)}")
    prompt = prompt.expand(batch, dim) if prompt.dim() == 1 else prompt
    cosine = torch.einsum("bnd,bd->bn", F.normalize(features, dim=-1), F.normalize(prompt.to(features.dtype), dim=-1))
    logits = (logit_scale * cosine).clamp(-clamp, clamp)
    return logits if return_logits else torch.sigmoid(logits)
