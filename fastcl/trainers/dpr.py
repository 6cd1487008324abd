"""DPR (Karpukhin et al., EMNLP'20): dense passage retrieval with a dual encoder.

Each training question comes with its passage and one BM25 hard negative (the best-scoring
other training passage, rank-bm25's Okapi BM25); every passage of the batch is a candidate
(B x 2B logits), scored by the raw dot product of the embeddings (no temperature, no
normalization, as in the paper; ``--score cosine`` trains and evaluates with cosine / temperature
instead, the score MiniLM was pretrained with). Data: the Python FAQ and the Debian FAQ pooled, questions split
70/30 (a fixed seeded split); the model trains on the training questions only and is evaluated
on the held-out questions against every passage of both FAQs: recall@1/5/20, MRR@10, NDCG@10,
with BM25 and zero-shot MiniLM (cosine, untrained) as baselines. Goal metric: recall@1.

Encoders: one shared MiniLM by default (``--encoders separate`` for the paper's two towers);
mean pooling, MiniLM's own (``--pooling cls`` for the paper's [CLS]). ``--extra-pairs
python-docs`` adds a second training set, as the paper trains its small sets with the large
ones: every Python doc section title (outside ``faq/``) -> its prose, with BM25 hard negatives.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Literal, Sequence, Tuple

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import option
from .data import choose, faq, synthetic
from .engine import DataUnavailable, Method
from .evaluation import retrieval_metrics
from .text import TextConfig, TextEncoder, embed, load_encoder, needs_text_model, tokenize

DEFAULT_STEPS = 40


@dataclass
class Config(TextConfig):
    encoders: Literal["shared", "separate"] = option("shared", "one encoder for questions and passages, or two towers (the paper's)")
    pooling: Literal["mean", "cls"] = option("mean", "embedding: mean of the tokens (MiniLM's) or [CLS] (the paper's)")
    passage_max_length: int = option(128, "tokens per passage in training")
    hard_negatives: int = option(1, "BM25 hard negatives per question (the paper's 1; 0 for in-batch negatives only)")
    train_fraction: float = option(0.7, "share of the questions used for training (the rest are held out)")
    split_seed: int = option(0, "seed of the train/test split of the questions (fixed across --seed)")
    batch_size: int = option(32, "global batch of questions")
    lr: float = option(5e-5, "peak learning rate")
    eval_max_length: int = option(128, "tokens per text at evaluation (MiniLM was trained on 128)")
    score: Literal["dot", "cosine"] = option("dot", "dot: the paper's raw dot product (temperature 1); cosine: cosine / --temperature, "
                                                    "the score MiniLM was pretrained with")
    temperature: float = option(0.05, "temperature of --score cosine")
    extra_pairs: Literal["none", "python-docs"] = option("none", "a second training set beside the FAQ questions: python-docs, every "
                                                                 "Python doc section title -> its prose (never faq/)")
    extra_share: float = option(0.5, "share of each epoch's rows drawn from --extra-pairs (the FAQ rows repeated to fill the rest)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"--train-fraction must be in (0, 1), got {self.train_fraction}")
        if self.hard_negatives < 0:
            raise ValueError(f"--hard-negatives must be >= 0, got {self.hard_negatives}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 < self.extra_share < 1.0:
            raise ValueError(f"--extra-share must be in (0, 1), got {self.extra_share}")
        if self.passage_max_length < 2:
            raise ValueError(f"--passage-max-length must be at least 2, got {self.passage_max_length}")


def words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """rank-bm25's BM25Okapi over a list of passages."""

    def __init__(self, passages: Sequence[str]):
        try:
            from rank_bm25 import BM25Okapi
        except ImportError as error:
            raise ImportError("DPR's hard negatives and baseline need rank-bm25: pip install rank-bm25 "
                              "(or the trainers extra)") from error
        self.index = BM25Okapi([words(p) for p in passages])

    def scores(self, questions: Sequence[str]) -> torch.Tensor:
        return torch.tensor([list(self.index.get_scores(words(q))) for q in questions], dtype=torch.float64)


BM25_MAX_ROWS = 5000


def training_rows(pairs, train: List[int], hard_negatives: int) -> List[Tuple[str, ...]]:
    """(question, positive, hard negative ...) per training question; negatives from the training
    passages, best BM25 score first, never the question's own passage. Above BM25_MAX_ROWS
    training questions (large synthetic sets of the benchmark's batch search, where BM25's
    quadratic setup would dominate) the next passages are the negatives."""
    passages = [pairs[i][1] for i in train]
    if hard_negatives and len(train) > BM25_MAX_ROWS:
        return [(pairs[index][0], pairs[index][1], *[passages[(row + k) % len(passages)] for k in range(1, hard_negatives + 1)])
                for row, index in enumerate(train)]
    scores = BM25(passages).scores([pairs[i][0] for i in train]) if hard_negatives else None
    rows = []
    for row, index in enumerate(train):
        negatives = []
        if hard_negatives:
            for candidate in torch.argsort(scores[row], descending=True).tolist():
                if candidate != row and passages[candidate] != pairs[index][1]:
                    negatives.append(passages[candidate])
                if len(negatives) == hard_negatives:
                    break
        rows.append((pairs[index][0], pairs[index][1], *negatives))
    return rows


