"""fastcl losses inside transformers.Trainer: compute_loss_func and GradCache's deferred mode
give the weights a plain full-batch loop gives."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import fastcl  # noqa: E402
from fastcl.integrations.transformers import compute_loss_func, grad_cache_compute_loss  # noqa: E402

pytestmark = pytest.mark.peers


class TwoTower(torch.nn.Module):
    """query / passage token ids -> embeddings (dropout, to check the replay's RNG)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.EmbeddingBag(50, 16)
        self.project = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(16, 16))

    def encode(self, ids):
        return self.project(self.embed(ids))

    def forward(self, query=None, passage=None, ids=None):
        if ids is not None:  # one tower call, as GradCache makes it
            return self.encode(ids)
        return self.encode(query), self.encode(passage)


def _dataset():
    generator = torch.Generator().manual_seed(3)
    return [{"query": torch.randint(0, 50, (5,), generator=generator),
             "passage": torch.randint(0, 50, (5,), generator=generator)} for _ in range(24)]


def _collate(rows):
    return {name: torch.stack([row[name] for row in rows]) for name in ("query", "passage")}


def _train(tmp_path, trainer_cls, **trainer_kwargs):
    model = TwoTower()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=12,
                                          learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                                          report_to=[], save_strategy="no", remove_unused_columns=False,
                                          use_cpu=True, seed=5, logging_steps=1, gradient_accumulation_steps=1)
    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), data_collator=_collate, **trainer_kwargs)
    trainer.train()
    return [p.detach().clone() for p in model.parameters()]


def test_compute_loss_func_matches_a_plain_loop(tmp_path):
    loss_kwargs = dict(temperature=0.1, normalize=True)
    with_func = _train(tmp_path / "func", transformers.Trainer,
                       compute_loss_func=compute_loss_func(fastcl.info_nce, **loss_kwargs))

    class NaiveTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            q, p = model(**inputs)
            return fastcl.info_nce(q, p, backend="naive", **loss_kwargs)

    reference = _train(tmp_path / "naive", NaiveTrainer)
    for ours_func, expected in zip(with_func, reference):
        torch.testing.assert_close(ours_func, expected, rtol=1e-5, atol=1e-6)


