"""fastcl.distributed against the single-process run on the concatenated batch.

The spawned tests start 2 and 3 gloo processes (one spawn each runs every case, to keep the
process start-up cost down). Every rank builds the same global data from a fixed seed, keeps
its own rows (uneven sizes with 3 ranks), and checks, for each case:
- the mean over ranks of the returned losses equals the single-process loss;
- the gradient of its local rows divided by the world size (what DDP's averaging does to the
  parameters downstream) equals the single-process gradient of those rows;
- a learnable temperature / scale / bias gets the single-process gradient on every rank.
"""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch import nn

import fastcl

from .spawn import free_port, mean_over_ranks, spawn, split

DIM = 6
TOLERANCE = dict(atol=1e-9, rtol=1e-7)  # float64 data: only summation order differs


def leaf(tensor):
    return tensor.detach().clone().requires_grad_()


def check_case(name, rank, world, local_loss, expected_loss, pairs, tolerance=TOLERANCE):
    """pairs: (local leaf, expected single-process gradient of those rows, scale). Lower-precision
    results are compared in the reference's dtype, within ``tolerance``."""
    torch.testing.assert_close(mean_over_ranks(local_loss).to(expected_loss.dtype), expected_loss.detach(),
                               **tolerance, msg=lambda m: f"{name} (rank {rank}/{world}) loss: {m}")
    for index, (tensor, expected, scale) in enumerate(pairs):
        torch.testing.assert_close(tensor.grad.to(expected.dtype) / scale, expected, **tolerance,
                                   msg=lambda m: f"{name} (rank {rank}/{world}) gradient {index}: {m}")


def check_clip(name, rank, world, sizes, images, texts, **options):
    """fastcl.distributed.clip_loss with a learnable scale against fastcl.clip_loss on the concatenated batch."""
    scale_all = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    i_all, t_all = leaf(images), leaf(texts)
    expected = fastcl.clip_loss(i_all, t_all, scale_all, backend="naive")
    expected.backward()
    scale = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    i, t = leaf(split(images, sizes, rank)), leaf(split(texts, sizes, rank))
    loss = fastcl.distributed.clip_loss(i, t, scale, **options)
    loss.backward()
    check_case(name, rank, world, loss, expected,
               [(i, split(i_all.grad, sizes, rank), world), (t, split(t_all.grad, sizes, rank), world),
                (scale, scale_all.grad, 1)])


def check_siglip(name, rank, world, sizes, images, texts, **options):
    """fastcl.distributed.siglip_loss with a learnable scale and bias against fastcl.siglip_loss on the concatenated batch."""
    scale_all = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias_all = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    i_all, t_all = leaf(images), leaf(texts)
    expected = fastcl.siglip_loss(i_all, t_all, scale_all, bias_all, backend="naive")
    expected.backward()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    i, t = leaf(split(images, sizes, rank)), leaf(split(texts, sizes, rank))
    loss = fastcl.distributed.siglip_loss(i, t, scale, bias, **options)
    loss.backward()
    check_case(name, rank, world, loss, expected,
               [(i, split(i_all.grad, sizes, rank), world), (t, split(t_all.grad, sizes, rank), world),
                (scale, scale_all.grad, 1), (bias, bias_all.grad, 1)])


def check_hard_negatives(name, rank, world, sizes, queries, keys, hard_negatives, **options):
    """Hard negatives, a learnable temperature and cosine similarity against the single-process loss."""
    temperature_all = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    q_all, k_all, h_all = leaf(queries), leaf(keys), leaf(hard_negatives)
    expected = fastcl.info_nce(q_all, k_all, hard_negatives=h_all, temperature=temperature_all, normalize=True,
                               backend="naive")
    expected.backward()
    temperature = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    q, k, h = leaf(split(queries, sizes, rank)), leaf(split(keys, sizes, rank)), leaf(split(hard_negatives, sizes, rank))
    loss = fastcl.distributed.info_nce(q, k, hard_negatives=h, temperature=temperature, normalize=True, **options)
    loss.backward()
    check_case(name, rank, world, loss, expected,
               [(q, split(q_all.grad, sizes, rank), world), (k, split(k_all.grad, sizes, rank), world),
                (h, split(h_all.grad, sizes, rank), world), (temperature, temperature_all.grad, 1)])


