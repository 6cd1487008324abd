"""lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`` with
``forward(out0, out1)`` on fastcl's kernels. This module does not import lightly.

Without a memory bank: the fused NT-Xent over the 2B views (``fastcl.nt_xent``). With one
(``memory_bank_size=(size, dim)`` as lightly 1.6, or an int ``size``, the width then taken from
the first batch): out0 against its own out1 plus the bank's entries, read in place from a
:class:`fastcl.MemoryBank` that fills like lightly's (random unit rows at start, then out1 of
each training batch, FIFO; a batch that runs past the end is cut there).

``gather_distributed=True`` with several processes, no bank: lightly's distributed NT-Xent, fused
by ``fastcl.distributed.info_nce``. With z = cat(normalize(out0), normalize(out1)) (2B local rows),
row i's candidates are every rank's 2B rows but itself and its positive is its other view
((i + B) mod 2B of its own rank): ``info_nce(z, z, positive=partner, exclude_self=True)``. Rank r
returns ``R / D_global * (sum of its row losses)`` (D_global = 2 x the global batch), which is
lightly's local mean for equal batches, with lightly's gradients (its gather's backward sums every
rank's gradient of a rank's rows, as fastcl's does). Uneven batches, which lightly's equal-size
all_gather cannot take, run too; their losses average over ranks to the single-process loss on
the global batch. With a bank, out1 of every rank is pushed to it, as lightly's bank does.

fastcl extension, after lightly's arguments: ``distributed_mode="auto"`` (keyword only; one of
``fastcl.distributed.MODES``), the ``mode`` of that ``fastcl.distributed.info_nce`` call
("ring": memory per rank flat in the world size).

``peer_loss_class`` gives lightly's own ``NTXentLoss`` to compare with: from the package, or,
where it cannot be imported (it needs torchvision), loaded from its files by
``_peer_module_from_files``.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as _fastcl_distributed
from ..memory_bank import MemoryBank
from ..ops.common.checks import check_choice
from ..ops.info_nce import nt_xent
from . import log

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """lightly's ``NTXentLoss`` on fastcl.

    lightly's arguments, then fastcl's ``distributed_mode`` ("auto", "gather" or "ring"): the
    ``mode`` of ``fastcl.distributed.info_nce`` under ``gather_distributed=True`` with several
    processes (the module docstring gives the loss).
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, distributed_mode: str = "auto"):
        super().__init__()
        check_choice("distributed_mode", distributed_mode, _fastcl_distributed.MODES)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.distributed_mode = distributed_mode
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        if gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not available.")
        size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
        if any(x < 0 for x in size) or len(size) not in (1, 2):
            raise ValueError(f"memory_bank_size must be an int or (size, dim) with entries >= 0, got {memory_bank_size!r}")
        self.memory_bank_size = memory_bank_size
        self.bank = None
        self.cross_entropy = nn.CrossEntropyLoss(reduction="mean")  # as lightly's (the fused path does not use it)
        if size[0] > 0 and len(size) == 2:
            self.bank = self._new_bank(size[0], size[1])

    @property
    def memory_bank(self) -> Optional[MemoryBank]:
        """The bank of negatives (a :class:`fastcl.MemoryBank`, not lightly's ``MemoryBankModule``:
        its rows are ``memory_bank.negatives()``), or None before the first batch sets its width."""
        return self.bank

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a bank whose width came from the first batch: make it before its saved rows load into it
        saved = state_dict.get(prefix + "bank.embeddings")
        if self.bank is None and saved is not None:
            self.bank = MemoryBank(saved.shape[0], saved.shape[1], overflow="drop").to(saved.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _new_bank(size: int, dim: int) -> MemoryBank:
        bank = MemoryBank(size, dim, overflow="drop")
        bank.fill(nn.functional.normalize(torch.randn(size, dim), dim=-1))
        return bank

    def _several_processes(self) -> bool:
        return self.gather_distributed and dist.is_initialized() and dist.get_world_size() > 1

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        size = self.memory_bank_size if isinstance(self.memory_bank_size, int) else self.memory_bank_size[0]
        if size == 0 and self._several_processes():
            log.debug("lightly NTXentLoss: fused path (fastcl.distributed.info_nce, mode=%s)", self.distributed_mode)
            return _distributed_loss(out0, out1, self.temperature, self.distributed_mode)
        if size == 0:
            log.debug("lightly NTXentLoss: fused path (fastcl.nt_xent)")
            return nt_xent(out0, out1, temperature=self.temperature, normalize=True)
        log.debug("lightly NTXentLoss: fused path (memory bank)")
        if self.bank is None:
            self.bank = self._new_bank(size, out0.shape[1]).to(out0.device)
        unit1 = nn.functional.normalize(out1, dim=1)
        # out0_i's candidates: its own out1_i (the positive) and every bank entry (no gradient,
        # read in place); the other rows of out1 are not candidates, as in lightly
        loss = _bank_loss(nn.functional.normalize(out0, dim=1), unit1, self.bank, self.temperature)
        if out0.requires_grad:
            pushed = unit1.detach()
            if self._several_processes():  # lightly's bank takes every rank's out1, in rank order
                pushed = _fastcl_distributed.all_gather_rows(pushed)
            self.bank.push(pushed)
        return loss


def _distributed_loss(out0, out1, temperature: float, mode: str) -> torch.Tensor:
    """lightly's distributed NT-Xent (module docstring): each of the 2B local views against every
    rank's 2B views but itself, its positive its other view."""
    z = torch.cat([nn.functional.normalize(out0, dim=1), nn.functional.normalize(out1, dim=1)])
    views = z.shape[0]
    partner = (torch.arange(views, device=z.device) + views // 2) % views
    return _fastcl_distributed.info_nce(z, z, positive=partner, exclude_self=True, temperature=temperature,
                                        reduction="mean", mode=mode)


def _bank_loss(anchors, pair, bank: MemoryBank, temperature: float) -> torch.Tensor:
    """Mean over rows of -log softmax of (a_i . p_i, a_i . bank) / temperature, fused."""
    from ..ops.info_nce import PAIRED, SHARED, Segment, SegmentOptions, segmented_loss

    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    negatives = bank.negatives()
    if negatives.dtype != dtype:
        negatives = negatives.to(dtype)
    elif torch.is_grad_enabled():
        negatives = negatives.clone()  # the bank is pushed to next; a create_graph backward re-reads these rows
    segments = [Segment(anchors.to(dtype), pair.to(dtype), PAIRED), Segment(anchors.to(dtype), negatives, SHARED)]
    return segmented_loss(segments, SegmentOptions(None), torch.tensor(float(temperature), dtype=torch.float64))


# the sys.modules entries _peer_module_from_files sets (stubs or modules loaded from files)
_PEER_MODULE_NAMES = ("lightly", "lightly.utils", "lightly.utils.dist", "lightly.models", "lightly.models.utils",
                      "lightly.models.modules", "lightly.models.modules.memory_bank", "lightly.loss.ntx_ent_loss")


def _peer_root() -> Optional[Path]:
    """The installed lightly package's folder, or None when lightly is not installed."""
    spec = importlib.util.find_spec("lightly")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _function_from_file(path: Path, name: str, namespace: dict):
    """The top-level function ``name`` of the Python file ``path``, run alone in ``namespace``."""
    tree = ast.parse(path.read_text(), str(path))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _peer_module_from_files(root: Path):
    """lightly's ``lightly.loss.ntx_ent_loss`` module loaded from its file under ``root``, with the
    lightly modules it imports stubbed (packages without their ``__init__``, which pulls in
    torchvision; a ``lightly.models.utils`` holding only the bank's distributed gather,
    ``concat_all_gather``, taken from its file) or loaded from their files (``lightly.utils.dist``,
    the memory bank). Stubs already in ``sys.modules`` are kept; the entries set are those of
    ``_PEER_MODULE_NAMES``."""
    for name in ("lightly", "lightly.utils", "lightly.models", "lightly.models.modules", "lightly.models.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["lightly.utils"].dist = _load_file("lightly.utils.dist", root / "utils" / "dist.py")
    sys.modules["lightly.models"].utils = sys.modules["lightly.models.utils"]
    sys.modules["lightly.models.utils"].concat_all_gather = _function_from_file(
        root / "models" / "utils.py", "concat_all_gather", {"torch": torch, "dist": dist})
    _load_file("lightly.models.modules.memory_bank", root / "models" / "modules" / "memory_bank.py")
    return _load_file("lightly.loss.ntx_ent_loss", root / "loss" / "ntx_ent_loss.py")


def peer_loss_class():
    """lightly's own ``NTXentLoss`` class: from the package when it imports, else its loss module
    loaded from the installed files. Raises ImportError when lightly is not installed."""
    try:
        from lightly.loss import NTXentLoss

        return NTXentLoss
    except ImportError:
        pass
    root = _peer_root()
    if root is None:
        raise ImportError("lightly is not installed (pip install --no-deps lightly)")
    return _peer_module_from_files(root).NTXentLoss