def test_grad_cache_deferred_equals_full_batch_backward_with_scaling():
    """loss.backward() through a graph that scales the loss (accumulation, AMP scaler): the
    replay pushes exactly scale * the full-batch gradient, the temperature gets its share."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    x, y = torch.randn(20, 8), torch.randn(20, 8)
    log_scale = torch.nn.Parameter(torch.tensor(2.0))

    model.zero_grad()
    log_scale.grad = None
    loss = fastcl.info_nce(model(x), model(y), temperature=1 / log_scale.exp(), normalize=True)
    (loss * 0.25).backward()
    expected = [p.grad.clone() for p in model.parameters()] + [log_scale.grad.clone()]

    model.zero_grad()
    log_scale.grad = None
    cache = fastcl.GradCache(model, chunk_size=6, normalize=True)
    deferred = cache.loss(x, y, temperature=1 / log_scale.exp())
    assert all(p.grad is None for p in model.parameters())  # nothing pushed before backward
    torch.testing.assert_close(deferred.detach(), loss.detach())
    (deferred * 0.25).backward()
    got = [p.grad for p in model.parameters()] + [log_scale.grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_cache_under_trainer_equals_plain_without_dropout(tmp_path):
    loss_kwargs = dict(temperature=0.1, normalize=True)

    class NoDropout(TwoTower):
        def __init__(self):
            super().__init__()
            self.project[0].p = 0.0

    class Cached(transformers.Trainer):
        compute_loss = grad_cache_compute_loss(lambda inputs: ({"ids": inputs["query"]}, {"ids": inputs["passage"]}),
                                               chunk_size=5, **loss_kwargs)

    def run(trainer_cls, **kwargs):
        model = NoDropout()
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=12,
                                              learning_rate=0.1, optim="sgd", report_to=[], save_strategy="no",
                                              remove_unused_columns=False, use_cpu=True, seed=5,
                                              gradient_accumulation_steps=2)
        trainer_cls(model=model, args=args, train_dataset=_dataset(), data_collator=_collate, **kwargs).train()
        return list(model.parameters())

    class Plain(transformers.Trainer):  # the loss written out: the reference for both fastcl paths
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            q, p = (torch.nn.functional.normalize(x, dim=-1) for x in model(**inputs))
            return torch.nn.functional.cross_entropy(q @ p.T / loss_kwargs["temperature"], torch.arange(len(q)))

    cached = run(Cached)
    with_loss_func = run(transformers.Trainer, compute_loss_func=compute_loss_func(fastcl.info_nce, **loss_kwargs))
    plain = run(Plain)
    for a, b, c in zip(cached, with_loss_func, plain):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grad_cache_under_trainer_trains_a_loss_modules_temperature(tmp_path, accumulation):
    """GradCache's deferred mode in the Trainer's loop with InfoNCELoss(learnable_temperature=True)
    inside the model: the temperature gets its gradient (it learns), and every weight equals a
    compute_loss override with the plain loss, with and without gradient accumulation."""

    class WithCriterion(TwoTower):
        def __init__(self):
            super().__init__()
            self.project[0].p = 0.0
            self.criterion = fastcl.InfoNCELoss(temperature=0.1, normalize=True, learnable_temperature=True)

    holder = {}

    class Cached(transformers.Trainer):
        compute_loss = grad_cache_compute_loss(lambda inputs: ({"ids": inputs["query"]}, {"ids": inputs["passage"]}),
                                               chunk_size=5, loss_fn=lambda q, p: holder["model"].criterion(q, p))

    class Plain(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            q, p = model(**inputs)
            return model.criterion(q, p)

    def run(trainer_cls):
        model = holder["model"] = WithCriterion()
        start = float(model.criterion.logit_scale)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                                              per_device_train_batch_size=12 // accumulation,
                                              gradient_accumulation_steps=accumulation, learning_rate=0.1,
                                              optim="sgd", lr_scheduler_type="constant", report_to=[],
                                              save_strategy="no", remove_unused_columns=False, use_cpu=True, seed=5)
        trainer_cls(model=model, args=args, train_dataset=_dataset(), data_collator=_collate).train()
        assert float(model.criterion.logit_scale) != start  # the temperature learned
        return [p.detach().clone() for p in model.parameters()]

    cached, plain = run(Cached), run(Plain)
    for a, b in zip(cached, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _train_logged(tmp_path, trainer_cls, accumulation, with_labels, **trainer_kwargs):
    """Weights and logged losses after 2 optimizer steps of 12 rows, in `accumulation` micro-batches."""
    model = TwoTower()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                                          per_device_train_batch_size=12 // accumulation,
                                          gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd",
                                          lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                          remove_unused_columns=False, use_cpu=True, seed=5, logging_steps=1)

    def collate(rows):
        batch = _collate(rows)
        if with_labels:
            batch["labels"] = torch.arange(len(rows))
        return batch

    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), data_collator=collate, **trainer_kwargs)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return [p.detach().clone() for p in model.parameters()], logged


@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_compute_loss_func_under_gradient_accumulation_equals_a_compute_loss_override(tmp_path, accumulation,
                                                                                     with_labels):
    """transformers does not divide a compute_loss_func loss by the accumulation steps (it passes
    num_items_in_batch instead): the weights and the logged loss must still be those of an
    override returning the per-batch mean, at every gradient_accumulation_steps."""
    loss_kwargs = dict(temperature=0.1, normalize=True)

    class MeanLossTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            inputs.pop("labels", None)
            q, p = model(**inputs)
            return fastcl.info_nce(q, p, backend="naive", **loss_kwargs)

    ours, ours_logged = _train_logged(tmp_path / "func", transformers.Trainer, accumulation, with_labels,
                                      compute_loss_func=compute_loss_func(fastcl.info_nce, **loss_kwargs))
    expected, expected_logged = _train_logged(tmp_path / "override", MeanLossTrainer, accumulation, with_labels)
    assert len(ours_logged) == len(expected_logged) == 2
    torch.testing.assert_close(torch.tensor(ours_logged), torch.tensor(expected_logged), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
