"""End-to-end runs of the vision trainers (SimCLR, CLIP, PS3) on synthetic images, in seconds."""
import json

import pytest
import torch

from fastcl.trainers import clip, ps3, simclr
from fastcl.trainers.engine import train

TINY = {
    "simclr": (simclr, dict(batch_size=16, width=4, hidden_dim=16, projection_dim=8, eval_train=64, eval_test=64,
                            knn_k=5)),
    "clip": (clip, dict(batch_size=16, width=4, embed_dim=16, eval_test=64)),
    "ps3": (ps3, dict(batch_size=4, canvas_side=112, low_res=56, dim=16, depth=1, heads=2, embed_dim=16,
                      eval_canvases=3, timing_batch=1, train_canvases=64)),
}
METRICS = {"simclr": ("linear_probe_accuracy", "knn_accuracy"), "clip": ("zero_shot_accuracy",),
           "ps3": ("box_recall", "retrieval_accuracy")}
SECTIONS = {"simclr": ("random_init", "raw_pixels"), "clip": ("untrained",), "ps3": ("low_res_only", "full_high_res")}


def run(name, tmp_path, label="run", **overrides):
    module, options = TINY[name]
    config = module.Config(**{"data": "synthetic", "steps": 6, "seed": 0, "out": str(tmp_path / label),
                              **options, **overrides})
    train(name, module.build, config)
    with open(tmp_path / label / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    with open(tmp_path / label / "metrics.json") as f:
        metrics = json.load(f)
    return log, metrics


def check_run(name, log, metrics, steps):
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    for key in METRICS[name]:
        assert 0.0 <= metrics[key] <= 1.0, key
        assert key in metrics["before"]
    for section in SECTIONS[name]:
        assert metrics[section], section
    if name == "ps3":
        assert metrics["full_high_res"]["step_time_ms"] > 0 and metrics["step_time_ms"] > 0
        assert metrics["extra"]["budget"] == int(0.25 * (112 // 14) ** 2)


@pytest.mark.parametrize("name", ["simclr", "clip", "ps3"])
def test_synthetic_runs_and_fused_naive_losses_agree(name, tmp_path):
    """End to end on synthetic images (log.jsonl, metrics.json with every baseline section), and
    the fused and naive losses give the same 10-step trajectory (same random numbers)."""
    fused, fused_metrics = run(name, tmp_path, "fused", steps=10, loss="fused")
    naive, _ = run(name, tmp_path, "naive", steps=10, loss="naive")
    check_run(name, fused, fused_metrics, 10)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fused], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in naive], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_simclr_grad_cache_matches_full_batch(tmp_path):
    # GroupNorm keeps samples independent, so chunked replay gives the full-batch gradients
    full, _ = run("simclr", tmp_path, "full", steps=5)
    cached, _ = run("simclr", tmp_path, "cached", steps=5, grad_cache=4)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in cached], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in full], dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_clip_grad_cache_and_logit_scale_clamp(tmp_path):
    log, _ = run("clip", tmp_path, "cached", steps=3, grad_cache=5, init_temperature=0.005, lr=0.5)
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    module, options = TINY["clip"]
    config = module.Config(data="synthetic", steps=1, **options)
    method = module.build(config)
    with torch.no_grad():
        method.model.logit_scale.fill_(10.0)
    method.after_step(method.model)
    assert float(method.model.logit_scale.detach().exp()) == pytest.approx(100.0)


def test_simclr_nt_xent_is_fastcl_against_the_reference():
    z1, z2 = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = views @ views.T / 0.5
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    expected = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(simclr.nt_xent(z1, z2, 0.5, "fused"), expected)
    torch.testing.assert_close(simclr.nt_xent(z1, z2, 0.5, "naive"), expected)


def test_ps3_bce_column_and_local_feature():
    config = ps3.Config(data="synthetic", canvas_side=112, low_res=56, dim=16, depth=1, heads=2, embed_dim=8)
    method = ps3.build(ps3.Config(**{**config.__dict__, "steps": 1, "eval_canvases": 1, "train_canvases": 4}))
    model = method.model
    batch = torch.utils.data.default_collate([method.train_data[i] for i in range(3)])
    (image_input, text_input), _ = method.encode_inputs(batch)
    local = model(**image_input)
    assert local.shape == (3, 9)
    torch.testing.assert_close(local[:, :-1].norm(dim=1), torch.ones(3))
    # the last column is the selection BCE of each row against its own box
    out = model.encoder(image_input["images"], model.text.raw(image_input["caption_ids"]))
    torch.testing.assert_close(local[:, -1], model.selection_bce(out.scores, image_input["boxes"]))
    # a box covering the whole canvas weighs every low-res token fully
    whole = torch.tensor([[0, 0, 112, 112]])
    torch.testing.assert_close(model.low_res_weights(whole).float(), torch.ones(1, 16))


@pytest.mark.parametrize("name", ["simclr", "clip"])
def test_synthetic_size_sets_the_synthetic_training_split(name):
    module, options = TINY[name]
    method = module.build(module.Config(data="synthetic", synthetic_size=40, **options))
    assert len(method.train_data) == 40 and "40 training images" in method.data_source


def test_simclr_probe_sets_do_not_move_with_the_seed():
    """Every seed is scored on the same probe / kNN images, so per-seed rows can be averaged."""
    _, options = TINY["simclr"]
    methods = [simclr.build(simclr.Config(data="synthetic", seed=seed, **options)) for seed in (0, 1)]
    assert methods[0].baselines()["raw_pixels"] == methods[1].baselines()["raw_pixels"]


@pytest.mark.parametrize("option, value", [("noise_p", 1.5), ("blur_p", -0.1), ("flip", 2.0), ("jitter", 1.0)])
def test_simclr_augmentation_options_are_checked(option, value):
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')}"):
        simclr.Config(data="synthetic", **{option: value})