def case_plain_and_hard_negatives(rank, world, sizes):
    generator = torch.Generator().manual_seed(1)
    total, hard = sum(sizes), 2
    queries = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    keys = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    hard_negatives = torch.randn(total, hard, DIM, generator=generator, dtype=torch.float64)

    # plain: default positives (local arange = global diagonal)
    q_all, k_all = leaf(queries), leaf(keys)
    expected = fastcl.info_nce(q_all, k_all, temperature=0.3, backend="naive")
    expected.backward()
    q, k = leaf(split(queries, sizes, rank)), leaf(split(keys, sizes, rank))
    loss = fastcl.distributed.info_nce(q, k, temperature=0.3)
    loss.backward()
    check_case("plain", rank, world, loss, expected,
               [(q, split(q_all.grad, sizes, rank), world), (k, split(k_all.grad, sizes, rank), world)])

    # hard negatives + learnable temperature + cosine similarity
    check_hard_negatives("hard negatives", rank, world, sizes, queries, keys, hard_negatives)


def case_symmetric_with_extra_keys(rank, world, sizes):
    """CLIP-style symmetric loss where every rank also holds extra keys (DPR: positives, then
    negatives); the single-process batch puts all positives first, then all extras."""
    generator = torch.Generator().manual_seed(2)
    total = sum(sizes)
    queries = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    positives = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    extras = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (total,), generator=generator)
    extra_labels = torch.randint(0, 4, (total,), generator=generator)

    q_all, p_all, e_all = leaf(queries), leaf(positives), leaf(extras)
    expected = fastcl.info_nce(q_all, torch.cat([p_all, e_all]), temperature=0.5, symmetric=True,
                               labels=labels, key_labels=torch.cat([labels, extra_labels]), backend="naive")
    expected.backward()
    q, p, e = (leaf(split(t, sizes, rank)) for t in (queries, positives, extras))
    local_labels = split(labels, sizes, rank)
    loss = fastcl.distributed.info_nce(q, torch.cat([p, e]), temperature=0.5, symmetric=True, labels=local_labels,
                                       key_labels=torch.cat([local_labels, split(extra_labels, sizes, rank)]))
    loss.backward()
    check_case("symmetric + extra keys + label mask", rank, world, loss, expected,
               [(t, split(ref.grad, sizes, rank), world) for t, ref in ((q, q_all), (p, p_all), (e, e_all))])

    # supcon: the "mean" divides by a global count of anchors that have a positive
    q_all, p_all = leaf(queries), leaf(positives)
    expected = fastcl.info_nce(q_all, p_all, temperature=0.5, labels=labels, key_labels=labels,
                               multi_positive="supcon", backend="naive")
    expected.backward()
    q, p = leaf(split(queries, sizes, rank)), leaf(split(positives, sizes, rank))
    loss = fastcl.distributed.info_nce(q, p, temperature=0.5, labels=local_labels, key_labels=local_labels,
                                       multi_positive="supcon")
    loss.backward()
    check_case("supcon", rank, world, loss, expected,
               [(q, split(q_all.grad, sizes, rank), world), (p, split(p_all.grad, sizes, rank), world)])


def case_clip_and_siglip(rank, world, sizes):
    generator = torch.Generator().manual_seed(3)
    total = sum(sizes)
    images = torch.nn.functional.normalize(torch.randn(total, DIM, generator=generator, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(total, DIM, generator=generator, dtype=torch.float64), dim=-1)

    check_clip("clip", rank, world, sizes, images, texts)

    check_siglip("siglip", rank, world, sizes, images, texts)
    # backend="naive": the materialized logits (the baseline a trainer's --loss naive runs)
    check_siglip("siglip naive", rank, world, sizes, images, texts, backend="naive")


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, DIM))

    def forward(self, x):
        return self.net(x)


