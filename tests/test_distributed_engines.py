"""fastcl.distributed under the engines that wrap the encoder: DistributedDataParallel, FSDP2
(``torch.distributed.fsdp.fully_shard``), Accelerate, and GradCache over DDP.

One spawn per world size (2, 3 and 4 gloo processes on the CPU, uneven local batches) runs every
case. Every rank builds the same model from one seed and the same global batches, keeps its own
rows, trains two steps with the engine and checks against a single-process run of the same model
on the concatenated batch:
- the mean over ranks of the returned losses equals the single-process loss;
- the engine-averaged parameter gradients (DDP's all-reduce, FSDP2's reduce-scatter, both a mean
  over ranks) equal the single-process gradients: fastcl.distributed's convention
  (rank r returns R / B_global * its local sum of row losses) makes the mean the right reduction;
- after each optimizer step the parameters still equal the single-process ones.
Losses: info_nce, CLIP and SigLIP, in gather and ring mode. The learnable logit scale (and
SigLIP's bias) lives inside the wrapped module (open_clip's layout) and gets its gradient from the
loss on every rank. Float64 throughout: only summation order differs.
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastcl

from .spawn import mean_over_ranks, spawn, split

IN_FEATURES, HIDDEN, DIM = 5, 8, 6
TOLERANCE = dict(atol=1e-9, rtol=1e-7)  # float64: only summation order differs
MODES = ("gather", "ring")
LOSSES = ("info_nce", "clip", "siglip")
STEPS = 2
LEARNING_RATE = 0.5  # large enough that a wrong gradient moves the parameters visibly
CHUNK_SIZE = 3  # GradCache: every local batch below (4 to 6 rows) is two chunks, as DDP needs


class Tower(nn.Module):
    """Linear + LayerNorm + GELU + Linear: deterministic (no dropout), rows independent."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))

    def forward(self, x):
        return self.net(x)


class DualEncoder(nn.Module):
    """One tower for queries and keys, a learnable logit scale and (SigLIP) bias, returned by
    ``forward`` as open_clip's CLIP model returns them (so that DDP and FSDP see the parameters
    used in forward). ``scale_shape``: () as in open_clip; (1,) for FSDP2, whose fully_shard
    refuses 0-d parameters ("fully_shard doesn't support scalar parameters", torch 2.13)."""

    def __init__(self, scale_shape=(), with_bias=False):
        super().__init__()
        self.tower = Tower()
        self.logit_scale = nn.Parameter(torch.full(scale_shape, math.log(8.0)))
        self.logit_bias = nn.Parameter(torch.full(scale_shape, -2.0)) if with_bias else None

    def forward(self, queries, keys):
        features = F.normalize(self.tower(queries), dim=-1), F.normalize(self.tower(keys), dim=-1), self.logit_scale.exp()
        return features if self.logit_bias is None else (*features, self.logit_bias)


def contrastive_loss(kind, queries, keys, scale, bias=None, *, mode=None):
    """The single-process loss (``mode=None``, materialized logits) or fastcl.distributed's."""
    if kind == "info_nce":
        if mode is None:
            return fastcl.info_nce(queries, keys, temperature=1.0 / scale, backend="naive")
        return fastcl.distributed.info_nce(queries, keys, temperature=1.0 / scale, mode=mode)
    if kind == "clip":
        if mode is None:
            return fastcl.clip_loss(queries, keys, scale, backend="naive")
        return fastcl.distributed.clip_loss(queries, keys, scale, mode=mode)
    if mode is None:
        return fastcl.siglip_loss(queries, keys, scale, bias, backend="naive")
    return fastcl.distributed.siglip_loss(queries, keys, scale, bias, mode=mode)


