"""A small BERT pretrained here with masked-language modelling only: the encoder SimCSE starts from.

Unsupervised SimCSE's claim is about an encoder that was *not* trained contrastively (the paper
starts from BERT's MLM checkpoint; MiniLM-L6 is already a contrastive sentence encoder, so SimCSE
has nothing left to teach it). No MLM checkpoint ships offline, so this module pretrains one on
the offline text the project already reads: the Python documentation (``python3-doc``'s reST
sources, ~12 MB), the Debian FAQ and the Lee corpus's 300 background documents. The 50 rated Lee
documents SimCSE is evaluated on are left out.

Recipe (BERT's, scaled down): MiniLM's uncased WordPiece tokenizer, 4 layers, 256 hidden, 4 heads,
sequences of 128 tokens packed from consecutive paragraphs (~30k paragraphs, 1.8M tokens), 15% of
the tokens masked (80% [MASK], 10% random, 10% kept; transformers'
``DataCollatorForLanguageModeling``), the MLM logits computed at the masked positions only,
batches of 64, AdamW (lr 7e-4, 10% warm-up, linear decay), 450 steps (about one pass over the
corpus) under bf16 autocast, seed 0: ~12 minutes on 2 CPU cores, masked-token loss 10.4 -> 5.4.
Small and short next to BERT's 3.3B words: enough to start SimCSE from an encoder that was never
trained contrastively, not a strong encoder.

Built once and cached in ``$FASTCL_CACHE/mlm-bert-<recipe hash>`` (default ``~/.cache/fastcl``):
``python -m fastcl.trainers.mlm`` builds it (``make data-mlm``); the SimCSE trainer builds it on
first use. The directory is a transformers model (``AutoModel.from_pretrained``) with its tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

from .engine import DataUnavailable, fit, linear_schedule


@dataclass(frozen=True)
class Recipe:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    sequence: int = 128
    batch_size: int = 64
    steps: int = 450
    lr: float = 7e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    mask_probability: float = 0.15
    seed: int = 0
    bf16: bool = True  # autocast the matrix products to bfloat16 (1.8x faster on a CPU with AVX512-BF16)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT = Recipe()
DESCRIPTION = (f"MLM BERT ({DEFAULT.layers} layers, {DEFAULT.hidden} hidden, pretrained here with masked-language "
               f"modelling only)")


def cache_root() -> str:
    return os.environ.get("FASTCL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastcl")


def model_dir(recipe: Recipe = DEFAULT) -> str:
    return os.path.join(cache_root(), f"mlm-bert-{recipe.key()}")


# -- corpus ---------------------------------------------------------------------------------------
def _python_docs() -> List[str]:
    from .data.faq import _read_lines, python_doc_files, prose_paragraphs

    files = python_doc_files()
    return [paragraph for name in sorted(files) for paragraph in prose_paragraphs("\n".join(_read_lines(files[name])), min_words=8)]


def corpus() -> List[str]:
    """Paragraphs of prose: the Python docs, the Debian FAQ's passages and the Lee background
    documents (never the 50 rated Lee documents). DataUnavailable when none is installed."""
    from .data import faq, lee

    paragraphs = _python_docs()
    try:
        paragraphs += [passage for _, passage in faq.debian_faq()]
    except DataUnavailable:
        pass
    try:
        paragraphs += [" ".join(sentences) for sentences in lee.background_documents() if sentences]
    except DataUnavailable:
        pass
    if not paragraphs:
        raise DataUnavailable("the MLM encoder is pretrained on the Python docs, the Debian FAQ and the Lee corpus: make data")
    return paragraphs


def pack(tokenizer, paragraphs: List[str], sequence: int) -> torch.Tensor:
    """(N, sequence) token ids: consecutive paragraphs' tokens packed into [CLS] ... [SEP] rows."""
    body = sequence - 2
    ids: List[int] = []
    for part in range(0, len(paragraphs), 1000):
        for row in tokenizer(paragraphs[part:part + 1000], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row + [tokenizer.sep_token_id])
    rows = len(ids) // body
    if rows == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {sequence}")
    packed = torch.tensor(ids[:rows * body]).view(rows, body)
    cls = torch.full((rows, 1), tokenizer.cls_token_id)
    sep = torch.full((rows, 1), tokenizer.sep_token_id)
    return torch.cat([cls, packed, sep], dim=1)