def case_grad_cache_with_ddp(rank, world, local_rows):
    """GradCache(DDP(encoder), loss_fn=fastcl.distributed.info_nce): the DDP-averaged gradients
    equal single-process plain backward on the concatenated batch."""
    generator = torch.Generator().manual_seed(4)
    total = local_rows * world
    queries = torch.randn(total, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(total, 5, generator=generator, dtype=torch.float64)
    torch.manual_seed(5)
    reference = Encoder().double()
    temperature_all = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    expected_loss = fastcl.info_nce(reference(queries), reference(keys), temperature=temperature_all, backend="naive")
    expected_loss.backward()

    torch.manual_seed(5)
    model = nn.parallel.DistributedDataParallel(Encoder().double(), bucket_cap_mb=25)
    all_reduces = []

    def counting_allreduce(state, bucket):
        all_reduces.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(None, counting_allreduce)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # outside the DDP module
    cache = fastcl.GradCache(model, chunk_size=3, loss_fn=fastcl.distributed.info_nce, temperature=temperature)
    sizes = [local_rows] * world
    loss = cache.step(split(queries, sizes, rank), split(keys, sizes, rank))
    torch.testing.assert_close(mean_over_ranks(loss), expected_loss.detach(), **TOLERANCE)
    for (name, p), p_ref in zip(model.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOLERANCE, msg=lambda m: f"GradCache+DDP {name} (rank {rank}): {m}")
    torch.testing.assert_close(temperature.grad, temperature_all.grad, **TOLERANCE)
    # 2 inputs x 2 chunks replayed, one bucket: no_sync leaves a single all-reduce per step
    assert all_reduces == [0], all_reduces


def ring_bytes(call, tensor, world):
    """Bytes one rank sends for a collective in the ring algorithms NCCL and gloo use: an
    all-reduce is a reduce-scatter followed by an all-gather, twice a reduce-scatter's bytes."""
    share = (world - 1) / world * tensor.numel() * tensor.element_size()
    return 2 * share if call == "all_reduce" else share


def case_gather_backward_moves_half_the_bytes(rank, world, sizes):
    """The backward of the gathered keys is one reduce-scatter of the gathered gradient: half the
    bytes of an all-reduce of it (padding aside), and the same gradients."""
    generator = torch.Generator().manual_seed(6)
    keys = torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64)
    weights = torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64)
    local = leaf(split(keys, sizes, rank))
    gathered = fastcl.distributed.all_gather_rows(local)
    calls = []
    names = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter")
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counting(name):
        def call(*args, **kwargs):
            tensor = args[0] if name == "all_reduce" else args[1]
            calls.append((name, ring_bytes(name, tensor, world)))
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in originals:
            setattr(dist, name, counting(name))
        (gathered * weights).sum().backward()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    # every rank's loss uses every row: its rows' gradient is the sum over ranks, world * weights
    torch.testing.assert_close(local.grad, world * split(weights, sizes, rank), **TOLERANCE)
    expected_call = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    assert [name for name, _ in calls] == [expected_call], calls
    all_reduce_bytes = ring_bytes("all_reduce", gathered, world)  # what the backward moved before
    padding = world * max(sizes) / sum(sizes)
    assert calls[0][1] == pytest.approx(0.5 * all_reduce_bytes * padding), (calls, all_reduce_bytes)


def case_bench_plain_clip_is_the_same_loss(rank, world, sizes):
    """The distributed bench suite's baseline (open_clip's local loss on gathered features)
    computes what fastcl.distributed.clip_loss computes (equal local batches)."""
    from fastcl.bench.suites.distributed import _clip_plain

    generator = torch.Generator().manual_seed(7)
    images = torch.nn.functional.normalize(torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(sum(sizes), DIM, generator=generator, dtype=torch.float64), dim=-1)
    scale = torch.tensor(8.0, dtype=torch.float64)
    i, t = leaf(split(images, sizes, rank)), leaf(split(texts, sizes, rank))
    plain = _clip_plain(i, t, scale)
    plain.backward()
    i2, t2 = leaf(split(images, sizes, rank)), leaf(split(texts, sizes, rank))
    fused = fastcl.distributed.clip_loss(i2, t2, scale)
    fused.backward()
    torch.testing.assert_close(plain, fused, **TOLERANCE)
    torch.testing.assert_close(i.grad, i2.grad, **TOLERANCE)
    torch.testing.assert_close(t.grad, t2.grad, **TOLERANCE)


