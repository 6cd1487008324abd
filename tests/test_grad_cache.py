"""GradCache against the plain full-batch backward it replaces (the independent reference)."""
import pytest
import torch
from torch import nn

import fastcl
from fastcl.grad_cache import _RandomState

DIM_IN, DIM_OUT = 12, 8


class Encoder(nn.Module):
    def __init__(self, dropout=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM_IN, 16), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(16), nn.Linear(16, DIM_OUT))

    def forward(self, x):
        return self.net(x)


def grads_of(*modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def assert_grads_close(actual, expected, atol=1e-5, rtol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def batch(rows, seed):
    return torch.randn(rows, DIM_IN, generator=torch.Generator().manual_seed(seed))


def test_shared_encoder_equals_full_batch_backward():
    encoder = Encoder()
    queries, keys = batch(23, 1), batch(23, 2)  # 23 rows, chunks of 5: a short last chunk
    loss_ref = fastcl.info_nce(encoder(queries), encoder(keys), temperature=0.1, normalize=True, backend="naive")
    loss_ref.backward()
    expected = grads_of(encoder)
    zero(encoder)
    cache = fastcl.GradCache(encoder, chunk_size=5, temperature=0.1, normalize=True)
    loss = cache.step(queries, keys)
    assert not loss.requires_grad and loss.dim() == 0
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-6, rtol=1e-6)
    assert_grads_close(grads_of(encoder), expected)


def test_dual_encoder_uneven_inputs_and_step_kwargs_override():
    query_encoder, key_encoder = Encoder(seed=1), Encoder(seed=2)
    queries, keys = batch(10, 3), batch(20, 4)  # DPR-style: positives then extra negatives
    positive = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:10]
    loss_ref = fastcl.info_nce(query_encoder(queries), key_encoder(keys), positive=positive, temperature=0.2, backend="naive")
    loss_ref.backward()
    expected = grads_of(query_encoder, key_encoder)
    zero(query_encoder, key_encoder)
    cache = fastcl.GradCache([query_encoder, key_encoder], chunk_size=4, temperature=0.5)
    loss = cache.step(queries, keys, positive=positive, temperature=0.2)  # step keywords win
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-6, rtol=1e-6)
    assert_grads_close(grads_of(query_encoder, key_encoder), expected)


