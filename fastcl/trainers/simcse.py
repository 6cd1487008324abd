"""SimCSE (Gao et al., EMNLP'21): contrastive sentence embeddings, unsupervised or with hard negatives.

Unsupervised: each sentence goes through the encoder twice; dropout is the only noise; the
other sentences of the batch are the negatives; cosine similarity, temperature 0.05. Trained on
the Lee background sentences. Supervised (``--mode sup``): (anchor, positive, hard negative)
triples, logits [cos(z1, z2) | cos(z1, z3)] / temperature over B x 2B. No NLI data ships
offline, so the triples are stand-ins: ``--triples lee`` (default) takes a background sentence,
the next sentence of the same document as the "entailment" and a sentence of another document
as the "contradiction"; ``--triples faq`` a FAQ question, its answer's first sentence, and the
first sentence of another answer of the same FAQ file (a topically close "contradiction"). Evaluation: Spearman correlation between the cosine of the
embeddings of the Lee corpus's 50 documents and the 1225 human pair ratings, before and after.

Encoder: the paper starts from BERT's masked-language-model checkpoint, an encoder that was never
trained contrastively. MiniLM-L6 (``--model minilm``) already was, on a billion pairs, and
unsupervised SimCSE only lowers its Spearman. So on real data ``--model auto`` takes the small
BERT :mod:`fastcl.trainers.mlm` pretrains here with masked-language modelling only on the
offline Python docs, Debian FAQ and Lee background text (built once, ~12 minutes, then cached).
Besides Spearman, ``metrics.json`` gives the anisotropy the paper discusses: ``mean_cosine``
between the 50 documents' embeddings and their ``uniformity`` (Wang & Isola), before and after.

Pooling is the mean by default (``--pooling cls --mlp`` gives the paper's [CLS] + MLP during
training).
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .data import choose, lee, synthetic
from .engine import Method
from .evaluation import spearman
from .config import option
from .text import TextConfig, TextEncoder, embed, load_encoder, needs_text_model, tokenize

DEFAULT_STEPS = 300


@dataclass
class Config(TextConfig):
    min_batch_size = 2  # in-batch negatives only: a batch of 1 has none
    mode: Literal["unsup", "sup"] = option("unsup", "unsup: dropout views of one sentence; sup: (anchor, positive, hard negative) triples")
    triples: Literal["lee", "faq"] = option("lee", "sup's stand-in triples: lee (a background sentence, the next one of its "
                                                   "document, a sentence of another document) or faq (question, answer, another answer)")
    temperature: float = option(0.05, "softmax temperature of the cosine similarities")
    model: str = option("auto", "encoder: auto (on real data the MLM BERT pretrained here, fastcl.trainers.mlm; tiny BERT "
                                "for synthetic), auto-minilm (MiniLM on real data, tiny BERT for synthetic), mlm, minilm "
                                "(contrastively pretrained), tiny, or a local model directory")
    pooling: Literal["mean", "cls"] = option("mean", "sentence embedding: mean of the tokens or [CLS] (the paper's)")
    mlp: bool = option(False, "an MLP head over the pooled embedding during training only (the paper's unsupervised recipe)")
    batch_size: int = option(64, "global batch (the paper's 64)")
    lr: float = option(1e-4, "peak learning rate (the 4-layer MLM BERT's; the paper's 3e-5 is BERT-base's)")

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")


def _training_texts(config: Config):
    if config.mode == "unsup":
        def sentences():
            return [(s,) for s in lee.background_sentences()]

        return choose(config.data, needs_text_model(sentences, encoder_name_for(config, True)),
                      lambda: [(s,) for s, _ in synthetic.sentences(config.synthetic_size or 512, seed=config.seed)],
                      "Lee background sentences (gensim)")
    if config.triples == "lee":
        return choose(config.data, needs_text_model(lambda: lee.document_triples(config.seed), encoder_name_for(config, True)),
                      lambda: synthetic_triples(config.seed, config.synthetic_size or 256),
                      "Lee background triples (sentence, next sentence of its document, sentence of another document)")
    from .data import faq

    return choose(config.data, needs_text_model(faq.simcse_triples, encoder_name_for(config, True)),
                  lambda: synthetic_triples(config.seed, config.synthetic_size or 256),
                  "FAQ triples (question, its answer, another answer of the same FAQ)")


def synthetic_triples(seed: int, count: int):
    pairs = synthetic.question_passages(count, seed=seed)
    return [(q, p, pairs[(i + 1) % len(pairs)][1]) for i, (q, p) in enumerate(pairs)]


def encoder_name_for(config: Config, real: bool) -> str:
    """``--model auto``: on real data the MLM BERT pretrained here (an encoder not trained
    contrastively, as the paper's BERT), on synthetic data the tiny BERT; ``auto-minilm``: the
    other text methods' auto (MiniLM on real data; the trainers' benchmark uses it)."""
    if config.model == "auto-minilm":
        return "auto"
    return "mlm" if config.model == "auto" and real else config.model


def isotropy(vectors: torch.Tensor) -> dict:
    """Of unit vectors (N, D): ``mean_cosine`` over distinct pairs (the anisotropy of Ethayarajh
    2019: near 1 when every embedding points one way) and ``uniformity``, log E exp(-2 |x - y|^2)
    over distinct pairs (Wang & Isola 2020, the measure SimCSE reports; lower is more uniform)."""
    n = vectors.shape[0]
    cosine = vectors @ vectors.T
    off = ~torch.eye(n, dtype=torch.bool, device=vectors.device)
    squared = (2 - 2 * cosine[off]).clamp_min(0)
    return {"mean_cosine": float(cosine[off].mean()),
            "uniformity": float(torch.logsumexp(-2 * squared, 0) - math.log(squared.numel()))}


def build(config: Config) -> Method:
    rows, real, source = _training_texts(config)
    evaluation_data = lee.rated_pairs() if real else synthetic.similarity_pairs()
    name = encoder_name_for(config, real)
    if name == "mlm":
        from . import mlm

        backbone, tokenizer, _ = load_encoder(mlm.build(), real, config.dropout)
        encoder_name = mlm.DESCRIPTION
    else:
        backbone, tokenizer, encoder_name = load_encoder(name, real, config.dropout)
    width = backbone.config.hidden_size
    head = nn.Sequential(nn.Linear(width, width), nn.Tanh()) if config.mlp else None
    model = TextEncoder(backbone, config.pooling, head)
    model.tokenizer = tokenizer

    def collate(items):
        columns = list(zip(*items))
        return [tokenize(tokenizer, column, config.max_length) for column in columns]

    def encode_inputs(batch):
        if config.mode == "unsup":
            return (batch[0], batch[0]), {}  # the same sentences twice: two dropout masks
        return tuple(batch), {}

    def representation_loss(first, second, hard=None):
        keys = second if hard is None else torch.cat([second, hard])
        return losses.info_nce(first, keys, temperature=config.temperature, normalize=True, loss=config.loss)

    def evaluate(trained: nn.Module):
        documents, pairs = evaluation_data
        vectors = F.normalize(embed(trained, tokenizer, documents, config.eval_max_length).double(), dim=-1)
        similarity = vectors @ vectors.T
        return {"spearman": spearman([float(similarity[i, j]) for i, j, _ in pairs], [s for _, _, s in pairs]),
                **isotropy(vectors)}

    return Method(model=model, train_data=rows, collate=collate, encode_inputs=encode_inputs,
                  representation_loss=representation_loss, evaluate=evaluate, goal_metric="spearman",
                  data_source=f"{source}; {len(rows)} training rows; encoder {encoder_name}",
                  extra={"evaluation": "Lee 1225 rated pairs" if real else "synthetic rated pairs"})


# -- benchmark (python -m fastcl.bench trainers) ----------------------------------------------------
BENCH_ARGS = ["--data", "auto", "--model", "auto-minilm", "--lr", "3e-5", "--steps", "8", "--batch-size", "64",
              "--max-length", "32", "--skip-save"]


def bench_peer(config: Config):
    """sentence-transformers' trainer with MultipleNegativesRankingLoss (scale 1/temperature,
    cosine): the same rows, batch, steps and learning rate. Returns (method, timing, data)."""
    from .st_peer import train_with_sentence_transformers

    if config.mode != "unsup" or config.mlp or config.pooling != "mean":
        raise ValueError("the sentence-transformers peer covers --mode unsup with mean pooling and no MLP")
    method = build(config)
    sentences = [row[0] for row in method.train_data]
    timing = train_with_sentence_transformers(method.model.backbone, method.model.tokenizer,
                                              {"anchor": sentences, "positive": sentences}, config,
                                              scale=1.0 / config.temperature, similarity="cosine",
                                              max_seq_length=config.max_length)
    return method, timing, method.data_source