def case_ring_mode(rank, world, sizes):
    """mode="ring" (key blocks passed around the ranks) equals the single-process loss too."""
    generator = torch.Generator().manual_seed(8)
    total = sum(sizes)
    queries = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    keys = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    extras = torch.randn(total, DIM, generator=generator, dtype=torch.float64)

    # cosine similarity, learnable temperature, "mean"
    temperature_all = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    q_all, k_all = leaf(queries), leaf(keys)
    expected = fastcl.info_nce(q_all, k_all, temperature=temperature_all, normalize=True, backend="naive")
    expected.backward()
    temperature = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    q, k = leaf(split(queries, sizes, rank)), leaf(split(keys, sizes, rank))
    loss = fastcl.distributed.info_nce(q, k, temperature=temperature, normalize=True, mode="ring")
    loss.backward()
    check_case("ring", rank, world, loss, expected,
               [(q, split(q_all.grad, sizes, rank), world), (k, split(k_all.grad, sizes, rank), world),
                (temperature, temperature_all.grad, 1)])

    # hard negatives, private to each query, stay on their rank
    hard_negatives = torch.randn(total, 2, DIM, generator=generator, dtype=torch.float64)
    check_hard_negatives("ring, hard negatives", rank, world, sizes, queries, keys, hard_negatives, mode="ring")

    # extra keys on every rank and shuffled positives, "sum": the single-process keys are each
    # rank's [positives, extras] block in rank order
    local_positive = torch.randperm(2 * sizes[rank], generator=torch.Generator().manual_seed(rank))[:sizes[rank]]
    blocks = [torch.cat([split(keys, sizes, r), split(extras, sizes, r)]) for r in range(world)]
    offsets = [sum(2 * n for n in sizes[:r]) for r in range(world)]
    all_positive = torch.cat([torch.randperm(2 * sizes[r], generator=torch.Generator().manual_seed(r))[:sizes[r]] + offsets[r]
                              for r in range(world)])
    q_all, k_all = leaf(queries), leaf(torch.cat(blocks))
    expected = fastcl.info_nce(q_all, k_all, positive=all_positive, temperature=0.5, reduction="sum", backend="naive")
    expected.backward()
    q, k = leaf(split(queries, sizes, rank)), leaf(blocks[rank])
    loss = fastcl.distributed.info_nce(q, k, positive=local_positive, temperature=0.5, reduction="sum", mode="ring")
    loss.backward()
    check_case("ring, extra keys, sum", rank, world, loss, expected,
               [(q, split(q_all.grad, sizes, rank), world), (k, k_all.grad[offsets[rank]:offsets[rank] + 2 * sizes[rank]], world)])

    check_clip("ring clip", rank, world, sizes, queries, keys, mode="ring")  # both directions on the same tiles
    check_siglip("ring siglip", rank, world, sizes, queries, keys, mode="ring")  # the text blocks by ring
    case_ring_symmetric_and_exclude_self(rank, world, sizes, queries, keys, extras)
    case_ring_labels_margin_smoothing(rank, world, sizes, queries, keys, extras)
    case_ring_fused_tiles(rank, world, sizes)


