"""The ring exchange's fused tile kernels (fastcl/ops/info_nce/ring_triton.py) against the same
tile computed densely in PyTorch, under the Triton interpreter at small, odd shapes: the row and
column statistics of the forward, and the anchor gradient, the block's gradient share and the
scale's gradient of the backward (own block with its positives / diagonal, exclude_self, other
ranks' blocks, with and without the column direction)."""
import pytest
import torch

from .compare import TRITON_MARKS

pytestmark = TRITON_MARKS


def dense(anchors, block, scale, positive, own, exclude_self, num_columns, row_lse, row_weights, column_lse,
          column_weights):
    raw = anchors.double() @ block.double().T
    scores = scale * raw
    rows, cols = scores.shape
    candidate = torch.ones_like(scores, dtype=torch.bool)
    if own and exclude_self:
        candidate &= ~torch.eye(rows, cols, dtype=torch.bool)
    tile_lse = torch.logsumexp(scores.masked_fill(~candidate, float("-inf")), dim=1)
    positive_score = scores.gather(1, positive[:, None])[:, 0] if own else None
    tile_column_lse = torch.logsumexp(scores[:, :num_columns], dim=0) if num_columns else None
    grad = torch.where(candidate, (scores - row_lse.double()[:, None]).exp(), 0.0) * row_weights.double()[:, None]
    if own:
        grad[torch.arange(rows), positive] -= row_weights.double()
    if num_columns:
        grad[:, :num_columns] += (scores[:, :num_columns] - column_lse.double()).exp() * column_weights.double()
        if own:
            grad.diagonal()[:num_columns] -= column_weights.double()
    return (tile_lse, positive_score, tile_column_lse, scale * grad @ block.double(), scale * grad.T @ anchors.double(),
            (grad * raw).sum())


@pytest.mark.parametrize("own, exclude_self, num_columns, rows, cols, dim", [
    (True, False, 37, 37, 45, 20),   # CLIP's own block: positives and the columns' diagonal
    (False, False, 37, 37, 45, 20),  # another rank's block, both directions
    (True, True, 0, 33, 33, 70),     # NT-Xent's own block: no (i, i) pair; D past one accumulator slice
    (False, False, 0, 5, 70, 8),     # a one-direction tile wider than the anchors
])
def test_tile_kernels_match_the_dense_tile(own, exclude_self, num_columns, rows, cols, dim):
    from fastcl.ops.info_nce import ring_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU
    generator = torch.Generator().manual_seed(rows + cols + dim)
    anchors = torch.randn(rows, dim, generator=generator)
    block = torch.randn(cols, dim, generator=generator)
    positive = torch.randperm(cols, generator=generator)[:rows]
    if exclude_self:
        positive = (torch.arange(rows) + 1) % cols
    # the complete statistics the backward is formed against come from every rank: not this tile's
    lse_offset = torch.rand(rows, generator=generator)
    column_offset = torch.rand(num_columns, generator=generator)
    row_weights = torch.rand(rows, generator=generator)
    column_weights = torch.rand(num_columns, generator=generator) if num_columns else None
    start = torch.randn(rows, dim, generator=generator)
    scale = torch.tensor(1.7)
    on = lambda x: x.to(device) if x is not None else None

    lse, positive_score, column_lse = ring_triton.tile_forward(on(anchors), on(block), scale, on(positive), own,
                                                                exclude_self, num_columns)
    final_lse = lse.cpu() + lse_offset
    final_column_lse = column_lse.cpu() + column_offset if num_columns else None
    grad_anchors = on(start.clone())
    share, grad_scale = ring_triton.tile_backward(on(anchors), on(block), scale, on(positive), own, exclude_self,
                                                  on(final_lse), on(row_weights), on(final_column_lse),
                                                  on(column_weights), grad_anchors)
    expected = dense(anchors, block, 1.7, positive, own, exclude_self, num_columns, final_lse, row_weights,
                     final_column_lse, column_weights)
    tolerance = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected[0], **tolerance)
    if own:
        torch.testing.assert_close(positive_score.cpu().double(), expected[1], **tolerance)
    else:
        assert positive_score is None
    if num_columns:
        torch.testing.assert_close(column_lse.cpu().double(), expected[2], **tolerance)
    else:
        assert column_lse is None
    torch.testing.assert_close((grad_anchors.cpu() - start).double(), expected[3], **tolerance)
    torch.testing.assert_close(share.cpu().double(), expected[4], **tolerance)
    torch.testing.assert_close(grad_scale.cpu().double(), expected[5], **tolerance)
