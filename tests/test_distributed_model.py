"""fastcl.bench.distributed_model: its closed-form byte counts equal what the real
fastcl.distributed functions send on gloo processes, and its time / memory model behaves as its
docstring says.

The byte check starts 2 and then 3 gloo processes once each (every (loss, mode, dtype) case runs
in the same start) and compares, on every rank and for every op kind, the calls and the bytes
sent and received with :func:`model_bytes`.
"""
import pytest
import torch
import torch.distributed as dist

from fastcl.bench import distributed_model as model
from fastcl.bench.distributed_model import H100, Hardware, make_case, model_bytes, model_memory, model_time

BATCH, DIM = 4, 8
# info_nce with DPR-style extra keys (N = 2B), so a formula mixing up B and N fails; bf16 for the
# gather / ring difference in element size (gather sends the inputs' dtype, the ring fp32)
SPECS = [(loss, mode, "float32") for loss in model.LOSSES for mode in model.MODES]
SPECS += [("info_nce", mode, "bfloat16") for mode in model.MODES]


def spec_case(loss, mode, dtype):
    return make_case(loss, mode, BATCH, DIM, keys=2 * BATCH if loss == "info_nce" else None, dtype=dtype)


@pytest.fixture(scope="module")
def measured():
    """{world: {(loss, mode, dtype): per-rank counts}}, one process start per world size."""
    results = {}
    for world in (2, 3):
        counts = model.count_bytes_cases([spec_case(*spec) for spec in SPECS], world)
        results[world] = dict(zip(SPECS, counts))
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss, mode, dtype", SPECS, ids=[f"{loss}-{mode}-{dtype}" for loss, mode, dtype in SPECS])
def test_closed_form_bytes_equal_the_real_codes(measured, world, loss, mode, dtype):
    case = spec_case(loss, mode, dtype)
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    expected = model_bytes(loss, mode, world, BATCH, DIM, element, keys=case["keys"])
    for rank, counts in enumerate(measured[world][(loss, mode, dtype)]):
        assert set(counts) == set(expected), (rank, counts, expected)
        for kind, entry in expected.items():
            got = counts[kind]
            assert got["calls"] == entry["calls"], (rank, kind, got, entry)
            assert got["sent"] == pytest.approx(entry["sent"]), (rank, kind, got, entry)
            assert got["received"] == pytest.approx(entry["received"]), (rank, kind, got, entry)


def test_counter_puts_the_original_functions_back():
    originals = {name: getattr(dist, name) for name in ("all_gather", "reduce_scatter_tensor", "all_reduce",
                                                          "batch_isend_irecv")}
    with model.ByteCounter():
        assert dist.all_reduce is not originals["all_reduce"]
        assert dist.batch_isend_irecv is not originals["batch_isend_irecv"]
    for name, original in originals.items():
        assert getattr(dist, name) is original


def test_gather_bytes_grow_with_world_and_ring_bytes_per_hop_do_not():
    for loss in model.LOSSES:
        gather = [model_bytes(loss, "gather", w, 1024, 512, 2)["all_gather"]["sent"] for w in (2, 4, 8)]
        assert gather[1] == pytest.approx(3 * gather[0], rel=1e-3) and gather[2] == pytest.approx(7 * gather[0], rel=1e-3)
        ring = [model_bytes(loss, "ring", w, 1024, 512, 2)["p2p"] for w in (2, 4, 8)]
        per_call = [entry["sent"] / entry["calls"] for entry in ring]
        assert max(per_call) / min(per_call) < 1.3  # one block (and its gradient) per hop, whatever R
    assert "p2p" not in model_bytes("clip", "ring", 1, 1024, 512, 2)


def test_ring_moves_fp32_where_gather_moves_bf16():
    gather = model_bytes("info_nce", "gather", 2, 64, 32, 2)
    ring = model_bytes("info_nce", "ring", 2, 64, 32, 2)
    fused = model_bytes("info_nce", "ring", 2, 64, 32, 2, ring_kernel="fused")
    assert gather["all_gather"]["sent"] == 24 + 64 * 32 * 2
    assert ring["p2p"]["sent"] == (3 * 2 - 2) * 64 * 32 * 4
    assert fused["p2p"]["sent"] == 2 * 64 * 32 * 2 + 2 * 64 * 32 * 4  # bf16 blocks, fp32 gradients


def test_ring_hides_its_hops_behind_large_tiles_and_not_behind_small_ones():
    big = model_time("clip", "ring", 8, 16384, 1024, ring_kernel="fused")
    assert big.exposed_communication < 0.02 * big.total
    small = model_time("clip", "ring", 64, 1024, 512, ring_kernel="fused")  # across nodes: hop-bound
    assert small.exposed_communication > small.compute


def test_fused_symmetric_ring_does_two_thirds_of_gathers_work():
    ring = model_time("clip", "ring", 4, 32768, 1024, ring_kernel="fused")
    gather = model_time("clip", "gather", 4, 32768, 1024)
    assert ring.compute / gather.compute == pytest.approx(4 / 6)
    one_direction = model_time("info_nce", "ring", 4, 32768, 1024, ring_kernel="fused")
    assert one_direction.compute / model_time("info_nce", "gather", 4, 32768, 1024).compute == pytest.approx(4 / 3)


def test_gather_is_compute_plus_communication():
    result = model_time("info_nce", "gather", 16, 4096, 512)
    assert result.total == pytest.approx(result.compute + result.communication)
    assert result.exposed_communication == result.communication


def test_memory_gather_linear_in_world_ring_constant():
    for loss in model.LOSSES:
        gather = [model_memory(loss, "gather", w, 4096, 512) for w in (8, 16, 24)]
        ring = [model_memory(loss, "ring", w, 4096, 512) for w in (8, 1024)]
        assert gather[2] - gather[1] == gather[1] - gather[0] > 0  # linear in the world size
        assert ring[0] == ring[1]
    assert model_memory("clip", "gather", 4, 1024, 512) == 5 * 4 * 1024 * 512 * 2


def test_hardware_links():
    assert H100.bus_bandwidth(8) == H100.nvlink_bandwidth
    assert H100.bus_bandwidth(16) == min(H100.nvlink_bandwidth, 8 * H100.network_bandwidth)
    assert H100.ring_link(8) == (H100.nvlink_bandwidth, H100.p2p_latency_nvlink)
    assert H100.ring_link(9) == (H100.network_bandwidth, H100.p2p_latency_network)
    assert Hardware(allow_tf32=False).matmul_rate(4) == pytest.approx(67e12 * 0.6)
    assert H100.collective_latency(1) == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="loss"):
        model_time("triplet", "ring", 2, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        model_bytes("clip", "auto", 2, 4, 4, 2)
    with pytest.raises(ValueError, match="keys must equal batch"):
        make_case("siglip", "ring", 4, 4, keys=8)


def test_table_and_cli(tmp_path, capsys):
    table = model.crossover_table(batches=(1024, 32768), dims=(512,), worlds=(2, 1024))
    assert table.count("| clip | ") == 2 and "### siglip: loss memory" in table
    model.main(["--out", str(tmp_path), "--no-check"])
    text = (tmp_path / "distributed_nccl_model.md").read_text()
    assert "a model, not a measurement" in text and "| info_nce | 32768 | 1024 |" in text
    assert "distributed_nccl_model.md" in capsys.readouterr().out
