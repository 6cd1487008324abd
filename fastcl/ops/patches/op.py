"""``gather_patches``' kernel backends registered as ``torch.library`` custom ops, so
``torch.compile(fullgraph=True)`` traces through :func:`fastcl.gather_patches` without graph
breaks, and autograd saves only the index and the per-axis tap tables (O(B*K + Hs + Ws)).

``fastcl::gather_patches_forward`` cuts the patches, ``fastcl::gather_patches_backward``
scatter-adds their gradient into a new image gradient; ``backend`` is "cpu", "cuda" or "triton".
Under ``torch.use_deterministic_algorithms(True)`` the GPU backends' backward is the
bit-reproducible :func:`~fastcl.ops.patches.indexed.scatter_patches_deterministic` (their
kernels scatter with float atomics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._tracing import lazy_dynamo_disable
from .indexed import scatter_patches_deterministic
from .sampling import AxisTaps


def _kernels(backend: str):
    if backend == "triton":
        from .triton import triton_backward, triton_forward

        return triton_forward, triton_backward
    from .native import native_backward, native_forward

    return native_forward, native_backward


@torch.library.custom_op("fastcl::gather_patches_forward", mutates_args=())
def gather_patches_forward(images: Tensor, index: Tensor, row_index0: Tensor, row_index1: Tensor, row_lambda1: Tensor,
                           col_index0: Tensor, col_index1: Tensor, col_lambda1: Tensor, patch_size: int, grid_w: int,
                           backend: str) -> Tensor:
    forward, _ = _kernels(backend)
    return forward(images, index, patch_size, grid_w, AxisTaps(row_index0, row_index1, row_lambda1),
                   AxisTaps(col_index0, col_index1, col_lambda1))


@gather_patches_forward.register_fake
def _(images, index, row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1, patch_size, grid_w,
      backend):
    return images.new_empty((images.shape[0], index.shape[1], images.shape[1] * patch_size * patch_size))


@torch.library.custom_op("fastcl::gather_patches_backward", mutates_args=())
def gather_patches_backward(grad_patches: Tensor, index: Tensor, row_index0: Tensor, row_index1: Tensor,
                            row_lambda1: Tensor, col_index0: Tensor, col_index1: Tensor, col_lambda1: Tensor,
                            patch_size: int, grid_w: int, height: int, width: int, backend: str) -> Tensor:
    channels = grad_patches.shape[2] // (patch_size * patch_size)
    if backend in ("triton", "cuda") and torch.are_deterministic_algorithms_enabled():
        # the GPU kernels scatter with float atomics: a bit-reproducible sum instead
        return scatter_patches_deterministic(
            grad_patches, index, patch_size, grid_w, AxisTaps(row_index0, row_index1, row_lambda1),
            AxisTaps(col_index0, col_index1, col_lambda1), (grad_patches.shape[0], channels, height, width))
    _, backward = _kernels(backend)
    return backward(grad_patches, index, patch_size, grid_w, AxisTaps(row_index0, row_index1, row_lambda1),
                    AxisTaps(col_index0, col_index1, col_lambda1), (grad_patches.shape[0], channels, height, width))


@gather_patches_backward.register_fake
def _(grad_patches, index, row_index0, row_index1, row_lambda1, col_index0, col_index1, col_lambda1, patch_size,
      grid_w, height, width, backend):
    channels = grad_patches.shape[2] // (patch_size * patch_size)
    return grad_patches.new_empty((grad_patches.shape[0], channels, height, width))


def _setup_context(ctx, inputs, output):
    images, index, *tables = inputs[:8]
    ctx.save_for_backward(index, *tables)
    ctx.meta = (inputs[8], inputs[9], images.shape[2], images.shape[3], inputs[10])


def _backward(ctx, grad_patches):
    index, *tables = ctx.saved_tensors
    patch_size, grid_w, height, width, backend = ctx.meta
    grad_images = None
    if ctx.needs_input_grad[0]:
        grad_images = gather_patches_backward(grad_patches.contiguous(), index, *tables, patch_size, grid_w, height,
                                              width, backend)
    return (grad_images, *([None] * 10))


gather_patches_forward.register_autograd(_backward, setup_context=_setup_context)
lazy_dynamo_disable(gather_patches_forward)
lazy_dynamo_disable(gather_patches_backward)
