"""SelectivePatchEncoder: cached-K/V attention vs joint attention written out, selection and
embedding semantics, and gradient paths to the scorer. Tiny shapes, float64 where exactness matters."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.models.ps3 import Block


def small_encoder(**overrides):
    options = dict(patch_size=4, low_res=16, scales=(24, 40), budget=30, dim=32, depth=3, heads=4, score_dim=16)
    options.update(overrides)
    return fastcl.SelectivePatchEncoder(**options)


def explicit_block(block: Block, queries_from: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:
    """One pre-norm block written out: rows of ``queries_from`` attend (softmax over every
    row of ``keys_from``) and get the residual and MLP updates."""
    heads = block.heads
    dim = queries_from.shape[-1]
    head_dim = dim // heads
    w_q, w_k, w_v = block.qkv.weight.split(dim)
    b_q, b_k, b_v = block.qkv.bias.split(dim)

    def split_heads(x):
        return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    q = split_heads(block.norm1(queries_from) @ w_q.T + b_q)
    k = split_heads(block.norm1(keys_from) @ w_k.T + b_k)
    v = split_heads(block.norm1(keys_from) @ w_v.T + b_v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(queries_from.shape)
    x = queries_from + attended @ block.proj.weight.T + block.proj.bias
    return x + block.fc2(F.gelu(block.fc1(block.norm2(x))))


def test_cached_kv_attention_equals_joint_attention_with_low_res_queries_dropped():
    encoder = small_encoder().double()
    images = torch.randn(2, 3, 45, 45, dtype=torch.float64)
    high = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        every = torch.arange(16).expand(2, -1)
        low, _ = encoder.embed(images, every, 16)
        _, cache, _ = encoder.encode_low_res(images)
        ours = encoder.encode_selected(high, cache)
        expected_high = high
        for block in encoder.blocks:
            joint = torch.cat([low, expected_high], dim=1)
            # the joint sequence's high rows; its low rows are dropped (low tokens are only
            # updated by the low-res pass, which never sees the high-res tokens)
            expected_high = explicit_block(block, expected_high, joint)
            low = explicit_block(block, low, low)
    torch.testing.assert_close(ours, expected_high, rtol=1e-10, atol=1e-10)


def test_block_without_context_is_plain_self_attention():
    block = Block(24, 3).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    out, (keys, values) = block(x)
    torch.testing.assert_close(out, explicit_block(block, x, x), rtol=1e-10, atol=1e-10)
    assert keys.shape == values.shape == (2, 3, 9, 8)


def test_forward_shapes_selection_and_scores_agree():
    encoder = small_encoder()
    images = torch.randn(2, 3, 45, 45)
    out = encoder(images)
    shares = fastcl.budget_split(30, [6 * 6, 10 * 10])
    assert [s.shape for s in out.selection] == [(2, shares[0]), (2, shares[1])]
    assert out.tokens.shape == (2, 30, 32) and out.pooled.shape == (2, 32) and out.low_res_tokens.shape == (2, 16, 32)
    assert [s.shape for s in out.scores] == [(2, 6, 6), (2, 10, 10)] and out.low_res_scores.shape == (2, 4, 4)
    for scores, index, share in zip(out.scores, out.selection, shares):
        assert torch.equal(index, fastcl.select_patches(scores, share))
    for positions, index, grid in zip(out.positions, out.selection, (6, 10)):
        assert torch.equal(positions[..., 0] * grid + positions[..., 1], index)


def test_forward_with_every_gather_backend_matches_naive_reference():
    encoder = small_encoder()
    images = torch.randn(2, 3, 45, 45)
    reference = copy.deepcopy(encoder)
    reference.backend = "naive"
    torch.testing.assert_close(encoder(images).tokens, reference(images).tokens, rtol=1e-5, atol=1e-5)


def test_position_embedding_is_the_interpolated_table_at_the_patch():
    encoder = small_encoder().double()
    table = encoder.pos_embed  # (1, D, 4, 4)
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], -1)[None]
    resized = F.interpolate(table, size=(10, 10), mode="bilinear", align_corners=False)
    expected = resized.flatten(2).transpose(1, 2)
    torch.testing.assert_close(encoder.position_embedding(positions, (10, 10)), expected, rtol=1e-10, atol=1e-10)
    # at the table's own grid the sampled embedding is the table itself
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    own = torch.stack([rows.flatten(), cols.flatten()], -1)[None]
    torch.testing.assert_close(encoder.position_embedding(own, (4, 4)), table.flatten(2).transpose(1, 2))


def test_straight_through_gate_leaves_values_and_trains_the_scorer():
    torch.manual_seed(3)
    encoder = small_encoder()
    plain = copy.deepcopy(encoder)
    plain.straight_through = False
    images = torch.randn(2, 3, 45, 45)
    gated_out, plain_out = encoder(images), plain(images)
    torch.testing.assert_close(gated_out.pooled, plain_out.pooled, rtol=1e-6, atol=1e-6)

    gated_out.pooled.square().sum().backward()
    assert encoder.prompt.grad is not None and encoder.prompt.grad.abs().sum() > 0
    assert encoder.score_mlp[0].weight.grad.abs().sum() > 0
    # without the gate the pooled loss cannot reach the scorer: selection is discrete
    plain_out.pooled.square().sum().backward()
    assert plain.prompt.grad is None or plain.prompt.grad.abs().sum() == 0


def test_bce_on_returned_scores_trains_the_scorer_without_the_gate():
    encoder = small_encoder(straight_through=False)
    out = encoder(torch.randn(2, 3, 45, 45))
    box = torch.zeros(2, 10, 10)
    box[:, 2:6, 3:8] = 1
    F.binary_cross_entropy_with_logits(out.scores[1], box).backward()
    assert encoder.prompt.grad.abs().sum() > 0 and encoder.score_mlp[2].weight.grad.abs().sum() > 0


def test_top_down_text_embedding_drives_the_scores():
    encoder = small_encoder(text_dim=8)
    images = torch.randn(2, 3, 45, 45)
    first = encoder(images, torch.randn(2, 8)).low_res_scores
    second = encoder(images, torch.randn(2, 8)).low_res_scores
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match=r"text_embedding must have shape \(B, text_dim\) = \(2, 8\)"):
        encoder(images, torch.randn(2, 5))
    with pytest.raises(ValueError, match="without text_dim"):
        small_encoder()(images, torch.randn(2, 8))


def test_second_look_excludes_the_first_selection():
    encoder = small_encoder()
    images = torch.randn(2, 3, 45, 45)
    first = encoder(images)
    exclude = []
    for index, scores in zip(first.selection, first.scores):
        mask = torch.zeros_like(scores, dtype=torch.bool).flatten(1)
        exclude.append(mask.scatter(1, index, True).view_as(scores))
    second = encoder(images, exclude=exclude)
    for a, b in zip(first.selection, second.selection):
        for row_a, row_b in zip(a.tolist(), b.tolist()):
            assert not set(row_a) & set(row_b)


def test_encode_all_patches_uses_every_patch_of_the_scale():
    encoder = small_encoder()
    pooled = encoder.encode_all_patches(torch.randn(2, 3, 45, 45))
    assert pooled.shape == (2, 32)


def test_bad_images_raise():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        small_encoder()(torch.randn(3, 45, 45))
    with pytest.raises(ValueError, match="3 channels"):
        small_encoder()(torch.randn(1, 1, 45, 45))


@pytest.mark.vision
def test_timm_weights_give_timm_features_on_the_low_res_view():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, class_token=False, global_pool="",
        num_classes=0).eval()
    encoder = small_encoder()
    encoder.load_timm_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 16, 16)  # already at low_res: the low-res view is the image
    with torch.no_grad():
        low, _, _ = encoder.encode_low_res(images)
        torch.testing.assert_close(encoder.norm(low), vit.forward_features(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth, expected", [(1, (0,)), (2, (0, 1)), (3, (0, 2)), (8, (3, 7))])
def test_default_score_layers_index_real_blocks(depth, expected):
    """The default scorer reads the middle and the last block; a one-block encoder reads its only block."""
    encoder = small_encoder(depth=depth)
    assert encoder.score_layers == expected
    output = encoder(torch.randn(2, 3, 40, 40))
    assert output.pooled.shape == (2, 32) and torch.isfinite(output.pooled).all()