def case_ring_labels_margin_smoothing(rank, world, sizes, queries, keys, extras):
    """Ring mode with the "mask" options: labels (the keys' labels travel with their block),
    a false-negative margin (in-batch and hard negatives) and label smoothing, one direction with
    extra keys and hard negatives, and symmetric (CLIP-style) with all three; both against the
    single-process loss, with a learnable temperature."""
    generator = torch.Generator().manual_seed(10)
    total = sum(sizes)
    labels = torch.randint(0, 3, (total,), generator=generator)
    extra_labels = torch.randint(0, 3, (total,), generator=generator)
    hard_negatives = torch.randn(total, 2, DIM, generator=generator, dtype=torch.float64)
    cases = [
        ("ring labels + margin + smoothing + hard negatives", dict(
            hard_negatives=True, labels=True, false_negative_margin=0.1, label_smoothing=0.1)),
        ("ring symmetric labels + margin + smoothing", dict(
            symmetric=True, labels=True, false_negative_margin=0.2, label_smoothing=0.2)),
        ("ring margin only", dict(false_negative_margin=0.0)),
    ]
    for name, case in cases:
        temperature_all = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        q_all, p_all, e_all, h_all = leaf(queries), leaf(keys), leaf(extras), leaf(hard_negatives)
        options = dict(temperature=temperature_all, normalize=True, symmetric=case.get("symmetric", False),
                       false_negative_margin=case.get("false_negative_margin"),
                       label_smoothing=case.get("label_smoothing", 0.0))
        single = dict(options)
        if case.get("labels"):
            single.update(labels=labels, key_labels=torch.cat([labels, extra_labels]))
        if case.get("hard_negatives"):
            single.update(hard_negatives=h_all)
        expected = fastcl.info_nce(q_all, torch.cat([p_all, e_all]), backend="naive", **single)
        expected.backward()
        temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        q, p, e, h = (leaf(split(t, sizes, rank)) for t in (queries, keys, extras, hard_negatives))
        local = dict(options, temperature=temperature)
        if case.get("labels"):
            local_labels = split(labels, sizes, rank)
            local.update(labels=local_labels, key_labels=torch.cat([local_labels, split(extra_labels, sizes, rank)]))
        if case.get("hard_negatives"):
            local.update(hard_negatives=h)
        loss = fastcl.distributed.info_nce(q, torch.cat([p, e]), mode="ring", **local)
        loss.backward()
        pairs = [(t, split(ref.grad, sizes, rank), world) for t, ref in ((q, q_all), (p, p_all), (e, e_all))]
        if case.get("hard_negatives"):
            pairs.append((h, split(h_all.grad, sizes, rank), world))
        check_case(name, rank, world, loss, expected, pairs + [(temperature, temperature_all.grad, 1)])