def mixed_rows(rows: List[Tuple[str, ...]], extra: List[Tuple[str, ...]], extra_share: float) -> Tuple[List[Tuple[str, ...]], int]:
    """``rows`` repeated (a whole number of times, at least once) beside ``extra`` so that about
    ``extra_share`` of each epoch's rows are extra ones; (the mixed rows, the repeats)."""
    repeats = max(1, round(len(extra) * (1 - extra_share) / (extra_share * len(rows))))
    return rows * repeats + list(extra), repeats


class DualEncoder(nn.Module):
    """Question and passage towers (the same module when shared); ``role`` picks the tower."""

    def __init__(self, question: nn.Module, passage: nn.Module):
        super().__init__()
        self.question = question
        self.passage = passage if passage is not question else None

    def forward(self, input_ids, attention_mask, role: str = "passage"):
        tower = self.question if role == "question" or self.passage is None else self.passage
        if role not in ("question", "passage"):
            raise ValueError(f"role must be 'question' or 'passage', got {role!r}")
        return tower(input_ids=input_ids, attention_mask=attention_mask)


def build(config: Config) -> Method:
    pairs, real, source = choose(config.data, needs_text_model(faq.question_passages, config.model), lambda: synthetic.question_passages(config.synthetic_size or 300, seed=7),
                                 "Python FAQ + Debian FAQ question/passage pairs")
    train, test = faq.split(pairs, config.train_fraction, config.split_seed)
    rows = training_rows(pairs, train, config.hard_negatives)
    extra_note = ""
    if config.extra_pairs != "none" and not real:
        extra_note = f"; no --extra-pairs {config.extra_pairs} rows (they go with the real FAQs only)"
    elif config.extra_pairs != "none":
        sections = faq.python_doc_sections()
        if not sections:
            raise DataUnavailable(f"--extra-pairs {config.extra_pairs}: the Python docs are not installed: {faq.INSTALL}")
        extra = training_rows(sections, list(range(len(sections))), config.hard_negatives)
        rows, repeats = mixed_rows(rows, extra, config.extra_share)
        extra_note = f"; plus {len(extra)} Python doc section title/passage rows (FAQ rows x{repeats})"
    backbone, tokenizer, encoder_name = load_encoder(config.model, real, config.dropout)
    question_tower = TextEncoder(backbone, config.pooling)
    passage_tower = question_tower if config.encoders == "shared" else TextEncoder(copy.deepcopy(backbone), config.pooling)
    model = DualEncoder(question_tower, passage_tower)
    question_tower.tokenizer = tokenizer
    passages = [p for _, p in pairs]  # every passage of both FAQs is a candidate
    test_questions = [pairs[i][0] for i in test]
    relevant = torch.tensor(test, dtype=torch.long)

    def collate(items):
        questions = tokenize(tokenizer, [item[0] for item in items], config.max_length)
        keys = [item[1] for item in items] + [n for item in items for n in item[2:]]  # positives, then negatives
        return {"question": {**questions, "role": "question"},
                "passage": {**tokenize(tokenizer, keys, config.passage_max_length), "role": "passage"}}

    def encode_inputs(batch):
        return (batch["question"], batch["passage"]), {}

    def representation_loss(questions, keys):
        # the paper's raw dot product: temperature 1, no normalization; positive i is key i
        if config.score == "dot":
            return losses.info_nce(questions, keys, temperature=1.0, normalize=False, loss=config.loss)
        return losses.info_nce(questions, keys, temperature=config.temperature, normalize=True, loss=config.loss)

    def scores(trained, cosine: bool = config.score == "cosine"):
        q = embed(trained, tokenizer, test_questions, config.max_length, role="question").double()
        p = embed(trained, tokenizer, passages, config.eval_max_length, role="passage").double()
        if cosine:
            q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
        return q @ p.T

    def evaluate(trained):
        return retrieval_metrics(scores(trained), relevant)

    def baselines():
        untrained = model.eval()
        with torch.no_grad():
            zero_shot = retrieval_metrics(scores(untrained, cosine=True), relevant)  # MiniLM's own score
        model.train()
        bm25 = retrieval_metrics(BM25(passages).scores(test_questions), relevant)
        return {"bm25": bm25, "zero_shot": zero_shot}

    return Method(model=model, train_data=rows, collate=collate, encode_inputs=encode_inputs,
                  representation_loss=representation_loss, evaluate=evaluate, baselines=baselines,
                  goal_metric="recall@1",
                  data_source=(f"{source}; {len(pairs)} pairs, {len(train)} training / {len(test)} held-out questions, "
                               f"{len(passages)} candidate passages{extra_note}; encoder {encoder_name}"))


# -- benchmark (python -m fastcl.bench trainers) ----------------------------------------------------
BENCH_ARGS = ["--data", "auto", "--steps", "8", "--batch-size", "64", "--max-length", "32", "--passage-max-length", "64",
              "--skip-save"]


def bench_peer(config: Config):
    """sentence-transformers' trainer with MultipleNegativesRankingLoss on (question, positive,
    hard negative) with the raw dot product (scale 1): the same rows, batch, steps, learning rate."""
    from .st_peer import train_with_sentence_transformers

    if config.encoders != "shared" or config.pooling != "mean" or config.hard_negatives != 1:
        raise ValueError("the sentence-transformers peer covers one shared mean-pooled encoder and one hard negative")
    method = build(config)
    rows = method.train_data
    timing = train_with_sentence_transformers(method.model.question.backbone, method.model.question.tokenizer,
                                              {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows],
                                               "negative": [r[2] for r in rows]}, config,
                                              scale=1.0, similarity="dot", max_seq_length=config.passage_max_length)
    return method, timing, method.data_source
