"""PS3-style selective high-resolution encoder (Shi et al., 2025): encode the whole image at
low resolution, then only a budget of salient high-resolution patches, with one shared ViT.

Pipeline of :class:`SelectivePatchEncoder` for images (B, C, H, W):

1. **Low-res pass.** Patches of the image resized to ``low_res`` (G x G grid, G = low_res / P)
   run through the ViT; every layer's keys and values of these tokens are kept. The view is
   sampled like ``interpolate(bilinear, antialias=False)``; for strong downsampling pass an
   image you have low-pass filtered (or resized with antialias) if aliasing matters.
2. **Scoring.** The low-res tokens of ``score_layers`` (concatenated) go through an MLP; the
   saliency logit of each low-res patch is ``clamp(5 cos(feature, prompt), -10, 10)`` with a
   learned prompt (bottom-up) or a projected text embedding (top-down). Each scale's score map is
   the low-res logit map resized bilinearly to that scale's patch grid.
3. **Selection.** ``budget`` tokens split across ``scales`` by patch count (largest
   remainder), top-k per scale (:func:`fastcl.select_patches`).
4. **Embedding.** Only the chosen patches are cut (:func:`fastcl.gather_patches`, never the
   resized image), embedded with the shared patch embedding, plus the position embedding
   interpolated bilinearly at the patch's centre and a learned per-scale residual.
5. **High-res pass.** All chosen tokens of all scales form one sequence; at layer l they attend
   to ``[low-res K/V of layer l ; their own K/V]``. Low-res tokens are not updated. This equals
   joint attention over [low ; high] with the low-res queries dropped.
6. **Pooling.** Mean of the final-normed low-res and high-res tokens.

Gradients reach the scorer two ways. (a) Straight-through gate (default): each selected token's
embedding is multiplied by ``1 + p - stop_grad(p)`` with ``p = sigmoid(logit)`` of its patch,
so the forward value is unchanged and dL/dp = <dL/dtoken, token>. (b) The returned ``scores``
(per-scale logit maps) feed PS3's BCE against the caption's box
(``F.binary_cross_entropy_with_logits``), which is differentiable as is.

Attention everywhere is ``F.scaled_dot_product_attention``, so the selective pass and the full
high-res pass (:meth:`SelectivePatchEncoder.encode_all_patches`) use the same implementation.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.patches import gather_patches, patch_saliency, select_patches


class PS3Output(NamedTuple):
    """What :meth:`SelectivePatchEncoder.forward` returns.

    tokens: (B, N_high, D) final-normed high-res tokens, scales in order, each sorted by index.
    pooled: (B, D) mean of the final-normed low-res and high-res tokens.
    low_res_tokens: (B, G*G, D) final-normed low-res tokens.
    selection: per scale, (B, K_s) int64 flat indices into that scale's patch grid.
    positions: per scale, (B, K_s, 2) int64 (row, col) of the chosen patches.
    scores: per scale, (B, Hp_s, Wp_s) saliency logits (apply sigmoid for probabilities; use
        ``binary_cross_entropy_with_logits`` against a box mask for PS3's selection loss).
    low_res_scores: (B, G, G) the low-res saliency logits the scale maps come from.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    low_res_tokens: torch.Tensor
    selection: List[torch.Tensor]
    positions: List[torch.Tensor]
    scores: List[torch.Tensor]
    low_res_scores: torch.Tensor


class Block(nn.Module):
    """Pre-norm ViT block; attention over [context K/V ; own K/V] when a context is given."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, context: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x: (B, N, D). context: (keys, values) (B, heads, M, D/heads) prepended to x's own.

        Returns (new x, (keys, values) of x) so a caller can cache them for later queries.
        """
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        keys, values = (k, v) if context is None else (torch.cat([context[0], k], 2), torch.cat([context[1], v], 2))
        attended = F.scaled_dot_product_attention(q, keys, values)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x, (k, v)


class SelectivePatchEncoder(nn.Module):
    r"""A small ViT that encodes a low-res view plus a budget of salient high-res patches.

    Args:
        patch_size: P (14 as in PS3 / SigLIP-so400m/14).
        low_res: side of the low-res view (G = low_res // P tokens per side; 378 -> 27 x 27).
        scales: sides of the high-res scales patches are chosen from, e.g. (756, 1512).
        budget: high-res tokens per image, split across scales by patch count.
        dim, depth, heads, mlp_ratio: the ViT.
        score_layers: blocks whose low-res outputs the scorer reads (default: middle and last).
        score_dim: width of the scorer's MLP and prompt.
        text_dim: width of text embeddings for top-down scoring (None: bottom-up only).
        straight_through: gate selected tokens by their saliency so the task loss trains the scorer.

    Example::

        >>> encoder = SelectivePatchEncoder(low_res=378, scales=(756, 1512), budget=2560)
        >>> out = encoder(images)                      # images (B, 3, 1512, 1512)
        >>> out.tokens.shape                           # (B, 2560, 384)
        >>> bce = F.binary_cross_entropy_with_logits(out.scores[1], box_mask_1512)
    """

    def __init__(self, *, patch_size: int = 14, low_res: int = 378, scales: Sequence[int] = (756, 1512),
                 budget: int = 2560, in_chans: int = 3, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, score_layers: Optional[Sequence[int]] = None, score_dim: int = 256,
                 text_dim: Optional[int] = None, straight_through: bool = True, logit_scale: float = 5.0,
                 logit_clamp: float = 10.0, backend: str = "auto"):
        super().__init__()
        if low_res < patch_size:
            raise ValueError(f"low_res ({low_res}) must be at least patch_size ({patch_size})")
        if not scales or any(s < patch_size for s in scales):
            raise ValueError(f"scales must be a non-empty list of sides >= patch_size ({patch_size}), got {scales}")
        self.patch_size = patch_size
        self.low_res = low_res
        self.grid = low_res // patch_size
        self.scales = tuple(int(s) for s in scales)
        self.budget = budget
        self.straight_through = straight_through
        self.logit_scale = logit_scale
        self.logit_clamp = logit_clamp
        self.backend = backend
        self.score_layers = (tuple(score_layers) if score_layers is not None
                             else tuple(sorted({max(depth // 2 - 1, 0), depth - 1})))
        if any(not 0 <= l < depth for l in self.score_layers):
            raise ValueError(f"score_layers must index blocks in [0, {depth}), got {self.score_layers}")
        # Linear on (C, P, P)-flattened patches: the same weights as a Conv2d(kernel=stride=P).
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, self.grid, self.grid) * 0.02)
        self.scale_residual = nn.Parameter(torch.zeros(len(self.scales), dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.score_mlp = nn.Sequential(nn.Linear(dim * len(self.score_layers), score_dim), nn.GELU(),
                                       nn.Linear(score_dim, score_dim))
        self.prompt = nn.Parameter(torch.randn(score_dim) * 0.02)
        self.text_proj = nn.Linear(text_dim, score_dim) if text_dim is not None else None

    # -- pieces -------------------------------------------------------------------------------
    def position_embedding(self, positions: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, K, D): the (G x G) position embedding resized bilinearly to ``grid`` and read at
        ``positions`` (B, K, 2) (row, col), sampled directly (grid_sample) instead of resizing."""
        batch, count, _ = positions.shape
        centre_y = (positions[..., 0].to(self.pos_embed.dtype) + 0.5) / grid[0] * 2 - 1
        centre_x = (positions[..., 1].to(self.pos_embed.dtype) + 0.5) / grid[1] * 2 - 1
        sample_at = torch.stack([centre_x, centre_y], dim=-1).view(batch, 1, count, 2)
        table = self.pos_embed.expand(batch, -1, -1, -1)
        return F.grid_sample(table, sample_at, mode="bilinear", padding_mode="border", align_corners=False)[:, :, 0].transpose(1, 2)

    def embed(self, images: torch.Tensor, index: torch.Tensor, side: int) -> Tuple[torch.Tensor, torch.Tensor]:
        patches, positions = gather_patches(images, index, self.patch_size, (side, side), backend=self.backend)
        grid = side // self.patch_size
        return self.patch_embed(patches) + self.position_embedding(positions, (grid, grid)), positions

    def encode_low_res(self, images: torch.Tensor):
        """Low-res pass. Returns (tokens (B, G*G, D) before the final norm, per-layer K/V, the
        outputs of ``score_layers``)."""
        batch = images.shape[0]
        every = torch.arange(self.grid * self.grid, device=images.device).expand(batch, -1)
        x, _ = self.embed(images, every, self.low_res)
        cache, picked = [], []
        for layer, block in enumerate(self.blocks):
            x, kv = block(x)
            cache.append(kv)
            if layer in self.score_layers:
                picked.append(x)
        return x, cache, picked

    def score(self, score_features: List[torch.Tensor], text_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, G, G) saliency logits of the low-res patches."""
        features = self.score_mlp(torch.cat(score_features, dim=-1))
        if text_embedding is None:
            prompt = self.prompt
        else:
            if self.text_proj is None:
                raise ValueError("text_embedding given but the encoder was built without text_dim")
            if text_embedding.dim() != 2 or text_embedding.shape[0] != features.shape[0] \
                    or text_embedding.shape[1] != self.text_proj.in_features:
                raise ValueError(f"text_embedding must have shape (B, text_dim) = ({features.shape[0]}, "
                                 f"{self.text_proj.in_features}), got {tuple(text_embedding.shape)}")
            prompt = self.text_proj(text_embedding)
        logits = patch_saliency(features, prompt, logit_scale=self.logit_scale, clamp=self.logit_clamp,
                                return_logits=True)
        return logits.view(-1, self.grid, self.grid)

    def encode_selected(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """High-res pass: ``tokens`` (B, N, D) attend to [low-res K/V ; own K/V] at every layer."""
        for block, kv in zip(self.blocks, cache):
            tokens, _ = block(tokens, context=kv)
        return tokens

    # -- the model ----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, text_embedding: Optional[torch.Tensor] = None, *,
                budget=None, exclude=None) -> PS3Output:
        """images (B, C, H, W); ``budget`` overrides the constructor's (int or per-scale list);
        ``exclude`` (per-scale bool masks) skips patches chosen by an earlier look."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        expected = self.patch_embed.in_features // self.patch_size ** 2
        if images.shape[1] != expected:
            raise ValueError(f"images must have {expected} channels, got shape {tuple(images.shape)}")
        budget = self.budget if budget is None else budget
        low, cache, score_features = self.encode_low_res(images)
        low_scores = self.score(score_features, text_embedding)
        grids = [s // self.patch_size for s in self.scales]
        scale_scores = [F.interpolate(low_scores[:, None], size=(g, g), mode="bilinear", align_corners=False)[:, 0]
                        for g in grids]
        # an int budget is split across scales by patch count (largest remainder)
        selection = select_patches(scale_scores, budget, exclude)
        embedded, positions = [], []
        for s, (side, index) in enumerate(zip(self.scales, selection)):
            tokens, where = self.embed(images, index, side)
            tokens = tokens + self.scale_residual[s]
            if self.straight_through:
                chosen = torch.sigmoid(torch.gather(scale_scores[s].flatten(1), 1, index))[..., None]
                tokens = tokens * (1 + chosen - chosen.detach())
            embedded.append(tokens)
            positions.append(where)
        high = self.encode_selected(torch.cat(embedded, dim=1), cache)
        low, high = self.norm(low), self.norm(high)
        pooled = torch.cat([low, high], dim=1).mean(dim=1)
        return PS3Output(high, pooled, low, selection, positions, scale_scores, low_scores)

    def load_timm_state_dict(self, state_dict) -> None:
        """Load a timm ``VisionTransformer`` state dict (pre-norm blocks, fused qkv, no layer scale)
        into the shared ViT; the scorer, prompt and per-scale residuals keep their values.

        The Conv2d patch embedding (D, C, P, P) becomes the Linear on (C, P, P)-flattened patches;
        a class token's position entry is dropped and the position grid is resized bilinearly to
        ours. timm itself is not needed: pass ``timm_model.state_dict()``.
        """
        ours = {}
        weight = state_dict["patch_embed.proj.weight"]
        if weight.shape[-1] != self.patch_size or weight[0].numel() != self.patch_embed.in_features:
            raise ValueError(f"patch embedding {tuple(weight.shape)} does not fit patch_size {self.patch_size} "
                             f"and {self.patch_embed.in_features} inputs")
        ours["patch_embed.weight"] = weight.reshape(weight.shape[0], -1)
        ours["patch_embed.bias"] = state_dict["patch_embed.proj.bias"]
        positions = state_dict["pos_embed"][0]  # (prefix + g*g, D)
        side = int(round((positions.shape[0]) ** 0.5))
        if side * side != positions.shape[0]:
            positions = positions[1:]  # class token first
            side = int(round(positions.shape[0] ** 0.5))
        table = positions.T.reshape(1, -1, side, side)
        if side != self.grid:
            table = F.interpolate(table, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        ours["pos_embed"] = table
        renames = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
                   "norm1": "norm1", "norm2": "norm2"}
        for layer in range(len(self.blocks)):
            for theirs, mine in renames.items():
                for kind in ("weight", "bias"):
                    ours[f"blocks.{layer}.{mine}.{kind}"] = state_dict[f"blocks.{layer}.{theirs}.{kind}"]
        # timm's avg-pool models keep their final LayerNorm as fc_norm (after pooling) and an
        # identity norm; ours normalizes tokens before pooling, so reuse fc_norm's affine there.
        final = "norm" if "norm.weight" in state_dict else "fc_norm"
        ours["norm.weight"], ours["norm.bias"] = state_dict[f"{final}.weight"], state_dict[f"{final}.bias"]
        missing = [name for name, value in ours.items() if value.shape != self.state_dict()[name].shape]
        if missing:
            raise ValueError(f"shapes differ from this encoder's for {missing}")
        self.load_state_dict(ours, strict=False)

    def encode_all_patches(self, images: torch.Tensor, side: Optional[int] = None) -> torch.Tensor:
        """The baseline PS3 avoids: every patch of the image at ``side`` (default the largest
        scale) through the same ViT with full self-attention. Returns (B, D) pooled tokens."""
        side = self.scales[-1] if side is None else side
        grid = side // self.patch_size
        every = torch.arange(grid * grid, device=images.device).expand(images.shape[0], -1)
        x, _ = self.embed(images, every, side)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x).mean(dim=1)