def case_ring_fused_tiles(rank, world, sizes):
    """Ring mode on the fused Triton tile kernels (what runs for float32 / bf16 rows on a GPU;
    here the Triton interpreter, FASTCL_RING_TILES=triton): CLIP with a learnable scale, NT-Xent
    (exclude_self) and hard negatives with extra keys, float32 against the float64 reference;
    CLIP on bf16 features, which stay bf16."""
    import fastcl._ring as ring_module
    from fastcl.ops.info_nce import ring_triton

    generator = torch.Generator().manual_seed(11)
    total = sum(sizes)
    queries = torch.nn.functional.normalize(torch.randn(total, DIM, generator=generator, dtype=torch.float64), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(total, DIM, generator=generator, dtype=torch.float64), dim=-1)
    extras = torch.randn(total, DIM, generator=generator, dtype=torch.float64)
    hard_negatives = torch.randn(total, 2, DIM, generator=generator, dtype=torch.float64)
    tolerance = dict(atol=2e-5, rtol=2e-5)
    tiles = []
    original_forward = ring_triton.tile_forward

    def counting_forward(*args, **kwargs):
        tiles.append(1)
        return original_forward(*args, **kwargs)

    def check(name, loss, expected, pairs):
        check_case(name, rank, world, loss, expected, pairs, tolerance)

    ring_module._RING_TILES, ring_triton.tile_forward = "triton", counting_forward
    try:
        scale_all = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
        i_all, t_all = leaf(queries), leaf(keys)
        expected = fastcl.clip_loss(i_all, t_all, scale_all, backend="naive")
        expected.backward()
        scale = torch.tensor(8.0, requires_grad=True)
        i, t = leaf(split(queries, sizes, rank).float()), leaf(split(keys, sizes, rank).float())
        loss = fastcl.distributed.clip_loss(i, t, scale, mode="ring")
        loss.backward()
        check("fused ring clip", loss, expected, [(i, split(i_all.grad, sizes, rank), world),
                                                  (t, split(t_all.grad, sizes, rank), world),
                                                  (scale, scale_all.grad, 1)])

        views = [torch.cat([split(queries, sizes, r), split(keys, sizes, r)]) for r in range(world)]
        partner = lambda n: torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        offsets = [sum(2 * n for n in sizes[:r]) for r in range(world)]
        z_all = leaf(torch.cat(views))
        expected = fastcl.info_nce(z_all, z_all, positive=torch.cat([partner(n) + o for n, o in zip(sizes, offsets)]),
                                   exclude_self=True, temperature=0.3, backend="naive")
        expected.backward()
        z = leaf(views[rank].float())
        loss = fastcl.distributed.info_nce(z, z, positive=partner(sizes[rank]), exclude_self=True, temperature=0.3,
                                           mode="ring")
        loss.backward()
        check("fused ring nt-xent", loss, expected, [(z, z_all.grad[offsets[rank]:offsets[rank] + 2 * sizes[rank]], world)])

        q_all, p_all, e_all, h_all = leaf(queries), leaf(keys), leaf(extras), leaf(hard_negatives)
        expected = fastcl.info_nce(q_all, torch.cat([p_all, e_all]), hard_negatives=h_all, temperature=0.5,
                                   backend="naive")
        expected.backward()
        q, p, e, h = (leaf(split(x, sizes, rank).float()) for x in (queries, keys, extras, hard_negatives))
        loss = fastcl.distributed.info_nce(q, torch.cat([p, e]), hard_negatives=h, temperature=0.5, mode="ring")
        loss.backward()
        check("fused ring hard negatives", loss, expected,
              [(x, split(ref.grad, sizes, rank), world) for x, ref in ((q, q_all), (p, p_all), (e, e_all), (h, h_all))])

        # bf16 features (CLIP's under autocast) stay bf16: blocks travel in bf16, products in bf16 with
        # fp32 accumulation, the loss in fp32, each gradient in its input's dtype
        sent = []
        original_exchange = ring_module._start_exchange

        def recording_exchange(tensors, *args, **kwargs):
            sent.extend(tensor.dtype for tensor in tensors)
            return original_exchange(tensors, *args, **kwargs)

        ring_module._start_exchange = recording_exchange
        try:
            i_bf16, t_bf16 = (split(x, sizes, rank).to(torch.bfloat16) for x in (queries, keys))
            i_all, t_all = (leaf(x.to(torch.bfloat16).double()) for x in (queries, keys))
            scale_all = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
            expected = fastcl.clip_loss(i_all, t_all, scale_all, backend="naive")
            expected.backward()
            i, t = leaf(i_bf16), leaf(t_bf16)
            scale = torch.tensor(8.0, requires_grad=True)
            loss = fastcl.distributed.clip_loss(i, t, scale, mode="ring")
            loss.backward()
        finally:
            ring_module._start_exchange = original_exchange
        assert loss.dtype == torch.float32 and i.grad.dtype == t.grad.dtype == torch.bfloat16
        # blocks in bf16, their gradients (and the columns' statistics) in fp32
        assert set(sent) == ({torch.bfloat16, torch.float32} if world > 1 else set()), sent
        torch.testing.assert_close(mean_over_ranks(loss).double(), expected.detach(), atol=1e-5, rtol=1e-5)
        for tensor, reference in ((i, i_all), (t, t_all)):
            torch.testing.assert_close(tensor.grad.double() / world, split(reference.grad, sizes, rank), atol=3e-3, rtol=2e-2)
        torch.testing.assert_close(scale.grad.double(), scale_all.grad, atol=1e-4, rtol=1e-4)
    finally:
        ring_module._RING_TILES, ring_triton.tile_forward = None, original_forward
    assert len(tiles) == 4 * world, tiles  # every block of the four calls went through the kernels


