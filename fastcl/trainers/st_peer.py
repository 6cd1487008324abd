"""The peer of the text trainers' benchmark: the same backbone, rows, batch, steps, learning rate
and seed trained by sentence-transformers' own ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` (or ``CachedMultipleNegativesRankingLoss`` with ``--grad-cache``),
then evaluated by the method's own ``evaluate``.

``python -m fastcl.trainers.st_peer METHOD [the method's options]`` writes ``OUT/metrics.json``
like a trainer run (``train.time_per_step_s``, ``train.peak_memory_mb``, the goal metric).
Needs sentence-transformers and datasets (the ``trainers-peers`` extra).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from .engine import PeakMemory, _floats
from .runs import write_json


def train_with_sentence_transformers(backbone: nn.Module, tokenizer, columns: Dict[str, List[str]], config, *,
                                     scale: float, similarity: str, max_seq_length: int) -> Dict[str, float]:
    """Train ``backbone`` in place with sentence-transformers' trainer; returns timing and memory."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers import losses, models, util
    from transformers import TrainerCallback

    with tempfile.TemporaryDirectory() as directory:
        backbone.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        transformer = models.Transformer(directory, max_seq_length=max_seq_length)
        pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(modules=[transformer, pooling], device="cpu" if not torch.cuda.is_available() else None)
    similarity_fct = util.cos_sim if similarity == "cosine" else util.dot_score
    if config.grad_cache:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity_fct,
                                                         mini_batch_size=config.grad_cache)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity_fct)

    times: List[float] = []
    memory: List[PeakMemory] = [None]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.began)
            if len(times) == 1 and config.steps > 1:
                memory[0] = PeakMemory(model.device)  # steady state, as the engine measures

    arguments = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fastcl-st-peer-"), per_device_train_batch_size=config.batch_size,
        max_steps=config.steps, learning_rate=config.lr, warmup_steps=config.warmup_steps, lr_scheduler_type="linear",
        weight_decay=config.weight_decay, seed=config.seed, save_strategy="no", report_to=[], logging_steps=1,
        dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(), bf16=config.precision == "bf16",
        disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns), loss=loss,
                                         callbacks=[Timer()])
    memory[0] = PeakMemory(model.device)
    trainer.train()
    peak = memory[0].peak_mb()
    own = backbone.state_dict()  # AutoModel added a pooler the backbone does not have: take the shared weights
    backbone.load_state_dict({k: v for k, v in transformer.auto_model.state_dict().items() if k in own})
    return {"time_per_step_s": statistics.median(times[1:] if len(times) > 1 else times), "peak_memory_mb": peak,
            "steps_run": len(times)}


def main(argv: Sequence[str] = None) -> int:
    from . import load_method
    from .config import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    module = load_method(argv[0])
    if not hasattr(module, "bench_peer"):
        print(f"error: method {argv[0]!r} has no sentence-transformers peer", file=sys.stderr)
        return 2
    config = parse_config(module.Config, argv[1:], prog=f"python -m fastcl.trainers.st_peer {argv[0]}")
    if config.steps is None:
        config.steps = getattr(module, "DEFAULT_STEPS", 100)
    torch.manual_seed(config.seed)
    out = config.out or os.path.join("runs", f"{argv[0]}-st")
    os.makedirs(out, exist_ok=True)
    method, timing, source = module.bench_peer(config)
    method.model.eval()
    metrics = {} if config.skip_eval else _floats(method.evaluate(method.model))
    result = {"method": argv[0], "peer": "sentence-transformers", "data": source, "steps": config.steps,
              "batch_size": config.batch_size, "grad_cache": config.grad_cache, **metrics, "train": timing,
              "goal_metric": method.goal_metric}
    write_json(os.path.join(out, "metrics.json"), result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