def chunkwise_reference(encoder, queries, keys, chunk, **loss_kwargs):
    """Plain backward through one graph, the encoder applied chunk by chunk in GradCache's order
    (queries then keys), so dropout draws the same random numbers as GradCache's first pass."""
    reps = [torch.cat([encoder(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]) for x in (queries, keys)]
    loss = fastcl.info_nce(*reps, backend="naive", **loss_kwargs)
    loss.backward()
    return loss.detach()


def test_dropout_same_seed_gives_identical_grads_and_replay_matches_reference(monkeypatch):
    encoder = Encoder(dropout=0.3)
    queries, keys = batch(16, 6), batch(16, 7)
    cache = fastcl.GradCache(encoder, chunk_size=6, temperature=0.1)
    runs = []
    for _ in range(2):
        zero(encoder)
        torch.manual_seed(123)
        runs.append((cache.step(queries, keys), grads_of(encoder), torch.rand(3)))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    assert_grads_close(runs[0][1], runs[1][1], atol=0, rtol=0)

    zero(encoder)
    torch.manual_seed(123)
    loss_ref = chunkwise_reference(encoder, queries, keys, 6, temperature=0.1)
    expected = grads_of(encoder)
    after_ref = torch.rand(3)
    torch.testing.assert_close(runs[0][0], loss_ref, atol=1e-6, rtol=1e-6)
    assert_grads_close(runs[0][1], expected)
    # the random stream continues as if every chunk had run once
    torch.testing.assert_close(runs[0][2], after_ref, atol=0, rtol=0)

    # negative control: without the replay the second pass draws other dropout masks
    monkeypatch.setattr(_RandomState, "restore", lambda self: None)
    zero(encoder)
    torch.manual_seed(123)
    cache.step(queries, keys)
    difference = max((a - e).abs().max().item() for a, e in zip(grads_of(encoder), expected))
    assert difference > 1e-3


def test_learnable_temperature_and_gradient_accumulation():
    encoder = Encoder()
    temperature = nn.Parameter(torch.tensor(0.2))
    batches = [(batch(9, 10), batch(9, 11)), (batch(9, 12), batch(9, 13))]
    for queries, keys in batches:  # two plain steps accumulate into .grad
        fastcl.info_nce(encoder(queries), encoder(keys), temperature=temperature, backend="naive").backward()
    expected = grads_of(encoder) + [temperature.grad.clone()]
    zero(encoder)
    temperature.grad = None
    cache = fastcl.GradCache(encoder, chunk_size=4, temperature=temperature)
    for queries, keys in batches:
        cache.step(queries, keys)
    assert_grads_close(grads_of(encoder) + [temperature.grad], expected)


def test_grad_scaler_scales_grads_and_returns_unscaled_loss():
    encoder = Encoder()
    queries, keys = batch(8, 14), batch(8, 15)
    cache = fastcl.GradCache(encoder, chunk_size=3, temperature=0.1)
    loss_plain = cache.step(queries, keys)
    expected = grads_of(encoder)
    zero(encoder)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = cache.step(queries, keys, scaler=scaler)
    torch.testing.assert_close(loss, loss_plain, atol=0, rtol=0)
    assert_grads_close([g / 1024.0 for g in grads_of(encoder)], expected)


def test_bf16_autocast_on_cpu_matches_full_batch_autocast():
    encoder = Encoder()
    queries, keys = batch(24, 16), batch(24, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = fastcl.info_nce(encoder(queries), encoder(keys), temperature=0.1, normalize=True)
    loss_ref.backward()
    expected = grads_of(encoder)
    zero(encoder)
    cache = fastcl.GradCache(encoder, chunk_size=8, temperature=0.1, normalize=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cache.step(queries, keys)
    assert all(p.grad.dtype == torch.float32 for p in encoder.parameters())
    torch.testing.assert_close(loss, loss_ref.detach(), atol=2e-2, rtol=2e-2)
    # bf16 keeps ~3 significant digits: compare each gradient relative to its own scale
    for actual, reference in zip(grads_of(encoder), expected):
        assert (actual - reference).norm() <= 3e-2 * reference.norm() + 1e-6


transformers = pytest.importorskip("transformers")


def tiny_bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    # float64: BERT's embedding gradients reach ~50, where float32 summation order alone moves them by 1e-4
    return transformers.BertModel(config, add_pooling_layer=False).double().train()


def mean_pool(output, inputs):
    mask = inputs["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * mask).sum(1) / mask.sum(1)


def token_batch(rows, width, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (rows, width), generator=generator) * mask
    return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})


@pytest.mark.parametrize("chunking", [dict(chunk_size=4), dict(chunk_size=None, chunk_tokens=40, trim_padding=True)])
def test_hf_batch_encoding_with_get_rep(chunking):
    model = tiny_bert()
    queries, keys = token_batch(11, 12, 20), token_batch(11, 12, 21)
    reps = [mean_pool(model(**dict(x)), x) for x in (queries, keys)]
    loss_ref = fastcl.info_nce(*reps, temperature=0.1, backend="naive")
    loss_ref.backward()
    expected = grads_of(model)
    zero(model)
    cache = fastcl.GradCache(model, get_rep=mean_pool, temperature=0.1, **chunking)
    if "chunk_tokens" in chunking:
        plan = cache.plan(queries)
        lengths = queries["attention_mask"].sum(1)
        assert all((stop - start) * int(lengths[start:stop].max()) <= 40 or stop - start == 1 for start, stop, _ in plan)
        assert len(plan) > 1 and plan[-1][1] == 11
    loss = cache.step(queries, keys)
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-6, rtol=1e-6)
    assert_grads_close(grads_of(model), expected)


def test_dict_input_and_model_output_needs_get_rep():
    model = tiny_bert()
    queries = dict(token_batch(4, 6, 22))
    with pytest.raises(TypeError, match="get_rep"):
        fastcl.GradCache(model, chunk_size=2).step(queries, queries)


def test_bad_arguments_raise_clear_errors():
    encoder = Encoder()
    with pytest.raises(ValueError, match="chunk_size"):
        fastcl.GradCache(encoder, chunk_size=0)
    with pytest.raises(TypeError, match="encoders"):
        fastcl.GradCache("not a module")
    with pytest.raises(ValueError, match="2 encoders"):
        fastcl.GradCache([Encoder(), Encoder()]).step(batch(4, 0), batch(4, 1), batch(4, 2))
    with pytest.raises(TypeError, match=r"inputs\[0\]"):
        fastcl.GradCache(encoder).step([1, 2, 3], batch(4, 1))
    with pytest.raises(ValueError, match="share their dim 0"):
        fastcl.GradCache(encoder).step({"x": batch(4, 0), "y": batch(5, 0)})
    with pytest.raises(ValueError, match="chunk_tokens needs"):
        fastcl.GradCache(encoder, chunk_tokens=10).step(torch.randn(4), torch.randn(4))


def test_batchnorm_encoder_warns_that_it_is_not_exact():
    encoder = nn.Sequential(nn.Linear(DIM_IN, DIM_OUT), nn.BatchNorm1d(DIM_OUT))
    with pytest.warns(UserWarning, match="BatchNorm"):
        fastcl.GradCache(encoder, chunk_size=4).step(batch(8, 30), batch(8, 31))


class FailingEncoder(nn.Module):
    """Raises (like an out-of-memory error) on its ``fail_at``-th forward pass with autograd."""

    def __init__(self, fail_at):
        super().__init__()
        self.inner = Encoder()
        self.fail_at = fail_at
        self.grad_passes = 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.grad_passes += 1
            if self.grad_passes == self.fail_at:
                raise RuntimeError("out of memory (simulated)")
        return self.inner(x)


@pytest.mark.parametrize("existing", [False, True], ids=["grad_none", "accumulating"])
def test_failure_in_the_replay_leaves_no_partial_gradient(existing):
    encoder = FailingEncoder(fail_at=3)  # chunks of 4: the 3rd replayed chunk raises
    temperature = torch.tensor(0.1, requires_grad=True)
    criterion = fastcl.InfoNCELoss(temperature=0.1, learnable_temperature=True)
    if existing:  # gradient accumulation: .grad already holds an earlier step's gradients
        for p in [*encoder.parameters(), temperature, criterion.logit_scale]:
            p.grad = torch.full_like(p, 0.25)
    before = [None if p.grad is None else p.grad.clone() for p in [*encoder.parameters(), temperature]]
    queries, keys = batch(8, 1), batch(8, 2)
    cache = fastcl.GradCache(encoder, chunk_size=4, temperature=temperature, normalize=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.step(queries, keys)
    after = [p.grad for p in [*encoder.parameters(), temperature]]
    for a, b in zip(after, before):
        assert (a is None and b is None) or torch.equal(a, b)
    # a learnable temperature held by the loss module (not a loss keyword) is restored too
    logit_before = criterion.logit_scale.grad.clone() if existing else None
    encoder.grad_passes, encoder.fail_at = 0, 2
    cache = fastcl.GradCache(encoder, chunk_size=4, loss_fn=criterion)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.step(queries, keys)
    assert (criterion.logit_scale.grad is None) if not existing else torch.equal(criterion.logit_scale.grad, logit_before)
    # the next step (no failure) gives the plain full-batch gradients
    encoder.fail_at = 0
    zero(encoder)
    temperature.grad = None
    cache = fastcl.GradCache(encoder, chunk_size=4, temperature=temperature, normalize=True)
    cache.step(queries, keys)
    got = grads_of(encoder) + [temperature.grad.clone()]
    zero(encoder)
    temperature.grad = None
    fastcl.info_nce(encoder(queries), encoder(keys), temperature=temperature, normalize=True, backend="naive").backward()
    assert_grads_close(got, grads_of(encoder) + [temperature.grad])


def test_zero_row_inputs_raise_clear_error():
    cache = fastcl.GradCache(Encoder(), chunk_size=4, temperature=0.1)
    with pytest.raises(ValueError, match=r"inputs\[0\] has 0 rows"):
        cache.step(batch(0, 1), batch(0, 2))
    with pytest.raises(ValueError, match=r"inputs\[1\] has 0 rows"):
        cache.step(batch(3, 1), batch(0, 2))


def test_deferred_loss_gives_a_loss_module_temperature_its_gradient():
    """GradCache.loss() with loss_fn = InfoNCELoss(learnable_temperature=True): the module's
    logit scale gets the same gradient as a full-batch backward (and as step())."""
    queries, keys = batch(10, 20), batch(10, 21)
    encoder = Encoder()
    criterion = fastcl.InfoNCELoss(learnable_temperature=True, normalize=True)
    (0.5 * criterion(encoder(queries), encoder(keys))).backward()
    expected = grads_of(encoder, criterion)
    zero(encoder, criterion)
    cache = fastcl.GradCache(encoder, chunk_size=4, loss_fn=criterion)
    (0.5 * cache.loss(queries, keys)).backward()
    assert all(p.grad is not None for p in criterion.parameters())
    assert_grads_close(grads_of(encoder, criterion), expected)
    zero(encoder, criterion)
    cache.step(queries, keys)
    assert_grads_close([0.5 * g for g in grads_of(encoder, criterion)], expected)


def test_deferred_backward_continues_the_random_stream():
    """Numbers drawn between loss() and backward() are not drawn again after backward()."""
    cache = fastcl.GradCache(Encoder(dropout=0.3), chunk_size=4)
    torch.manual_seed(3)
    loss = cache.loss(batch(10, 22), batch(10, 23))
    state = torch.get_rng_state()
    drawn_before = torch.rand(4)
    loss.backward()
    drawn_after = torch.rand(4)
    torch.set_rng_state(state)
    torch.rand(4)
    torch.testing.assert_close(drawn_after, torch.rand(4))
    assert not torch.equal(drawn_before, drawn_after)
