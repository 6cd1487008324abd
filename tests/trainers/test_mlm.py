"""The MLM encoder SimCSE starts from (fastcl.trainers.mlm) and SimCSE's isotropy metrics."""
import glob
import json
import math
import os

import pytest
import torch

from . import helpers  # noqa: F401  (skips without the trainers extra)
from fastcl.trainers import mlm, simcse
from fastcl.trainers.data import faq, lee, synthetic
from fastcl.trainers.text import _synthetic_tokenizer


def _paragraphs(count=80):
    return [" ".join(s for s, _ in synthetic.sentences(6, seed=i)) for i in range(count)]


def test_pack_rows_are_cls_tokens_sep_in_corpus_order():
    tokenizer = _synthetic_tokenizer()
    paragraphs = _paragraphs(10)
    rows = mlm.pack(tokenizer, paragraphs, 16)
    assert rows.shape[1] == 16
    assert (rows[:, 0] == tokenizer.cls_token_id).all() and (rows[:, -1] == tokenizer.sep_token_id).all()
    stream = []
    for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.sep_token_id]
    assert rows[:, 1:-1].reshape(-1).tolist() == stream[:rows.shape[0] * 14]  # nothing reordered or dropped mid-row
    with pytest.raises(ValueError, match="fewer than one sequence"):
        mlm.pack(tokenizer, ["a"], 64)


def test_pretraining_lowers_the_masked_loss_and_build_caches_a_loadable_encoder(tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("FASTCL_CACHE", str(tmp_path))
    tokenizer = _synthetic_tokenizer()
    recipe = mlm.Recipe(layers=1, hidden=32, heads=2, intermediate=64, sequence=32, batch_size=16, steps=60, lr=3e-3)
    path = mlm.build(recipe, log=None, tokenizer=tokenizer, paragraphs=_paragraphs())
    assert path == mlm.model_dir(recipe) and path.startswith(str(tmp_path))
    history = json.load(open(os.path.join(path, "pretraining.json")))["history"]
    first, last = history[0]["loss"], history[-1]["loss"]
    assert first > math.log(len(tokenizer)) - 1.0  # starts near uniform over the vocabulary
    assert last < first - 1.0  # and learns the synthetic grammar
    model = AutoModel.from_pretrained(path, local_files_only=True)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(path, local_files_only=True)) == len(tokenizer)
    assert not glob.glob(os.path.join(str(tmp_path), ".mlm-bert-*"))  # no staging directory left
    # a second build reads the cache: it must not train again (an empty corpus would fail to pack)
    assert mlm.build(recipe, log=None, tokenizer=tokenizer, paragraphs=[]) == path
    assert mlm.Recipe(steps=61).key() != recipe.key()


@pytest.mark.skipif(not glob.glob(faq.PYTHON_DOCS_GLOB, recursive=True) or lee.lee_dir() is None,
                    reason="python3-doc or gensim (the MLM corpus) is not installed")
def test_corpus_is_prose_and_leaves_out_the_rated_lee_documents():
    paragraphs = mlm.corpus()
    assert len(paragraphs) > 5000 and all(len(p.split()) >= 5 for p in paragraphs)
    assert not any(p.startswith("..") for p in paragraphs)  # comments and directives are not prose
    rated, _ = lee.rated_pairs()
    text = "\n".join(paragraphs)
    assert not any(document[:80] in text for document in rated)
    background = [" ".join(s) for s in lee.background_documents() if s]
    assert background[0] in paragraphs


def test_isotropy_of_known_configurations():
    identical = torch.nn.functional.normalize(torch.ones(5, 4, dtype=torch.float64), dim=-1)
    assert simcse.isotropy(identical) == pytest.approx({"mean_cosine": 1.0, "uniformity": 0.0})
    orthonormal = torch.eye(6, dtype=torch.float64)  # |x - y|^2 = 2 for every pair
    assert simcse.isotropy(orthonormal) == pytest.approx({"mean_cosine": 0.0, "uniformity": -4.0})
    # against a direct double loop on random unit vectors
    vectors = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    pairs = [(i, j) for i in range(7) for j in range(7) if i != j]
    cosines = [float(vectors[i] @ vectors[j]) for i, j in pairs]
    uniform = math.log(sum(math.exp(-2 * float(((vectors[i] - vectors[j]) ** 2).sum())) for i, j in pairs) / len(pairs))
    assert simcse.isotropy(vectors) == pytest.approx({"mean_cosine": sum(cosines) / len(cosines), "uniformity": uniform})


def test_simcse_auto_model_is_the_mlm_encoder_on_real_data_only():
    config = simcse.Config(data="synthetic")
    assert simcse.encoder_name_for(config, real=True) == "mlm"
    assert simcse.encoder_name_for(config, real=False) == "auto"
    assert simcse.encoder_name_for(simcse.Config(model="minilm"), real=True) == "minilm"
    assert simcse.encoder_name_for(simcse.Config(model="auto-minilm"), real=True) == "auto"
