"""fastcl.integrations.sentence_transformers against sentence-transformers itself."""
import logging

import pytest
import torch

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
from sentence_transformers import losses as st_losses  # noqa: E402
from sentence_transformers import util as st_util  # noqa: E402

from fastcl.bench.suites.integrations import _FixedColumns  # noqa: E402
from fastcl.integrations import sentence_transformers as ours  # noqa: E402

from .helpers import assert_same  # noqa: E402

pytestmark = pytest.mark.peers


def _embeddings_loss(loss_cls, columns, **kwargs):
    """Loss and gradients wrt the embedding columns of loss_cls(model, **kwargs)."""
    leaves = [c.detach().clone().requires_grad_() for c in columns]
    loss = loss_cls(_FixedColumns(leaves), **kwargs).compute_loss_from_embeddings(leaves, None)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_mnrl_equals_peer(columns, similarity):
    torch.manual_seed(columns)
    embeddings = [torch.randn(37, 24) for _ in range(columns)]
    kwargs = dict(scale=20.0 if similarity == "cos_sim" else 0.3, similarity_fct=getattr(st_util, similarity))
    assert_same(_embeddings_loss(ours.MultipleNegativesRankingLoss, embeddings, **kwargs),
                _embeddings_loss(st_losses.MultipleNegativesRankingLoss, embeddings, **kwargs))


@pytest.mark.parametrize("columns", [2, 3])
def test_mnsrl_equals_peer(columns):
    embeddings = [torch.randn(29, 16) for _ in range(columns)]
    assert_same(_embeddings_loss(ours.MultipleNegativesSymmetricRankingLoss, embeddings),
                _embeddings_loss(st_losses.MultipleNegativesSymmetricRankingLoss, embeddings))


def test_unfused_configuration_runs_the_peer_code(caplog):
    embeddings = [torch.randn(11, 8) for _ in range(3)]
    kwargs = dict(directions=("query_to_doc", "query_to_query"), hardness_mode="in_batch_negatives",
                  hardness_strength=0.5)
    with caplog.at_level(logging.DEBUG, logger="fastcl.integrations"):
        result = _embeddings_loss(ours.MultipleNegativesRankingLoss, embeddings, **kwargs)
    assert "peer path" in caplog.text
    assert_same(result, _embeddings_loss(st_losses.MultipleNegativesRankingLoss, embeddings, **kwargs))


def test_constructors_match_the_peer():
    import inspect

    for name in ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
                 "CachedMultipleNegativesRankingLoss", "GISTEmbedLoss"):
        assert inspect.signature(getattr(ours, name)) == inspect.signature(getattr(st_losses, name)), name


@pytest.fixture(scope="module")
def tiny_model_dir():
    from fastcl.bench.suites.grad_cache import tiny_bert_dir

    return tiny_bert_dir()


def _sentence_model(path, seed=0):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    torch.manual_seed(seed)
    transformer = Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                               device="cpu")


def _features(model, texts):
    return model.tokenize(texts)


def _texts(count, seed):
    generator = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(200)]
    return [" ".join(words[j] for j in torch.randint(0, 200, (int(torch.randint(3, 12, (1,), generator=generator)),),
                                                     generator=generator)) for _ in range(count)]


def _parameter_grads(model, loss_module, features):
    model.zero_grad()
    loss = loss_module(features, None)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cached_mnrl_equals_peer(tiny_model_dir):
    """Real encoder with dropout: the mini-batch replays see the same dropout masks in both."""
    model = _sentence_model(tiny_model_dir)
    model.train()
    features = [_features(model, _texts(13, seed)) for seed in (1, 2, 3)]
    torch.manual_seed(5)
    theirs = _parameter_grads(model, st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), features)
    torch.manual_seed(5)
    mine = _parameter_grads(model, ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), features)
    assert_same(mine, theirs)


def test_gist_equals_peer(tiny_model_dir, monkeypatch):
    """The models' embeddings are replaced by given tensors (a random tiny BERT embeds every
    text almost alike, which would put the guide's comparisons on rounding ties)."""
    import sentence_transformers.sentence_transformer.losses.gist_embed as peer_module

    model = _sentence_model(tiny_model_dir, seed=0)
    guide = _sentence_model(tiny_model_dir, seed=1)
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(3, 19, 12, generator=generator)
    given = {id(guide): [b + 0.8 * torch.randn(19, 12, generator=generator) for b in base]}

    def fake_embed_columns(module, features):
        if id(module) in given:
            return [g[: len(features[0]["input_ids"])].clone() for g in given[id(module)]][: len(features)]
        return given["model"][: len(features)]

    monkeypatch.setattr(peer_module, "embed_columns", fake_embed_columns)
    monkeypatch.setattr(ours, "embed_columns", fake_embed_columns)
    features = [_features(model, _texts(19, seed)) for seed in range(3)]
    cases = [dict(), dict(margin_strategy="relative", margin=0.05), dict(margin=0.1, temperature=0.05),
             dict(contrast_anchors=False), dict(contrast_positives=False), dict(contrast_anchors=False, contrast_positives=False)]
    for kwargs in cases:
        for columns in (2, 3):
            results = []
            for cls in (ours.GISTEmbedLoss, st_losses.GISTEmbedLoss):
                leaves = [b.clone().requires_grad_() for b in base]
                given["model"] = leaves
                loss = cls(model, guide, **kwargs)(features[:columns], None)
                loss.backward()
                results.append((loss.detach(), [leaf.grad for leaf in leaves]))
            assert_same(*results)


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_two_steps_in_sentence_transformer_trainer(tiny_model_dir, tmp_path, loss_name):
    """Two optimizer steps of SentenceTransformerTrainer with the fastcl loss, as with the peer's."""
    Dataset = pytest.importorskip("datasets", reason="SentenceTransformerTrainer needs datasets (dev extra)").Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    dataset = Dataset.from_dict({"anchor": _texts(16, 7), "positive": _texts(16, 8)})

    def train(loss_module_cls):
        model = _sentence_model(tiny_model_dir)
        kwargs = {"mini_batch_size": 3} if "Cached" in loss_name else {}
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / loss_module_cls.__module__), max_steps=2, per_device_train_batch_size=8,
            learning_rate=1e-2, optim="sgd", report_to=[], save_strategy="no", logging_steps=1, seed=3, use_cpu=True,
            dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=loss_module_cls(model, **kwargs))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, [p.detach().clone() for p in model.parameters()]

    their_losses, their_params = train(getattr(st_losses, loss_name))
    our_losses, our_params = train(getattr(ours, loss_name))
    assert len(our_losses) == 2
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-5, atol=1e-6)
    for a, b in zip(our_params, their_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mixed_precision_columns_are_promoted():
    """bf16 queries with fp32 documents (ST #2973): the loss of the promoted fp32 columns."""
    embeddings = [torch.randn(9, 8), torch.randn(9, 8)]
    mixed = [embeddings[0].bfloat16(), embeddings[1]]
    loss = ours.MultipleNegativesRankingLoss(_FixedColumns(mixed)).compute_loss_from_embeddings(mixed, None)
    expected = ours.MultipleNegativesRankingLoss(_FixedColumns(embeddings)).compute_loss_from_embeddings(
        [mixed[0].float(), embeddings[1]], None)
    torch.testing.assert_close(loss, expected)
