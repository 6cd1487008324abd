"""NV-Embed (Lee et al., ICLR'25): a bidirectional backbone pooled by latent attention, two stages.

Model: ``fastcl.models.BidirectionalEmbedder``: the backbone (MiniLM-L6 here; any decoder works
too, its causal mask removed) and ``fastcl.LatentAttentionPooling`` (r latents, 8 heads, GEGLU
feed-forward, L2-normalized output). Queries are written "Instruct: {task}\\nQuery: {text}" and
the instruction tokens are left out of the pooling mask.

Training, as the paper's two stages (``--stage1-fraction`` of the steps, then the rest):
1. retrieval: FAQ training questions -> passages, in-batch negatives plus a BM25 hard negative;
2. retrieval plus a non-retrieval task, hard negatives only (no in-batch negatives): for the
   Lee corpus's training documents, the positive is the document rated most similar by the human
   raters and the hard negative one rated least similar (instruction on both sides, as for STS).
Evaluation: recall@1/5/20, MRR@10, NDCG@10 on the held-out FAQ questions against every passage
(goal: recall@1), and Spearman on the Lee pairs among held-out documents (no pair the model
trained on). Ablation in the same run (``--ablation``, default on): a second backbone with mean
pooling trains side by side on the same batches with the same loss; its metrics are in the
section ``mean_pooling`` of metrics.json.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .config import option
from .data import choose, faq, lee, synthetic
from .dpr import BM25, training_rows
from .engine import DataUnavailable, Method, Stage
from .evaluation import retrieval_metrics, spearman
from .text import TextConfig, load_encoder, mean_pool, needs_text_model

DEFAULT_STEPS = 40
RETRIEVAL_TASK = "Given a question, retrieve passages that answer it"
STS_TASK = "Retrieve semantically similar text"


@dataclass
class Config(TextConfig):
    pooling: Literal["latent", "mean"] = option("latent", "pooling of the main model: latent attention (NV-Embed) or the mean")
    ablation: bool = option(True, "also train the other pooling on its own copy of the backbone, same batches (section mean_pooling / latent_pooling)")
    num_latents: int = option(512, "latent array size r (the paper's 512)")
    num_heads: int = option(8, "cross-attention heads (the paper's 8)")
    temperature: float = option(0.05, "softmax temperature of the cosine similarities")
    stage1_fraction: float = option(0.5, "share of the steps in stage 1 (retrieval, in-batch + hard negatives)")
    passage_max_length: int = option(128, "tokens per passage in training")
    train_fraction: float = option(0.7, "share of the FAQ questions and of the Lee documents used for training")
    split_seed: int = option(0, "seed of the train/test splits (fixed across --seed)")
    batch_size: int = option(32, "global batch")
    lr: float = option(5e-5, "peak learning rate")
    pooling_init: Literal["mean", "random"] = option(
        "random", "start of the latent-attention layer: random (PyTorch's default init) or mean (attention and "
                  "feed-forward output projections zero, so it starts as the backbone's mean pooling plus a learned residual)")
    pooling_lr: Optional[float] = option(None, "learning rate of the latent-attention layer (None: --lr); the "
                                               "backbone keeps --lr")
    eval_max_length: int = option(128, "tokens per text at evaluation (MiniLM was trained on 128)")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.stage1_fraction <= 1.0:
            raise ValueError(f"--stage1-fraction must be in (0, 1], got {self.stage1_fraction}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"--train-fraction must be in (0, 1), got {self.train_fraction}")
        if self.temperature <= 0 or self.num_latents < 1 or self.num_heads < 1:
            raise ValueError("--temperature, --num-latents and --num-heads must be positive")
        if self.pooling_lr is not None and self.pooling_lr <= 0:
            raise ValueError(f"--pooling-lr must be positive, got {self.pooling_lr}")


class MeanPooled(nn.Module):
    """The embedder's backbone with normalized mean pooling over the pooling mask (the ablation)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask, pool_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden.float(), pool_mask * attention_mask), dim=-1)


class Embedders(nn.Module):
    """The main model and, with the ablation, the other pooling side by side: the representation
    is their embeddings concatenated (each half normalized), so one loss call trains both."""

    def __init__(self, main: nn.Module, other: Optional[nn.Module]):
        super().__init__()
        self.main, self.other = main, other

    def forward(self, input_ids, attention_mask, pool_mask):
        out = [self.main(input_ids=input_ids, attention_mask=attention_mask, pool_mask=pool_mask).float()]
        if self.other is not None:
            out.append(self.other(input_ids=input_ids, attention_mask=attention_mask, pool_mask=pool_mask).float())
        return torch.cat(out, dim=-1)