# -- pretraining ----------------------------------------------------------------------------------
def pretrain(tokenizer, paragraphs: List[str], recipe: Recipe, log: Optional[Callable[[dict], None]] = None):
    """A ``BertForMaskedLM`` trained for ``recipe.steps`` steps; returns (model, history)."""
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    torch.manual_seed(recipe.seed)
    rows = pack(tokenizer, paragraphs, recipe.sequence)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                        num_attention_heads=recipe.heads, intermediate_size=recipe.intermediate,
                        max_position_embeddings=max(512, recipe.sequence))
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=recipe.mask_probability, return_tensors="pt")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, int(recipe.warmup * recipe.steps))
    schedule = linear_schedule(optimizer, warmup, recipe.steps)
    generator = random.Random(recipe.seed)
    order: List[int] = []
    history = []
    model.train()
    start = time.perf_counter()

    def compute_gradients(step: int) -> torch.Tensor:
        if len(order) < recipe.batch_size:
            order.extend(generator.sample(range(len(rows)), len(rows)))
        batch = rows[order[:recipe.batch_size]]
        del order[:recipe.batch_size]
        masked = collator.torch_call([{"input_ids": row} for row in batch])
        labels = masked["labels"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            hidden = model.bert(input_ids=masked["input_ids"]).last_hidden_state
            where = labels != -100
            logits = model.cls(hidden[where])  # the vocabulary projection at the masked tokens only
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[where])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss

    def after_update(step: int, loss: torch.Tensor) -> None:
        record = {"step": step + 1, "loss": loss.item(), "seconds": round(time.perf_counter() - start, 1)}
        history.append(record)
        if log is not None:
            log(record)

    fit(range(recipe.steps), optimizer, compute_gradients, scheduler=schedule, after_update=after_update)
    return model, history


def build(recipe: Recipe = DEFAULT, log: Optional[Callable[[str], None]] = print, *, tokenizer=None,
          paragraphs: Optional[List[str]] = None) -> str:
    """The cached model directory, pretraining it first when absent (atomically: a half-written
    directory is never left under the final name). ``tokenizer`` and ``paragraphs`` default to
    MiniLM's tokenizer and :func:`corpus` (the cache key assumes those defaults)."""
    path = model_dir(recipe)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if tokenizer is None:
        from transformers import AutoTokenizer

        from .text import minilm_dir, require_text_model

        require_text_model("minilm")  # MiniLM's WordPiece vocabulary
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    if paragraphs is None:
        paragraphs = corpus()
    if log:
        log(f"pretraining the MLM encoder ({recipe.layers} layers, {recipe.hidden} hidden, {recipe.steps} steps) "
            f"on {len(paragraphs)} paragraphs; cached in {path}")
    every = max(1, recipe.steps // 10)

    def report(record):
        if log and (record["step"] % every == 0 or record["step"] == 1):
            log(f"  mlm step {record['step']}/{recipe.steps}  loss {record['loss']:.3f}  {record['seconds']:.0f} s")

    model, history = pretrain(tokenizer, paragraphs, recipe, report)
    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".mlm-bert-", dir=cache_root())
    try:
        model.bert.save_pretrained(staging)
        tokenizer.model_max_length = recipe.sequence  # the positions it was trained on
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "pretraining.json"), "w") as f:
            json.dump({"recipe": asdict(recipe), "paragraphs": len(paragraphs), "history": history[::max(1, len(history) // 100)]
                       + history[-1:]}, f, indent=1)
        try:
            os.rename(staging, path)
        except OSError:  # another process finished first: keep its copy
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastcl.trainers.mlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT.steps)
    args = parser.parse_args(argv)
    print(build(Recipe(steps=args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