def case_ring_symmetric_and_exclude_self(rank, world, sizes, queries, keys, extras):
    """The symmetric ring with extra keys on every rank (row-direction negatives only) and
    reduction="none" under a non-uniform upstream gradient; and NT-Xent's exclude_self, each
    view's candidates every rank's views but itself."""
    generator = torch.Generator().manual_seed(9)
    weights = torch.rand(sum(sizes), generator=generator, dtype=torch.float64)
    temperature_all = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    q_all, p_all, e_all = leaf(queries), leaf(keys), leaf(extras)
    expected = fastcl.info_nce(q_all, torch.cat([p_all, e_all]), temperature=temperature_all, symmetric=True,
                               reduction="none", backend="naive")
    (expected * weights).sum().backward()
    temperature = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    q, p, e = (leaf(split(t, sizes, rank)) for t in (queries, keys, extras))
    loss = fastcl.distributed.info_nce(q, torch.cat([p, e]), temperature=temperature, symmetric=True,
                                       reduction="none", mode="ring")
    torch.testing.assert_close(loss, split(expected, sizes, rank).detach(), **TOLERANCE)
    (loss * split(weights, sizes, rank)).sum().backward()
    for tensor, reference in ((q, q_all), (p, p_all), (e, e_all)):  # "none": the local rows' own gradients
        torch.testing.assert_close(tensor.grad, split(reference.grad, sizes, rank), **TOLERANCE)
    # the temperature's gradient is averaged over the ranks, as DDP averages the parameters'
    torch.testing.assert_close(temperature.grad * world, temperature_all.grad, **TOLERANCE)

    # NT-Xent: z_r = [view a; view b] of rank r's items, positive the other view
    views = [torch.cat([split(queries, sizes, r), split(keys, sizes, r)]) for r in range(world)]
    partner = lambda n: torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    offsets = [sum(2 * n for n in sizes[:r]) for r in range(world)]
    z_all = leaf(torch.cat(views))
    expected = fastcl.info_nce(z_all, z_all, positive=torch.cat([partner(n) + o for n, o in zip(sizes, offsets)]),
                               exclude_self=True, temperature=0.3, normalize=True, backend="naive")
    expected.backward()
    for mode in ("ring", "gather"):
        z = leaf(views[rank])
        loss = fastcl.distributed.info_nce(z, z, positive=partner(sizes[rank]), exclude_self=True, temperature=0.3,
                                           normalize=True, mode=mode)
        loss.backward()
        check_case(f"{mode} nt-xent exclude_self", rank, world, loss, expected,
                   [(z, z_all.grad[offsets[rank]:offsets[rank] + 2 * sizes[rank]], world)])


def worker(rank, world, sizes):
    case_plain_and_hard_negatives(rank, world, sizes)
    case_symmetric_with_extra_keys(rank, world, sizes)
    case_clip_and_siglip(rank, world, sizes)
    case_grad_cache_with_ddp(rank, world, local_rows=5)
    case_gather_backward_moves_half_the_bytes(rank, world, sizes)
    case_ring_mode(rank, world, sizes)
    if len(set(sizes)) == 1:
        case_bench_plain_clip_is_the_same_loss(rank, world, sizes)


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [[5, 5], [3, 6, 4], [2, 4, 3, 5]], ids=["2 ranks", "3 ranks uneven", "4 ranks uneven"])
def test_matches_single_process_on_concatenated_batch(sizes):
    spawn(worker, len(sizes), sizes)


@pytest.mark.distributed
def test_bench_suite_measures_every_rank():
    from fastcl.bench.suites.distributed import measure

    result = measure("gather", 2, batch=16, dim=8, repeats=1)
    assert result["time_ms"] > 0 and result["first_ms"] > 0 and result["peak_mb"] >= 0
    # a step allocates at least the two gathered (32, 8) fp32 inputs' gradients it returns
    assert result["tensor_mb"] * 2**20 >= 2 * 16 * 8 * 4


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcl.distributed.info_nce(torch.randn(3, 4), torch.randn(3, 4))


