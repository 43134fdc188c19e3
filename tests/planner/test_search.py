"""The deployment search: slices and pod packing, aggregated vs disaggregated, pins and SLO messages."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from costmodels.aggregated import AggregatedDeployment, estimate_aggregated
from costmodels.errors import InfeasibleError, InputError
from costmodels.serving import DecodeDeployment, estimate_decode
from costmodels.topology import get_topology
from planner.compile import DEFAULT_WORKLOAD, CompileOptions, _layout, compile_report
from planner.frontend.shape import shape_of
from planner.search import Pins, Tally, decode_candidates, search
from planner.placement import max_second, packed_count, topology_slice
from tests.conftest import assert_one_line_error, run_cli


def test_slice_counts_devices_per_pod():
    cm4 = get_topology("cloudmatrix384:4")
    assert topology_slice(cm4).pods == (384, 384, 384, 384)
    assert topology_slice(cm4, 500).pods == (384, 116)
    with pytest.raises(InputError, match=r"--devices 2000: cloudmatrix384:4 has 1536 devices"):
        topology_slice(cm4, 2000)


def test_packing_never_spans_a_pod():
    sl = topology_slice(get_topology("cloudmatrix384:4"))
    assert packed_count(sl, 224) == 4  # one per pod: two would need 448 of a pod's 384
    assert packed_count(sl, 616) == 0
    # 224-device decode instances first (largest first), then 40-device prefill in the 160 left per pod
    assert max_second(sl, 224, 4, 40) == 16
    # prefill larger than decode: the most 96-device instances leaving room for 3 of 64 devices
    assert max_second(sl, 64, 3, 96) == 14


def test_kimi_k2_on_four_pods_keeps_every_instance_inside_one_pod():
    topo = get_topology("cloudmatrix384:4")
    sr = search(shape_of("kimi-k2"), topo, DEFAULT_WORKLOAD, mode="auto")
    per_pod = topo.num_devices // topo.pods
    assert sr.decode.instance_devices <= per_pod
    assert sr.prefill is None or sr.prefill.instance_devices <= per_pod
    assert sr.devices_used <= topo.num_devices


def test_one_device_instance_of_a_128_expert_model_holds_128_slots():
    # the "130 slots per device but only 128 experts" failure: a device holds each expert once at most
    shape = shape_of("qwen3-30b-a3b")
    routed, shared, slots, redundant = _layout(shape, get_topology("cloudmatrix384"), 1)
    assert (routed, shared, slots, redundant) == (1, 0, 128, 0)
    routed, _, slots, redundant = _layout(shape, get_topology("cloudmatrix384"), 2)
    assert slots <= 128 and routed * slots == 128 + redundant


def test_aggregated_step_is_decode_plus_the_chunk():
    shape, topo = shape_of("deepseek-v3"), get_topology("cloudmatrix384")
    dec = DecodeDeployment(devices=64, batch_per_device=64, kv_len=4608, quant="int8")
    agg = AggregatedDeployment(dec, input_len=4096, output_len=1024)
    assert agg.chunk_tokens_per_device == 64 * 4096 / 1024
    a, d = estimate_aggregated(shape, topo, agg), estimate_decode(shape, topo, dec)
    assert a.step_ms > d.step_ms and a.tpot_ms > d.tpot_ms  # the chunk costs time
    assert a.breakdown["prefill_chunk"] == pytest.approx(a.step_ms - d.step_ms)
    assert a.ttft_ms is not None and a.ttft_ms >= a.step_ms
    # a longer prompt per output token means a bigger chunk and a slower step
    longer = estimate_aggregated(shape, topo, replace(agg, input_len=8192))
    assert longer.step_ms > a.step_ms
    with pytest.raises(InputError, match="colocated"):
        estimate_aggregated(shape, topo, replace(agg, decode=replace(dec, mode="disaggregated")))


def test_h100_pair_serves_deepseek_aggregated_and_says_why():
    # the first report: two 8-GPU nodes cannot hold a DeepSeek-V3 decode and a prefill instance
    sr = search(shape_of("deepseek-v3"), get_topology("h100-cluster:2"), DEFAULT_WORKLOAD, mode="auto")
    assert sr.mode == "agg" and sr.prefill is None and sr.decode_instances == 1
    assert sr.decode.instance_devices == 16
    assert "disagg has no plan" in sr.why
    disagg = next(m for m in sr.modes if m.mode == "disagg")
    assert "use --mode agg" in disagg.error
    with pytest.raises(InfeasibleError, match="use --mode agg"):
        search(shape_of("deepseek-v3"), get_topology("h100-cluster:2"), DEFAULT_WORKLOAD, mode="disagg")


def test_auto_picks_the_mode_with_more_requests_per_second():
    shape, topo = shape_of("mixtral-8x7b"), get_topology("h200-cluster:4")
    auto = search(shape, topo, DEFAULT_WORKLOAD, mode="auto")
    agg = search(shape, topo, DEFAULT_WORKLOAD, mode="agg")
    dis = search(shape, topo, DEFAULT_WORKLOAD, mode="disagg")
    assert auto.requests_per_s == max(agg.requests_per_s, dis.requests_per_s)
    assert {m.mode for m in auto.modes} == {"agg", "disagg"}
    assert auto.modes[0].mode == auto.mode
    assert "req/s" in auto.why


def test_devices_slice_plans_on_the_first_devices():
    sr = search(shape_of("deepseek-v3"), get_topology("cloudmatrix384"), DEFAULT_WORKLOAD, mode="auto", devices=192)
    assert sr.slice.devices == 192 and sr.devices_used <= 192


def test_idle_devices_are_explained():
    sr = search(shape_of("deepseek-v3"), get_topology("cloudmatrix384"), DEFAULT_WORKLOAD, mode="disagg",
                pins=Pins(decode_devices=160, prefill_devices=40))
    idle = sr.slice.devices - sr.devices_used
    assert idle > 0
    assert len(sr.notes) == 1 and sr.notes[0].startswith(f"{idle} idle: ")


@pytest.mark.parametrize("pins,topology,mode,fragments", [
    (Pins(decode_devices=400), "cloudmatrix384", "auto", ["--decode-devices 400", "cloudmatrix384 has 384 devices"]),
    (Pins(decode_devices=400), "cloudmatrix384:4", "auto", ["--decode-devices 400", "one pod", "384"]),
    (Pins(decode_devices=320, prefill_devices=80), "cloudmatrix384", "auto",
     ["--decode-devices 320 + --prefill-devices 80", "384 devices", "--mode agg"]),
    (Pins(attention_devices=300, moe_devices=100), "cloudmatrix384", "auto", ["= 400", "384"]),
    (Pins(prefill_devices=16), "cloudmatrix384", "agg", ["--prefill-devices", "--mode disagg"]),
], ids=["over-topology", "over-pod", "pair-over-topology", "afd-over-pod", "agg-with-prefill-pin"])
def test_pins_that_cannot_fit_name_the_number_and_the_limit(pins, topology, mode, fragments):
    with pytest.raises(InputError) as exc:
        search(shape_of("deepseek-v3"), get_topology(topology), DEFAULT_WORKLOAD, pins=pins, mode=mode)
    for frag in fragments:
        assert frag in str(exc.value), (frag, str(exc.value))


def test_infeasible_slo_names_the_best_reachable_value_and_the_knob():
    wl = replace(DEFAULT_WORKLOAD, tpot_slo_ms=5.0)
    with pytest.raises(InfeasibleError) as exc:
        search(shape_of("deepseek-v3"), get_topology("cloudmatrix384"), wl, mode="disagg")
    msg = str(exc.value)
    assert "best reachable TPOT" in msg and "relax --tpot-ms to" in msg
    wl = replace(DEFAULT_WORKLOAD, ttft_slo_ms=1.0)
    with pytest.raises(InfeasibleError, match=r"best reachable TTFT .* relax --ttft-ms to"):
        search(shape_of("deepseek-v3"), get_topology("cloudmatrix384"), wl, mode="agg")


def test_too_big_for_the_topology_names_the_weights():
    with pytest.raises(InfeasibleError, match=r"int8 weights alone need 671 GB = 9 x 80 GB devices"):
        search(shape_of("deepseek-v3"), get_topology("h100-cluster:1"), DEFAULT_WORKLOAD, mode="auto")


def test_aggregated_plan_has_one_phase_serving_both():
    plan, sr = compile_report("tiny-mixtral", "local:8", CompileOptions(mode="agg"))
    assert sr.mode == "agg" and plan.prefill is None and plan.decode is not None
    p = plan.decode.predictions
    assert p.tpot_ms is not None and p.ttft_ms is not None
    assert plan.provenance.options["mode"] == "agg"
    assert [p for p in plan.frontier if p.chosen] and all(p.phase == "decode" for p in plan.frontier)


def test_compile_json_prints_summary_modes_and_frontier(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cli("compile", "tiny-mixtral", "--topology", "local:8", "--tpot-ms", "1000", "--json", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["mode"] in ("agg", "disagg") and rep["why"]
    assert {m["mode"] for m in rep["modes"]} == {"agg", "disagg"}
    assert rep["devices"]["slice"] == 8 and rep["devices"]["used"] + rep["devices"]["idle"] == 8
    assert any(r["chosen"] for r in rep["frontier"])
    assert set(rep["phases"]) == ({"decode"} if rep["mode"] == "agg" else {"prefill", "decode"})


def test_compile_text_summary_shows_both_modes_and_the_frontier(tmp_path):
    proc = run_cli("compile", "tiny-mixtral", "--topology", "local:8", "--tpot-ms", "1000", "-o", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    assert "best of each mode" in proc.stdout and "frontier" in proc.stdout
    assert "agg" in proc.stdout and "disagg" in proc.stdout and "chosen" in proc.stdout


def test_compile_cli_pin_over_the_topology_is_one_line(tmp_path):
    proc = run_cli("compile", "deepseek-v3", "--topology", "cloudmatrix384", "--decode-devices", "400",
                   "-o", str(tmp_path / "p.json"))
    assert_one_line_error(proc, "--decode-devices 400: cloudmatrix384 has 384 devices")
    proc = run_cli("compile", "tiny-mixtral", "--topology", "local:8", "--devices", "9", "-o", str(tmp_path / "p.json"))
    assert_one_line_error(proc, "--devices 9: local:8 has 8 devices")


def test_disaggregated_decode_searches_attention_tp_where_it_pays():
    # GQA (few KV heads): head-TP splits the attention weights and KV reads, and pays for its all-reduce;
    # MLA (one latent KV shared by every head) gains nothing from it, so TP 1 wins there
    cm = get_topology("cloudmatrix384")
    pins = Pins(decode_mode="disaggregated")
    gqa = search(shape_of("qwen3-235b-a22b"), cm, DEFAULT_WORKLOAD, pins, mode="disagg")
    assert gqa.decode.deployment.mode == "disaggregated" and gqa.decode.deployment.attn_tp > 1
    assert gqa.decode.estimate.breakdown["tp_allreduce"] > 0  # the all-reduce is priced, not free
    mla = search(shape_of("deepseek-v3"), cm, DEFAULT_WORKLOAD, pins, mode="disagg")
    assert mla.decode.deployment.attn_tp == 1
    assert {c.deployment.attn_tp for c in mla.frontier if c.phase == "decode"} > {1}  # TP > 1 was searched
    pinned = search(shape_of("qwen3-235b-a22b"), cm, DEFAULT_WORKLOAD, replace(pins, attention_tp=2), mode="disagg")
    assert pinned.decode.deployment.attn_tp == 2


def test_imbalance_learns_per_shape_and_scores_unknown_shapes_at_the_worst():
    from planner.search import Imbalance

    imb = Imbalance().learn("decode", 168, 1.131).learn("decode", 64, 1.0).learn("prefill", 40, 1.0)
    assert imb.of("decode", 168) == 1.131 and imb.of("decode", 64) == 1.0
    assert imb.of("decode", 96) == 1.131  # not balanced yet: the worst learnt, not perfect balance
    assert imb.of("prefill", 96) == 1.0
    assert imb.describe() == "decode 1.131 (64 devices 1.000, 168 devices 1.131), prefill 1.000 (40 devices 1.000)"
    cands = decode_candidates(shape_of("deepseek-v3"), get_topology("cloudmatrix384"), DEFAULT_WORKLOAD,
                              Pins(decode_devices=64), Tally(), imb=imb)
    assert cands and {c.deployment.imbalance for c in cands} == {1.0}