def start_as_mean_pooling(pooling: nn.Module) -> None:
    """Zero the output projections of the attention (``to_out``) and of the feed-forward (``net.2``,
    weight and bias): both blocks are residual, so the layer then returns the mean of the token states,
    exactly the mean pooling the backbone was pretrained for, and training learns a correction on it.
    Gradients still reach every parameter (the output projections first, the rest from the next step)."""
    attention, feed_forward = pooling.cross_attend_blocks
    with torch.no_grad():
        attention.fn.to_out.weight.zero_()
        feed_forward.fn.net[2].weight.zero_()
        feed_forward.fn.net[2].bias.zero_()


def _sts_rows(documents: Sequence[str], pairs, train_docs: List[int]):
    """(anchor, most similar, least similar) among the training documents, by the human ratings."""
    keep = set(train_docs)
    score: Dict[tuple, float] = {}
    for i, j, s in pairs:
        if i in keep and j in keep:
            score[(i, j)] = score[(j, i)] = s
    rows = []
    for anchor in train_docs:
        others = sorted((score[(anchor, o)], o) for o in train_docs if o != anchor)
        rows.append((documents[anchor], documents[others[-1][1]], documents[others[0][1]]))
    return rows


def build(config: Config) -> Method:
    from ..models import BidirectionalEmbedder

    def real():
        return faq.question_passages(), lee.rated_pairs()

    def fake():
        return synthetic.question_passages(config.synthetic_size or 300, seed=7), synthetic.similarity_pairs(40, seed=3)

    (pairs, (documents, rated)), is_real, source = choose(config.data, needs_text_model(real, config.model), fake,
                                                          "FAQ question/passage pairs + Lee rated pairs")
    train, test = faq.split(pairs, config.train_fraction, config.split_seed)
    retrieval = [(RETRIEVAL_TASK,) + row for row in training_rows(pairs, train, 1)]
    doc_order = list(range(len(documents)))
    random.Random(config.split_seed).shuffle(doc_order)
    cut = int(round(config.train_fraction * len(doc_order)))
    train_docs, test_docs = sorted(doc_order[:cut]), set(doc_order[cut:])
    sts = [(STS_TASK,) + row for row in _sts_rows(documents, rated, train_docs)]
    held_out_pairs = [(i, j, s) for i, j, s in rated if i in test_docs and j in test_docs]

    backbone, tokenizer, encoder_name = load_encoder(config.model, is_real, config.dropout)
    width = backbone.config.hidden_size
    latent = BidirectionalEmbedder(backbone, tokenizer, num_latents=config.num_latents, num_heads=config.num_heads,
                                   max_length=config.passage_max_length)
    embedder_for_tokens = latent
    if config.pooling == "latent":
        main, other = latent, (MeanPooled(copy.deepcopy(backbone)) if config.ablation else None)
    else:
        main = MeanPooled(backbone)
        other = BidirectionalEmbedder(copy.deepcopy(backbone), tokenizer, num_latents=config.num_latents,
                                      num_heads=config.num_heads, max_length=config.passage_max_length) if config.ablation else None
    latent_model = main if config.pooling == "latent" else other
    if latent_model is not None and config.pooling_init == "mean":
        start_as_mean_pooling(latent_model.pooling)
    model = Embedders(main, other)
    parameters = None
    if latent_model is not None and config.pooling_lr is not None:
        head = {id(p) for p in latent_model.pooling.parameters()}
        parameters = [{"params": [p for p in model.parameters() if id(p) not in head]},
                      {"params": list(latent_model.pooling.parameters()), "lr": config.pooling_lr}]
    other_name = ("mean_pooling" if config.pooling == "latent" else "latent_pooling") if config.ablation else None

    def tokenize(texts: Sequence[str], instructions: Sequence[Optional[str]], max_length: int) -> Dict[str, torch.Tensor]:
        embedder_for_tokens.max_length = max_length
        groups: Dict[Optional[str], List[int]] = {}
        for index, instruction in enumerate(instructions):
            groups.setdefault(instruction, []).append(index)
        parts = {instruction: embedder_for_tokens.tokenize([texts[i] for i in rows], instruction)
                 for instruction, rows in groups.items()}
        length = max(p["input_ids"].shape[1] for p in parts.values())
        out = {k: torch.zeros(len(texts), length, dtype=torch.long) for k in ("input_ids", "attention_mask", "pool_mask")}
        out["input_ids"].fill_(tokenizer.pad_token_id or 0)
        for instruction, rows in groups.items():
            part = parts[instruction]
            for key in out:
                out[key][rows, :part[key].shape[1]] = part[key]
        return out

    def collate_for(in_batch: bool):
        def collate(items):
            instructions = [item[0] for item in items]
            # STS rows carry their instruction on both sides (symmetric task); passages none
            key_instructions = [instruction if instruction == STS_TASK else None for instruction in instructions]
            keys = [item[2] for item in items] + [item[3] for item in items]
            return {"query": tokenize([item[1] for item in items], instructions, config.max_length),
                    "key": tokenize(keys, key_instructions * 2, config.passage_max_length), "in_batch": in_batch}
        return collate

    def encode_inputs(batch):
        return (batch["query"], batch["key"]), {"in_batch": batch["in_batch"]}

    def representation_loss(queries, keys, in_batch: bool = True):
        rows = queries.shape[0]
        total = 0.0
        for half in range(queries.shape[1] // width):
            q, k = queries[:, half * width:(half + 1) * width], keys[:, half * width:(half + 1) * width]
            if in_batch:  # every key of the batch is a candidate, positive i is key i
                total = total + losses.info_nce(q, k, temperature=config.temperature, loss=config.loss)
            else:  # hard negatives only: one shared label masks the other rows' positives out
                same = torch.zeros(rows, dtype=torch.long, device=q.device)
                total = total + losses.info_nce(q, k[:rows], hard_negatives=k[rows:, None], labels=same, key_labels=same,
                                                temperature=config.temperature, loss=config.loss)
        return total

    passages = [p for _, p in pairs]
    test_questions = [pairs[i][0] for i in test]
    relevant = torch.tensor(test, dtype=torch.long)

    @torch.no_grad()
    def embed(module, texts, instruction, max_length):
        device = next(module.parameters()).device
        chunks = []
        for start in range(0, len(texts), 64):
            part = texts[start:start + 64]
            tokens = tokenize(part, [instruction] * len(part), max_length)
            chunks.append(module(**{k: v.to(device) for k, v in tokens.items()}).double())
        return torch.cat(chunks)

    def metrics_of(trained: Embedders) -> Dict[str, Dict[str, float]]:
        q = embed(trained, test_questions, RETRIEVAL_TASK, config.eval_max_length)
        p = embed(trained, passages, None, config.eval_max_length)
        docs = embed(trained, documents, STS_TASK, config.eval_max_length)
        out = {}
        for half, name in enumerate(["main", other_name] if other_name else ["main"]):
            part = slice(half * width, (half + 1) * width)
            metrics = retrieval_metrics(q[:, part] @ p[:, part].T, relevant)
            d = F.normalize(docs[:, part], dim=-1)
            metrics["spearman"] = spearman([float(d[i] @ d[j]) for i, j, _ in held_out_pairs], [s for *_, s in held_out_pairs])
            out[name] = metrics
        return out

    def evaluate(trained):
        sections = metrics_of(trained)
        main = sections.pop("main")
        return {**main, **sections}  # the ablation as a section of its own

    def baselines():
        return {"bm25": retrieval_metrics(BM25(passages).scores(test_questions), relevant)}

    stages = [Stage("retrieval", retrieval, collate_for(True), config.stage1_fraction)]
    if config.stage1_fraction < 1.0:
        stages.append(Stage("retrieval+sts", retrieval + sts, collate_for(False), 1.0 - config.stage1_fraction))
    return Method(model=model, parameters=parameters, train_data=stages, encode_inputs=encode_inputs, representation_loss=representation_loss,
                  evaluate=evaluate, baselines=baselines, goal_metric="recall@1",
                  data_source=(f"{source}; {len(train)} training / {len(test)} held-out questions, {len(passages)} passages; "
                               f"{len(sts)} STS rows, {len(held_out_pairs)} held-out rated pairs; encoder {encoder_name}; "
                               f"pooling {config.pooling}" + (f" (+ {other_name} ablation)" if other_name else "")))


# -- benchmark (python -m fastcl.bench trainers) ----------------------------------------------------
BENCH_ARGS = ["--data", "auto", "--steps", "8", "--batch-size", "64", "--max-length", "32", "--passage-max-length", "64",
              "--ablation", "false", "--skip-save"]