def global_batches(sizes):
    """STEPS global (queries, keys) batches of sum(sizes) rows, the same on every rank."""
    generator = torch.Generator().manual_seed(11)
    total = sum(sizes)
    return [(torch.randn(total, IN_FEATURES, generator=generator, dtype=torch.float64),
             torch.randn(total, IN_FEATURES, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]


def full(tensor):
    """The whole tensor of a DTensor (FSDP2's sharded parameters and gradients; a collective:
    every rank calls it in the same order), else the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def parameters_by_name(model):
    """name -> parameter, without the wrappers' prefixes (DDP's ``module.``)."""
    return {name.removeprefix("module."): parameter for name, parameter in model.named_parameters()}


def new_model(kind, scale_shape=()):
    torch.manual_seed(5)  # the same initial parameters on every rank and in the reference
    return DualEncoder(scale_shape, with_bias=kind == "siglip").double()


def reference_run(kind, batches, scale_shape=()):
    """Per step: (loss, gradients, parameters after the step) of one process on the global batch."""
    model = new_model(kind, scale_shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    records = []
    for queries, keys in batches:
        optimizer.zero_grad()
        loss = contrastive_loss(kind, *model(queries, keys))
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in parameters_by_name(model).items()}
        optimizer.step()
        records.append((loss.detach(), gradients, {name: p.detach().clone() for name, p in parameters_by_name(model).items()}))
    return records


def train_and_compare(name, rank, world, sizes, model, optimizer, kind, mode, batches, expected, backward=None):
    """STEPS steps of ``model`` (wrapped by an engine) on this rank's rows against ``expected``
    (:func:`reference_run`); ``backward``: the engine's backward (default ``loss.backward()``)."""
    backward = backward or (lambda loss: loss.backward())
    for step, ((queries, keys), (expected_loss, expected_gradients, expected_parameters)) in enumerate(zip(batches, expected)):
        where = f"{name}, {kind}, mode={mode}, step {step} (rank {rank}/{world}, local batches {sizes})"
        optimizer.zero_grad()
        loss = contrastive_loss(kind, *model(split(queries, sizes, rank), split(keys, sizes, rank)), mode=mode)
        backward(loss)
        torch.testing.assert_close(mean_over_ranks(loss), expected_loss, **TOLERANCE, msg=lambda m: f"{where} loss: {m}")
        parameters = parameters_by_name(model)
        assert parameters.keys() == expected_gradients.keys(), (where, sorted(parameters))
        for parameter_name, parameter in parameters.items():
            torch.testing.assert_close(full(parameter.grad), expected_gradients[parameter_name], **TOLERANCE,
                                       msg=lambda m: f"{where} gradient of {parameter_name}: {m}")
        optimizer.step()
        for parameter_name, parameter in parameters.items():
            torch.testing.assert_close(full(parameter.detach()), expected_parameters[parameter_name], **TOLERANCE,
                                       msg=lambda m: f"{where} {parameter_name} after the optimizer step: {m}")


def case_ddp(rank, world, sizes, batches, references):
    for kind in LOSSES:
        for mode in MODES:
            model = nn.parallel.DistributedDataParallel(new_model(kind))
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
            train_and_compare("DDP", rank, world, sizes, model, optimizer, kind, mode, batches, references[kind])


def shard_with_fsdp2(model, mesh):
    """FSDP2 (fully_shard): each Linear its own unit, the root holding the rest (the LayerNorm,
    the logit scale); every parameter becomes a DTensor shard."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())  # every parameter sharded
    return model


def case_fsdp2(rank, world, sizes, batches, mesh):
    """FSDP2 on the CPU with gloo; the logit scale has shape (1,) (fully_shard refuses 0-d
    parameters); gradients are DTensor shards, compared whole (full_tensor())."""
    references = {kind: reference_run(kind, batches, scale_shape=(1,)) for kind in LOSSES}
    for kind in LOSSES:
        for mode in MODES:
            model = shard_with_fsdp2(new_model(kind, scale_shape=(1,)), mesh)
            optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
            train_and_compare("FSDP2", rank, world, sizes, model, optimizer, kind, mode, batches, references[kind])


def case_accelerate(rank, world, sizes, batches, references):
    """An Accelerator in each rank, as the trainers build it on the CPU (fastcl/trainers/engine.py):
    it finds the process group already initialized and the torchrun variables, and prepares DDP.
    (Accelerate 1.16 on the CPU prepares DDP even when given an FSDP plugin: it switches to FSDP
    only for accelerator devices, so FSDP2 is tested directly, in case_fsdp2.)"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")  # OMP_NUM_THREADS set: Accelerate leaves the thread count alone
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU and accelerator.num_processes == world
    for kind in LOSSES:
        model = new_model(kind)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LEARNING_RATE))
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        train_and_compare("Accelerate", rank, world, sizes, model, optimizer, kind, "ring", batches, references[kind],
                          backward=accelerator.backward)


class CountExchanges:
    """Counts the ring's point-to-point exchanges (``dist.batch_isend_irecv`` calls: fastcl._ring
    sends each block and receives the next in one batch) while in the ``with`` block."""

    def __enter__(self):
        self.count, self.original = 0, dist.batch_isend_irecv

        def counting(operations):
            self.count += 1
            return self.original(operations)

        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self.original


# loss_fn, its single-process reference, and the name and value of its learnable scalar
GRAD_CACHE_LOSSES = {"info_nce": (fastcl.distributed.info_nce, fastcl.info_nce, "temperature", 0.3),
                     "clip": (fastcl.distributed.clip_loss, fastcl.clip_loss, "logit_scale", 8.0)}


