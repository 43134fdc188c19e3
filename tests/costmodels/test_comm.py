"""Communication formulas against the operator measurements they were derived from, and by hand."""

from __future__ import annotations

import pytest

from costmodels import comm
from costmodels.errors import InputError
from costmodels.topology import get_topology

CM = get_topology("cloudmatrix384")
H800 = get_topology("h800-cluster:40")


@pytest.mark.parametrize("ep, dispatch, combine", comm.ASCEND_A2A_US)
def test_reproduces_cmi_table6(ep, dispatch, combine):
    assert comm.dispatch_us(CM, 128, 7168, "int8", 8, ep) == pytest.approx(dispatch)
    assert comm.combine_us(CM, 128, 7168, 8, ep) == pytest.approx(combine)


@pytest.mark.parametrize("ep, dispatch, combine", comm.DEEPEP_H800_A2A_US)
def test_reproduces_deepep_on_h800(ep, dispatch, combine):
    assert comm.dispatch_us(H800, 128, 7168, "fp8", 8, ep) == pytest.approx(dispatch)
    assert comm.combine_us(H800, 128, 7168, 8, ep) == pytest.approx(combine)


def test_hand_computed_dispatch():
    # EP256 spans servers: latency = 20 us floor + 4 UB hops of 0.5 us; the EP256 measurement (152 us) then
    # leaves 130 us for 128 tokens x 8 experts x (7,168 B + 4 B scale + 8 B routing)
    bw = 128 * 8 * 7180 / 130.0  # bytes per us
    assert comm.dispatch_parts(CM, 64, 7168, "int8", 8, 256) == pytest.approx((22.0, 64 * 8 * 7180 / bw))
    assert comm.dispatch_us(CM, 64, 7168, "int8", 8, 256) == pytest.approx(22.0 + 64 * 8 * 7180 / bw)
    # BF16 dispatch carries twice the bytes and no scale
    assert comm.dispatch_us(CM, 64, 7168, "bf16", 8, 256) == pytest.approx(22.0 + 64 * 8 * (14336 + 8) / bw)
    # inside one server (EP8 = 4 NPUs) the path is die -> L1 -> die: 1 us
    assert comm.dispatch_parts(CM, 64, 7168, "int8", 8, 8)[0] == pytest.approx(21.0)


def test_floor_ep_and_imbalance():
    assert comm.dispatch_us(CM, 0, 7168, "int8", 8, 256) == 0.0
    assert comm.dispatch_us(CM, 128, 7168, "int8", 8, 1) == 0.0  # EP1: nothing leaves the die
    tiny = comm.dispatch_us(CM, 1, 7168, "int8", 8, 256)
    assert 22.0 < tiny < 24.0  # the latency term (floor + hops) dominates small messages
    lat, base = comm.combine_parts(CM, 96, 7168, 9, 320)
    hot_lat, hot = comm.combine_parts(CM, 96, 7168, 9, 320, imbalance=1.5)
    assert hot_lat == lat and hot == pytest.approx(1.5 * base)  # imbalance scales the bytes, not the latency
    # more ranks never faster, between and beyond the measured EP sizes
    times = [comm.dispatch_us(CM, 128, 7168, "int8", 8, ep) for ep in (8, 16, 32, 64, 128, 256, 512)]
    assert times == sorted(times)
    with pytest.raises(InputError, match="imbalance"):
        comm.dispatch_us(CM, 128, 7168, "int8", 8, 8, imbalance=0.5)


def test_cross_pod_all_to_all_pays_rdma():
    two = get_topology("cloudmatrix384:2")
    inside = comm.dispatch_us(two, 128, 7168, "int8", 8, 768)
    across = comm.dispatch_us(two, 128, 7168, "int8", 8, 1536)
    assert across > inside
    # half the peers are in the other pod: their share crosses 25 GB/s RDMA
    nbytes = 128 * 8 * 7180
    rdma_path = comm.path_latency_us(two, 1536)  # die -> RoCE -> spine -> RoCE -> die
    assert rdma_path == pytest.approx(8.0)
    assert across == pytest.approx(20.0 + rdma_path + (1536 - 768) / 1535 * nbytes / 25e3)


def test_disaggregated_transfer_reproduces_xdeepserve():
    # XDS §3.3: 480 attention dies at batch 96, 288 MoE dies, 9 destinations per token
    recv = 480 * 96 * 9 / 288
    a2e = comm.disaggregated_transfer_us(CM, "a2e", 96 * 9, recv, comm.dispatch_dest_bytes(7168, "int8"))
    e2a = comm.disaggregated_transfer_us(CM, "e2a", 96 * 9, recv, comm.combine_dest_bytes(7168))
    assert (a2e, e2a) == (pytest.approx(172.0), pytest.approx(193.0))
    assert comm.disaggregated_transfer_us(H800, "a2e", 96 * 9, recv, 7180) > a2e  # InfiniBand-bound on GPUs