@pytest.fixture
def single_rank_group():
    """A one-process gloo group in this process, for argument checks (no spawn needed)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bad_arguments_raise_clear_errors(single_rank_group):
    query, key = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"positive indexes this rank's keys.*\[0, 6\)"):
        fastcl.distributed.info_nce(query, key, positive=torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="positive must be None when symmetric=True"):
        fastcl.distributed.info_nce(query, key, positive=torch.tensor([0, 1, 2, 3]), symmetric=True)
    with pytest.raises(ValueError, match="needs at least B_r keys"):
        fastcl.distributed.info_nce(key, query, symmetric=True)
    with pytest.raises(ValueError, match="same shape"):
        fastcl.distributed.clip_loss(query, key, 10.0)
    with pytest.raises(TypeError, match="logit_bias"):
        fastcl.distributed.siglip_loss(query, query, 10.0, "bias")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.distributed.siglip_loss(query, query, 10.0, -10.0, backend="fused")
    with pytest.raises(ValueError, match="mode must be one of"):
        fastcl.distributed.info_nce(query, key, mode="all")
    with pytest.raises(ValueError, match="mode must be one of"):
        fastcl.distributed.siglip_loss(query, query, 10.0, -10.0, mode="all")
    labels = torch.zeros(query.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="hard_negatives must have shape"):  # ring mode checks as fastcl.info_nce does
        fastcl.distributed.info_nce(query, key, hard_negatives=torch.randn(query.shape[0], 2, query.shape[1] + 1),
                                    mode="ring")
    with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
        fastcl.distributed.info_nce(query, key, temperature=0.0, mode="ring")
    with pytest.raises(ValueError, match="multi_positive='supcon' needs mode='gather'"):
        fastcl.distributed.info_nce(query, query, labels=labels, key_labels=labels, multi_positive="supcon",
                                    mode="ring")


def test_auto_mode_takes_the_ring_past_its_memory_share(monkeypatch):
    from fastcl import distributed

    cpu = torch.device("cpu")
    memory = distributed._device_memory(cpu)
    rows_at_share = int(distributed.RING_MEMORY_SHARE * memory / (2 * 256 * 4))
    assert distributed.choose_mode("auto", rows_at_share // 2, 256, 4, cpu) == "gather"
    assert distributed.choose_mode("auto", rows_at_share * 2, 256, 4, cpu) == "ring"
    assert distributed.choose_mode("auto", rows_at_share * 2, 256, 4, cpu, ring_covers=False) == "gather"
    assert distributed.choose_mode("gather", rows_at_share * 2, 256, 4, cpu) == "gather"
    assert distributed.choose_mode("ring", 8, 256, 4, cpu) == "ring"
    monkeypatch.setattr(distributed, "_MODE_OVERRIDE", "ring")  # FASTCL_DISTRIBUTED_MODE=ring
    assert distributed.choose_mode("auto", 8, 256, 4, cpu) == "ring"
    assert distributed.choose_mode("auto", 8, 256, 4, cpu, ring_covers=False) == "gather"
    monkeypatch.setattr(distributed, "_MODE_OVERRIDE", "rings")
    with pytest.raises(ValueError, match="FASTCL_DISTRIBUTED_MODE must be"):
        distributed.choose_mode("auto", 8, 256, 4, cpu)


RANK_DIES_MID_RING = """
import datetime, os, sys, time, torch, torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=20))
import fastcl, fastcl._ring
if rank == 1:  # dies when its first block is to go around the ring
    fastcl._ring._start_exchange = lambda *args, **kwargs: os._exit(3)
query, key = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
start = time.time()
try:
    fastcl.distributed.info_nce(query, key, mode="ring").backward()
except RuntimeError as error:
    print(f"raised after {time.time() - start:.1f} s: {error}")
    sys.exit(1)
"""


@pytest.mark.distributed
def test_a_rank_dying_mid_ring_gives_the_others_an_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ring.py"
    script.write_text(RANK_DIES_MID_RING)
    port = str(free_port())
    survivor = subprocess.Popen([sys.executable, str(script), "0", port], stdout=subprocess.PIPE, text=True)
    dying = subprocess.run([sys.executable, str(script), "1", port], timeout=120)
    output, _ = survivor.communicate(timeout=120)  # a hang fails here
    assert dying.returncode == 3
    assert survivor.returncode == 1 and "raised after" in output, output
