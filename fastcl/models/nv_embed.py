"""NV-Embed-style embedder: a Hugging Face backbone made bidirectional, pooled by latent attention.

Recipe (NV-Embed, Lee et al. ICLR'25): take a decoder LLM (Mistral / Llama / Qwen2 family),
remove its causal mask so every token attends to every non-padding token, append EOS, run it,
and pool the last hidden states with :class:`fastcl.LatentAttentionPooling`. Queries are
formatted ``"Instruct: {task}\\nQuery: {text}"``; the instruction tokens take part in attention
but are left out of the pooling mask. Encoders (BERT, MiniLM) are bidirectional already and
work unchanged.

How the causal mask is removed (transformers 4.5x / 5.x): every attention module's
``is_causal`` flag is set to False (flash-attention and SDPA read it when no mask is given)
and the model gets a 4-D additive padding mask ``(B, 1, L, L)`` (0 where the key is a real
token, the dtype's minimum where it is padding). ``create_causal_mask`` returns a 4-D mask
unchanged, so no causal triangle is added (nor a sliding window: Mistral-style configs attend
over the whole text). Flash-attention-2 implementations take no 4-D mask: load the backbone with
``attn_implementation="sdpa"`` or ``"eager"``.

Example::

    >>> from transformers import AutoModel, AutoTokenizer
    >>> backbone = AutoModel.from_pretrained(name, attn_implementation="sdpa")
    >>> embedder = fastcl.models.BidirectionalEmbedder(backbone, AutoTokenizer.from_pretrained(name))
    >>> q = embedder.encode(["how do plants eat?"], instruction="Given a question, retrieve passages that answer it")
    >>> p = embedder.encode(["Photosynthesis turns light into sugar."])
    >>> score = q @ p.T
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..ops.latent_attention import LatentAttentionPooling

QUERY_TEMPLATE = "Instruct: {task}\nQuery: {text}"


def format_query(text: str, instruction: Optional[str]) -> str:
    """``"Instruct: {task}\\nQuery: {text}"``, or the text alone without an instruction."""
    if not instruction:
        return text
    return QUERY_TEMPLATE.format(task=instruction, text=text)


def make_bidirectional(model: nn.Module) -> int:
    """Set ``is_causal = False`` on every module that has the flag; returns how many were changed.

    Needed for attention implementations that decide causality from the flag (flash-attention,
    SDPA without a mask). The mask side is handled by passing a 4-D padding mask
    (:func:`padding_mask_4d`), which the model uses as given.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and not isinstance(getattr(module, "is_causal"), torch.Tensor):
            if module.is_causal:
                changed += 1
            module.is_causal = False
    return changed