def test_collectives_and_kv_transfer_by_hand():
    eff = comm.collective_efficiency(comm.profile_for(CM))
    assert eff == pytest.approx(128 * 8 * 14336 / 97.0 / 1e3 / 196.0)  # EP8 combine (118 - 21 us) / UB link
    # two dies of one chip, and four dies of two chips: die -> L1 -> die, 1 us
    assert comm.all_reduce_parts(CM, 1e6, 2) == pytest.approx((21.0, 1e6 / (196e3 * eff)))
    assert comm.all_reduce_us(CM, 1e6, 2) == pytest.approx(21.0 + 1e6 / (196e3 * eff))
    assert comm.all_gather_us(CM, 4e6, 4) == pytest.approx(21.0 + 0.75 * 4e6 / (196e3 * eff))
    assert comm.all_reduce_us(CM, 1e6, 1) == 0.0
    assert comm.kv_transfer_us(CM, 25e6) == pytest.approx(20.0 + 1000.0)  # 25 MB at 25 GB/s per die


def test_message_size_agrees_with_opcount(dsv3):
    from costmodels import opcount

    assert 8 * comm.dispatch_dest_bytes(7168, "int8") == opcount.dispatch_bytes_per_token(dsv3, 1.0, 4.0)
    assert 8 * comm.dispatch_dest_bytes(7168, "bf16") == opcount.dispatch_bytes_per_token(dsv3, 2.0)
    assert 8 * comm.combine_dest_bytes(7168) == opcount.combine_bytes_per_token(dsv3)
    # CMI §3: ~7.5 KB per token-expert in INT8, ~14 KB in BF16
    assert 7000 < comm.dispatch_dest_bytes(7168, "int8") < 7600 and 14000 < comm.dispatch_dest_bytes(7168, "bf16") < 14500


def test_a_new_topology_needs_no_change_here():
    """comm asks the hardware for its fabric: a topology family it has never seen is priced like its fabric."""
    from costmodels.hardware import H100
    from costmodels.topology import _gpu_cluster

    new = _gpu_cluster(H100, "test", 4)  # not in FAMILIES, not named anywhere in comm
    assert comm.profile_for(new) is comm.NVIDIA_IB_PROFILE
    # DeepEP's EP8 on H800 (77 us) stays on NVLink: H100's 900 GB/s is 2.25x H800's 400 GB/s
    assert comm.dispatch_us(new, 128, 7168, "fp8", 8, 8) == pytest.approx(21.0 + (77.0 - 21.0) * 200.0 / 450.0)
    assert comm.dispatch_us(new, 128, 7168, "fp8", 8, 16) == pytest.approx(comm.dispatch_us(H800, 128, 7168, "fp8", 8, 16))
    assert comm.collective_efficiency(comm.profile_for(new)) == comm.collective_efficiency(comm.profile_for(H800))


def test_gpu_fabrics_scale_by_the_link_that_bounds_them():
    from costmodels.hardware import A100
    from costmodels.topology import _gpu_cluster

    h800 = comm.dispatch_parts(H800, 128, 7168, "fp8", 8, 32)
    a100 = comm.dispatch_parts(_gpu_cluster(A100, "a100", 4), 128, 7168, "fp8", 8, 32)
    assert a100[1] == pytest.approx(2 * h800[1])  # 200 Gb/s HDR per GPU vs 400 Gb/s: half the bandwidth
    nvl = get_topology("gb200-nvl72:2")
    inside = comm.dispatch_parts(nvl, 128, 7168, "fp8", 8, 64)  # one NVLink domain of 72 GPUs
    across = comm.dispatch_parts(nvl, 128, 7168, "fp8", 8, 144)  # two racks: InfiniBand
    assert inside[1] < h800[1] / 5 and across[1] > 5 * inside[1]
    assert inside[0] == pytest.approx(21.0) and across[0] == pytest.approx(23.0)  # NVLink vs IB hops
    # B200 (NVLink 5, 1.8 TB/s bidirectional): one 8-GPU node moves at 4.5x H800's NVLink, not at its NIC
    b200 = comm.dispatch_parts(get_topology("b200-cluster:2"), 128, 7168, "fp8", 8, 8)
    assert b200[1] == pytest.approx(comm.dispatch_parts(H800, 128, 7168, "fp8", 8, 8)[1] * 200.0 / 900.0)
    assert inside[1] == pytest.approx(b200[1])  # the same NVLink 5 per GPU inside a rack


def test_a_fabric_without_measurements_is_one_line():
    from dataclasses import replace

    from costmodels.errors import TopologyError
    from costmodels.topology import _gpu_cluster

    odd = _gpu_cluster(replace(H800.hardware, scaleup_fabric="Infinity Fabric"), "mi300", 1)
    with pytest.raises(TopologyError, match=r"no measured all-to-all profile for the Infinity Fabric fabric"):
        comm.dispatch_us(odd, 128, 7168, "fp8", 8, 8)
