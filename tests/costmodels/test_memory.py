"""Expert layouts, memory per role by hand, and the feasibility message."""

from __future__ import annotations

import pytest

from costmodels import memory
from costmodels.errors import InputError
from costmodels.serving import DecodeDeployment, PrefillDeployment, estimate_decode, estimate_prefill
from costmodels.topology import get_topology

CM = get_topology("cloudmatrix384")


def test_published_expert_layouts(dsv3, gqa):
    cmi_decode = memory.expert_layout(dsv3, 320)  # CMI: 256 routed + 32 shared + 32 redundant, one per die
    assert (cmi_decode.shared_dies, cmi_decode.redundant, cmi_decode.slots_per_routed_die) == (32, 32, 1.0)
    xds = memory.expert_layout(dsv3, 288)  # XDS: 256 routed + 32 shared
    assert (xds.shared_dies, xds.redundant) == (32, 0)
    cmi_prefill = memory.expert_layout(dsv3, 32)  # CMI: 1 shared + 8 routed + 1 redundant per die
    assert cmi_prefill.shared_replicated and cmi_prefill.slots_per_routed_die == 9.0
    assert memory.dests_per_token(dsv3, cmi_decode) == 9 and memory.dests_per_token(dsv3, cmi_prefill) == 8
    assert memory.expert_layout(dsv3, 1).redundant == 0
    odd = memory.expert_layout(dsv3, 24)  # ceil(256/24) = 11 slots per die, 8 spare
    assert (odd.redundant, odd.max_slots_per_routed_die) == (8, 11)
    no_shared = memory.expert_layout(gqa, 160)
    assert (no_shared.shared_dies, no_shared.redundant) == (0, 32)
    with pytest.raises(InputError, match="need more than"):
        memory.expert_layout(dsv3, 260, redundant=10)


def test_decode_die_memory_by_hand(dsv3):
    est = estimate_decode(dsv3, CM, DecodeDeployment(devices=160, ep=320, batch_per_device=96, kv_len=4096,
                                                     mtp_accept=0.7, quant="int8", microbatches=2))
    routed = est.memory["decode die (routed experts)"]
    # INT8: attention x (61 + 1 MTP layer), 3 dense FFNs, embedding + head; BF16 gates; 1 expert x 59 layers
    weights = (187121664 * 62 + 396361728 * 3 + 926679040 + 926686208) + 1835008 * 59 * 2 + 44040192 * 59
    kv = 48 * (4096 + 2) * 62 * 576 * 2  # 48 sequences per die, MLA latent + rope key, BF16
    assert routed["weights"] == pytest.approx(weights / 1e9)
    assert routed["kv"] == pytest.approx(kv / 1e9)
    assert routed["buffers"] == memory.COMM_BUFFER_GB and routed["capacity"] == 64.0
    assert "decode die (shared expert)" in est.memory
    assert est.memory_per_device_gb == pytest.approx(2 * max(u["total"] for u in est.memory.values()))
    assert est.feasible


def test_gqa_kv_uses_kv_heads(gqa):
    assert gqa.kv_values_per_token_per_layer() == 2 * 4 * 128
    assert memory.kv_bytes(gqa, 1000, 2.0) == 1000 * 48 * 1024 * 2.0


def test_infeasible_names_the_role_and_overflow(dsv3):
    est = estimate_decode(dsv3, CM, DecodeDeployment(devices=160, ep=320, batch_per_device=400, kv_len=4096,
                                                     quant="int8"))
    assert not est.feasible
    reason = est.infeasible_reason
    assert "decode die (routed experts)" in reason and "over by" in reason and "64.0 GB of HBM" in reason
    over = float(reason.split("over by ")[1].split(" GB")[0])
    assert over == pytest.approx(est.memory["decode die (routed experts)"]["total"] - 64.0, abs=0.06)
    assert "\n" not in reason
    # bf16 experts on too few dies: the prefill die overflows on weights
    pre = estimate_prefill(dsv3, CM, PrefillDeployment(devices=4, ep=8, quant="bf16"))
    assert not pre.feasible and pre.infeasible_reason.startswith("prefill die (routed experts) needs")


def test_disaggregated_roles(dsv3):
    est = estimate_decode(dsv3, CM, DecodeDeployment(mode="disaggregated", attention_devices=240, moe_devices=144,
                                                     dp_domains=3, batch_per_device=192, quant="int8"))
    assert set(est.memory) == {"decode attention die", "decode MoE die (routed experts)", "decode MoE die (shared expert)"}
    assert est.memory["decode MoE die (routed experts)"]["kv"] == 0.0
    assert est.memory["decode attention die"]["kv"] > 10.0
