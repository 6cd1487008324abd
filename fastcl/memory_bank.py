"""A FIFO queue of past embeddings used as extra negatives (MoCo, XBM, PML's CrossBatchMemory,
lightly's memory bank), read in place by ``fastcl.info_nce(..., memory_bank=bank)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["MemoryBank"]

OVERFLOWS = ("wrap", "drop")


class MemoryBank(nn.Module):
    r"""FIFO queue of ``size`` embeddings of width ``dim`` (no gradient), with optional labels
    and sample indices for the exclusions ``info_nce`` applies.

    ``push(embeddings, labels=None, indices=None)`` stores detached copies, oldest out first;
    the bank lives on the device of the embeddings pushed (it moves on the first push).
    ``overflow="wrap"`` (default) writes a batch that runs past the end around to the start;
    ``"drop"`` writes what fits, drops the rest and restarts at slot 0 (lightly 1.6's bank).

    The queue is part of ``state_dict()`` (its rows, labels, indices, fill count and write
    position), so a checkpoint resumes with the same negatives; a checkpoint saved before the
    bank was saved loads as an empty bank.

    Example::

        >>> bank = fastcl.MemoryBank(4096, 128)
        >>> loss = fastcl.info_nce(q, k, temperature=0.07, normalize=True, memory_bank=bank)
        >>> bank.push(k)            # after the loss: this step's keys are next step's negatives
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 overflow: str = "wrap"):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
        self.size, self.dim, self.overflow = size, dim, overflow
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.count = 0  # filled slots
        self.pointer = 0  # next slot to write
        self.has_labels = False
        self.has_indices = False

    def __len__(self) -> int:
        return self.count

    def get_extra_state(self) -> dict:
        return {"count": self.count, "pointer": self.pointer, "has_labels": self.has_labels,
                "has_indices": self.has_indices, "overflow": self.overflow}

    def set_extra_state(self, state: dict) -> None:
        count, pointer = int(state["count"]), int(state["pointer"])
        if not (0 <= count <= self.size and 0 <= pointer < self.size):
            raise ValueError(f"MemoryBank state has count {count} / pointer {pointer} for a bank of size {self.size}")
        self.count, self.pointer = count, pointer
        self.has_labels, self.has_indices = bool(state["has_labels"]), bool(state["has_indices"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ("embeddings", "labels", "indices", "_extra_state")
        if not any(prefix + name in state_dict for name in names):
            self.reset()  # a checkpoint from before the queue was saved: start empty
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def negatives(self) -> torch.Tensor:
        """The filled rows, a view (no copy): (count, dim)."""
        return self.embeddings[: self.count]

    def filled_labels(self) -> Optional[torch.Tensor]:
        return self.labels[: self.count] if self.has_labels else None

    def filled_indices(self) -> Optional[torch.Tensor]:
        return self.indices[: self.count] if self.has_indices else None

    def reset(self) -> None:
        self.count = self.pointer = 0

    @torch.no_grad()
    def fill(self, embeddings: torch.Tensor) -> None:
        """Set the whole bank (e.g. random initial negatives); the next push writes slot 0."""
        if tuple(embeddings.shape) != (self.size, self.dim):
            raise ValueError(f"embeddings must have shape (size, dim) = ({self.size}, {self.dim}), got {tuple(embeddings.shape)}")
        self._follow(embeddings.device)
        self.embeddings.copy_(embeddings)
        self.count, self.pointer = self.size, 0

    def _follow(self, device: torch.device) -> None:
        if self.embeddings.device != device:
            self.to(device)

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None,
             indices: Optional[torch.Tensor] = None) -> None:
        """Enqueue (rows, dim) embeddings (detached), with their labels / sample indices."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must have shape (rows, dim) with dim = {self.dim}, got {shape}")
        rows = embeddings.shape[0]
        for name, value in (("labels", labels), ("indices", indices)):
            if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (rows,)):
                raise ValueError(f"{name} must be a tensor of shape (rows,) = ({rows},)")
        self._follow(embeddings.device)
        self.has_labels |= labels is not None
        self.has_indices |= indices is not None
        pieces = []  # (slot0, row0, row1)
        if self.overflow == "drop":
            fit = min(rows, self.size - self.pointer)
            pieces.append((self.pointer, 0, fit))
            self.pointer = 0 if self.pointer + rows >= self.size else self.pointer + rows
            self.count = max(self.count, pieces[0][0] + fit)
        else:
            start = max(0, rows - self.size)  # only the newest `size` rows can stay
            slot = (self.pointer + start) % self.size
            row = start
            while row < rows:
                width = min(rows - row, self.size - slot)
                pieces.append((slot, row, row + width))
                row += width
                slot = (slot + width) % self.size
            self.pointer = slot
            self.count = min(self.size, self.count + rows)
        for slot, row0, row1 in pieces:
            self.embeddings[slot:slot + row1 - row0] = embeddings[row0:row1].detach().to(self.embeddings.dtype)
            self.labels[slot:slot + row1 - row0] = labels[row0:row1] if labels is not None else -1
            self.indices[slot:slot + row1 - row0] = indices[row0:row1] if indices is not None else -1

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={self.count}, overflow={self.overflow!r}"