def case_grad_cache_ring(rank, world, sizes, batches, mesh):
    """GradCache(DDP(tower) or FSDP2(tower), loss_fn=fastcl.distributed.<loss>, mode="ring"), as
    ``step()`` and as the deferred ``loss()`` + ``backward()`` the trainers use: single-process
    full-batch gradients (the learnable scalar outside the wrapped module), and the ring runs
    once per step: as many exchanges as one plain call's forward and backward (none in the chunk
    replays). (GradCache runs DDP's replays but the last under no_sync; FSDP2 reduce-scatters
    after every replayed chunk, which costs bandwidth but accumulates the same gradients.)"""
    queries, keys = batches[0]
    local_queries, local_keys = split(queries, sizes, rank), split(keys, sizes, rank)
    for kind, (loss_fn, reference_fn, scalar_name, scalar_value) in GRAD_CACHE_LOSSES.items():
        torch.manual_seed(6)
        reference = Tower().double()
        scalar_all = torch.tensor(scalar_value, dtype=torch.float64, requires_grad=True)
        expected = reference_fn(reference(queries), reference(keys), **{scalar_name: scalar_all}, backend="naive")
        expected.backward()

        with CountExchanges() as plain:
            representations = [torch.randn(sizes[rank], DIM, dtype=torch.float64, requires_grad=True) for _ in range(2)]
            loss_fn(*representations, **{scalar_name: scalar_value}, mode="ring").backward()
        assert plain.count >= world - 1, \
            f"{kind}: no ring exchange counted in a plain ring call ({plain.count}): does fastcl._ring still use batch_isend_irecv?"

        for engine, api in ((engine, api) for engine in ("DDP", "FSDP2") for api in ("step", "loss")):
            torch.manual_seed(6)
            if engine == "DDP":
                model = nn.parallel.DistributedDataParallel(Tower().double())
            else:
                model = shard_with_fsdp2(Tower().double(), mesh)
            scalar = torch.tensor(scalar_value, dtype=torch.float64, requires_grad=True)  # outside the wrapped module
            cache = fastcl.GradCache(model, chunk_size=CHUNK_SIZE, loss_fn=loss_fn, mode="ring", **{scalar_name: scalar})
            with CountExchanges() as counted:
                if api == "step":
                    loss = cache.step(local_queries, local_keys)
                else:
                    loss = cache.loss(local_queries, local_keys)
                    loss.backward()
            where = f"GradCache.{api} + {engine}, {kind}, ring (rank {rank}/{world}, local batches {sizes})"
            assert counted.count == plain.count, \
                f"{where}: {counted.count} ring exchanges in one step, one loss pass makes {plain.count}"
            torch.testing.assert_close(mean_over_ranks(loss), expected.detach(), **TOLERANCE, msg=lambda m: f"{where} loss: {m}")
            expected_gradients = {name: p.grad for name, p in reference.named_parameters()}
            parameters = parameters_by_name(model)
            assert parameters.keys() == expected_gradients.keys(), (where, sorted(parameters))
            for name, parameter in parameters.items():
                torch.testing.assert_close(full(parameter.grad), expected_gradients[name], **TOLERANCE,
                                           msg=lambda m: f"{where} gradient of {name}: {m}")
            torch.testing.assert_close(scalar.grad, scalar_all.grad, **TOLERANCE, msg=lambda m: f"{where} {scalar_name}: {m}")


def worker(rank, world, sizes, with_accelerate):
    batches = global_batches(sizes)
    references = {kind: reference_run(kind, batches) for kind in LOSSES}
    case_ddp(rank, world, sizes, batches, references)
    mesh = init_device_mesh("cpu", (world,))
    case_fsdp2(rank, world, sizes, batches, mesh)
    case_grad_cache_ring(rank, world, sizes, batches, mesh)
    if with_accelerate:
        case_accelerate(rank, world, sizes, batches, references)


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [[4, 6], [5, 4, 6], [6, 4, 5, 5]], ids=["2 ranks", "3 ranks", "4 ranks"])
def test_engines_match_single_process_on_concatenated_batch(sizes):
    with_accelerate = importlib.util.find_spec("accelerate") is not None  # the trainers extra, which `make test` installs
    spawn(worker, len(sizes), sizes, with_accelerate)
    if not with_accelerate:
        pytest.skip("DDP, FSDP2 and GradCache passed; the Accelerate case needs accelerate (pip install fastcl[trainers])")
