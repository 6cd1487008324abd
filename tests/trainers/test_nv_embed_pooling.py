"""NV-Embed trainer: the latent-attention layer started as mean pooling, and its own learning rate."""
import torch
import torch.nn.functional as F

from fastcl import LatentAttentionPooling
from fastcl.trainers.nv_embed import start_as_mean_pooling

from .helpers import metrics, train


def test_start_as_mean_pooling_returns_the_normalized_masked_mean():
    torch.manual_seed(0)
    pooling = LatentAttentionPooling(16, num_latents=8, num_heads=2, backend="naive")
    start_as_mean_pooling(pooling)
    hidden = torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    expected = F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(pooling(hidden, mask), expected)


def test_nv_embed_mean_init_starts_equal_to_the_mean_pooling_ablation(tmp_path):
    assert train("nv_embed", tmp_path, "--steps", "2", "--pooling-init", "mean", "--pooling-lr", "1e-3") == 0
    before = metrics(tmp_path)["before"]
    for name in ("recall@1", "mrr@10", "spearman"):
        assert before[name] == before["mean_pooling"][name]
