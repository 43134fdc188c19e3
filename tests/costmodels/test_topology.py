"""Named topologies: counts, path bandwidth and latency by locality, names, speed, digests."""

from __future__ import annotations

import time

import pytest

from costmodels.errors import TopologyError
from costmodels.topology import get_topology


def test_cloudmatrix384_counts_and_membership():
    t = get_topology("cloudmatrix384")
    assert (t.num_devices, t.num_dies, t.num_servers, t.pods) == (384, 768, 48, 1)
    assert t.dies_per_device == 2 and t.devices_per_server == 8 and len(t.devices) == 384
    assert t.server_of(0) == 0 and t.server_of(8) == 1 and t.server_of(383) == 47
    assert t.dies_of(5) == [10, 11] and t.device_of_die(11) == 5
    assert t.hardware.name == "Ascend 910C"
    dies = [n for n in t.graph.nodes if n.startswith("die/")]
    assert len(dies) == 768


def test_cloudmatrix384_ub_is_flat_and_rdma_joins_pods():
    t = get_topology("cloudmatrix384:2")
    assert (t.num_devices, t.pods) == (768, 2) and t.pod_of(383) == 0 and t.pod_of(384) == 1
    intra_server, inter_server, inter_pod = t.bandwidth(0, 1), t.bandwidth(0, 8), t.bandwidth(0, 384)
    assert intra_server == inter_server == 392.0  # UB: 2 dies x 196 GB/s, not oversubscribed
    assert inter_pod == 50.0  # RDMA: 2 dies x 25 GB/s
    assert t.latency(0, 1) < t.latency(0, 8) < t.latency(0, 384)
    assert t.latency(0, 8) - t.latency(0, 1) <= 1.0  # CMI §3: < 1 us extra inter-node
    assert t.pair_class(0, 1) == "server" and t.pair_class(0, 8) == "pod" and t.pair_class(0, 384) == "cluster"
    assert t.group_bandwidth([0, 1, 2]) == 392.0 and t.group_bandwidth([0, 9, 400]) == 50.0
    assert t.die_path(0, 1).plane == "UB" and t.die_path(0, 768).plane == "RoCE"


def test_gpu_clusters_nvlink_inside_infiniband_between():
    t = get_topology("h800-cluster:40")
    assert (t.num_devices, t.num_servers, t.dies_per_device) == (320, 40, 1)
    assert t.bandwidth(0, 7) == 200.0 and t.bandwidth(0, 8) == 50.0
    assert get_topology("h100-cluster:2").bandwidth(0, 1) == 450.0
    assert get_topology("h200-cluster:1").hardware.hbm_gb == 141.0
    assert t.offisland_fraction(8) == 0.0 and t.offisland_fraction(16) == pytest.approx(8 / 15)


def test_local_processes():
    t = get_topology("local:4")
    assert (t.num_devices, t.num_servers, t.devices_per_server) == (4, 1, 4)
    assert t.bandwidth(0, 3) > 0 and t.kind == "local"


@pytest.mark.parametrize("name", ["foo", "h100-cluster", "h900-cluster:2", "local:0", "cloudmatrix384:0",
                                  "cloudmatrix384:99", "h800-cluster:-1", "local:x"])
def test_bad_names_list_the_valid_ones(name):
    with pytest.raises(TopologyError) as err:
        get_topology(name)
    msg = str(err.value)
    assert "\n" not in msg and "cloudmatrix384:K" in msg and "h800-cluster:N" in msg and "local:N" in msg


def test_out_of_range_device():
    with pytest.raises(TopologyError, match="out of range 0..383"):
        get_topology("cloudmatrix384").server_of(384)


def test_build_is_fast_and_digest_is_stable():
    get_topology.cache_clear()
    t0 = time.perf_counter()
    a = get_topology("cloudmatrix384")
    assert time.perf_counter() - t0 < 1.0
    get_topology.cache_clear()
    b = get_topology("cloudmatrix384")
    assert a is not b and a.digest() == b.digest() and len(a.digest()) == 64
    assert a.digest() != get_topology("cloudmatrix384:2").digest() != get_topology("h800-cluster:40").digest()
    assert get_topology("cloudmatrix384:1").name == "cloudmatrix384"


def test_the_family_registry_is_the_one_list_of_names():
    from costmodels.topology import FAMILIES, VALID_NAMES, topology_names

    assert topology_names() == ("cloudmatrix384[:K], h100-cluster:N, h800-cluster:N, h200-cluster:N, a100-cluster:N, "
                                "b200-cluster:N, gb200-nvl72:N, h100:N, h200:N, local:N")
    for family in FAMILIES:
        assert family.usage in topology_names() and family.describe() in VALID_NAMES
        t = get_topology(family.kind if family.default is not None else f"{family.kind}:2")
        assert t.kind == family.kind
        with pytest.raises(TopologyError, match=f"count must be 1..{family.limit}"):
            get_topology(f"{family.kind}:{family.limit + 1}")


def test_scaleup_scope_is_asked_not_compared():
    assert get_topology("cloudmatrix384").scaleup_spans_pod
    assert not get_topology("h100-cluster:2").scaleup_spans_pod and not get_topology("local:2").scaleup_spans_pod