def padding_mask_4d(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 key mask -> (B, 1, L, L) additive mask: 0 to attend, the dtype's minimum not to.

    No causal triangle: every query position sees every non-padding key.
    """
    batch, length = attention_mask.shape
    blocked = (attention_mask == 0).to(dtype) * torch.finfo(dtype).min
    return blocked.view(batch, 1, 1, length).expand(batch, 1, length, length)


class BidirectionalEmbedder(nn.Module):
    """A Hugging Face backbone with bidirectional attention and latent-attention pooling.

    Args:
        backbone: a transformers model (base model or one with a head: its ``base_model`` is used).
        tokenizer: its tokenizer (a fast tokenizer gives exact instruction boundaries via offsets).
        pooling: a :class:`fastcl.LatentAttentionPooling` (e.g. with NV-Embed weights loaded);
            by default a new one with ``num_latents``, ``num_heads``, ``head_dim``, ``ff_mult``.
        bidirectional: remove the causal mask (True for NV-Embed; encoders are unaffected).
        max_length: tokens per text including the appended EOS.
        add_eos: append the tokenizer's EOS token to every text (NV-Embed does); tokenizers
            without an EOS token (BERT: its [SEP] ends the text already) append nothing.

    ``forward(input_ids, attention_mask, pool_mask) -> (B, d)``; :meth:`tokenize` builds the
    three tensors; :meth:`encode` does both without gradients in batches.
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, pooling: Optional[LatentAttentionPooling] = None,
                 num_latents: int = 512, num_heads: int = 8, head_dim: Optional[int] = None, ff_mult: int = 4,
                 normalize: bool = True, bidirectional: bool = True, max_length: int = 512, add_eos: bool = True,
                 backend: str = "auto"):
        super().__init__()
        self.backbone = getattr(backbone, "base_model", backbone)
        hidden_size = self.backbone.config.hidden_size
        if pooling is None:
            pooling = LatentAttentionPooling(hidden_size, num_latents=num_latents, num_heads=num_heads,
                                             head_dim=head_dim, ff_mult=ff_mult, normalize=normalize, backend=backend)
        elif pooling.hidden_size != hidden_size:
            raise ValueError(f"pooling.hidden_size={pooling.hidden_size} but the backbone's hidden size is {hidden_size}")
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.bidirectional = bidirectional
        self.max_length = max_length
        self.add_eos = add_eos
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for a token and EOS), got {max_length}")
        if bidirectional:
            make_bidirectional(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B, L) padding mask, (B, L) pooling mask -> (B, d) embeddings."""
        dtype = next(self.backbone.parameters()).dtype
        mask = padding_mask_4d(attention_mask, dtype) if self.bidirectional else attention_mask
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooling_dtype = self.pooling.latents.dtype
        return self.pooling(hidden.to(pooling_dtype), pool_mask * attention_mask)

    def _eos_id(self) -> Optional[int]:
        """The token appended to every text: EOS when asked for and the tokenizer has one (BERT-style
        tokenizers have none and end with their own [SEP])."""
        return self.tokenizer.eos_token_id if self.add_eos else None

    def tokenize(self, texts: Sequence[str], instruction: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """input_ids, attention_mask and pool_mask (instruction tokens 0) for a batch of texts, right-padded."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
            raise TypeError("texts must be a non-empty list of strings")
        eos = self._eos_id()
        budget = self.max_length - (1 if eos is not None else 0)
        full = [format_query(text, instruction) for text in texts]
        prefix_chars = len(format_query("", instruction)) if instruction else 0
        fast = getattr(self.tokenizer, "is_fast", False)
        encoded = self.tokenizer(full, add_special_tokens=True, truncation=True, max_length=budget,
                                 return_offsets_mapping=fast, return_special_tokens_mask=fast)
        prefix_tokens = 0
        if instruction and not fast:  # slow tokenizer: count the prefix's own tokens (close, not exact at a merge)
            prefix_tokens = len(self.tokenizer(format_query("", instruction), add_special_tokens=True)["input_ids"])
        rows, pools = [], []
        for i, ids in enumerate(encoded["input_ids"]):
            ids = list(ids)
            if not instruction:
                pool = [1] * len(ids)
            elif fast:
                # A token belongs to the instruction when it starts inside the prefix. Special tokens
                # have offset (0, 0): one before the text (BOS, [CLS]) counts as instruction, one after
                # it ([SEP], a tokenizer-added EOS) as text.
                pool, seen_text = [], False
                for (start, _), special in zip(encoded["offset_mapping"][i], encoded["special_tokens_mask"][i]):
                    in_text = seen_text if special else start >= prefix_chars
                    seen_text = seen_text or in_text
                    pool.append(int(in_text))
            else:
                pool = [0 if j < prefix_tokens else 1 for j in range(len(ids))]
            if eos is not None and (not ids or ids[-1] != eos):  # some tokenizers add EOS themselves
                ids.append(eos)
                pool.append(1)
            rows.append(ids)
            pools.append(pool)
        length = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        pool_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (ids, pool) in enumerate(zip(rows, pools)):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :len(ids)] = 1
            pool_mask[i, :len(pool)] = torch.tensor(pool, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], instruction: Optional[str] = None, batch_size: int = 32) -> torch.Tensor:
        """L2-normalized (N, d) float32 embeddings of ``texts`` (queries: pass their ``instruction``)."""
        if isinstance(texts, str):
            texts = [texts]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            chunks: List[torch.Tensor] = []
            for start in range(0, len(texts), batch_size):
                batch = {k: v.to(device) for k, v in self.tokenize(list(texts[start:start + batch_size]), instruction).items()}
                embedding = self(**batch).float()
                chunks.append(torch.nn.functional.normalize(embedding, p=2, dim=-1))
        finally:
            self.train(was_training)
        return torch.cat(chunks)
