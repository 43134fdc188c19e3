"""Roofline and per-stage compute, checked on hand-computed cases."""

from __future__ import annotations

import pytest

from costmodels import compute
from costmodels.hardware import ASCEND_910C, H800

INT8 = compute.precision("int8", None, ASCEND_910C)
BF16 = compute.precision("bf16", None, ASCEND_910C)


def test_roofline_picks_the_slower_side():
    # 752 TOPS x 0.80 = 601.6e6 ops/us; 1.6 TB/s x 0.841 = 1.3456e6 B/us
    assert compute.roofline_us(ASCEND_910C, "dense_gemm", 601.6e6, 0, "int8") == pytest.approx(1.0)
    assert compute.roofline_us(ASCEND_910C, "dense_gemm", 0, 1.3456e6, "int8") == pytest.approx(1.0)
    assert compute.roofline_us(ASCEND_910C, "dense_gemm", 601.6e6, 2 * 1.3456e6, "int8") == pytest.approx(2.0)
    assert compute.roofline_us(ASCEND_910C, "attention", 376e6 * 0.654, 0, "bf16") == pytest.approx(1.0)
    assert compute.roofline_us(ASCEND_910C, "expert_gemm", 752e6 * 0.77, 0, "int8") == pytest.approx(1.0)


def test_mla_decode_attention_by_hand(dsv3):
    got = compute.attention_us(dsv3, ASCEND_910C, INT8, seqs=1, q_per_seq=1, kv_len=4096, phase="decode")
    proj = max(2 * 187121664 / 601.6e6, (187121664 + 2 * 7168 * 2) / 1.3456e6)  # weight streaming: ~139 us
    core = max(2 * 128 * (576 + 512) * 4096 / (376e6 * 0.654), 4096 * 576 * 2 / 1.3456e6)
    assert got == pytest.approx(proj + core)
    # MTP's second query token shares the cache read: less than twice the single-token cost
    two = compute.attention_us(dsv3, ASCEND_910C, INT8, seqs=1, q_per_seq=2, kv_len=4096, phase="decode")
    assert got < two < 2 * got


def test_gqa_cache_and_tp_replicas(gqa, dsv3):
    assert compute.kv_replicas(dsv3, 4) == 4.0  # MLA latent is needed by every head shard
    assert compute.kv_replicas(gqa, 2) == 1.0 and compute.kv_replicas(gqa, 8) == 2.0
    # GQA decode with a long cache is memory-bound: doubling the cache ~doubles the core time
    short = compute.attention_us(gqa, H800, compute.precision("bf16", None, H800), seqs=64, q_per_seq=1,
                                 kv_len=8192, phase="decode")
    long = compute.attention_us(gqa, H800, compute.precision("bf16", None, H800), seqs=64, q_per_seq=1,
                                kv_len=16384, phase="decode")
    assert 1.8 < long / short < 2.0


def test_experts_weight_bound_then_compute_bound(dsv3):
    one = compute.experts_us(dsv3, ASCEND_910C, INT8, pairs=1, slots=1, params_per_expert=dsv3.params_expert)
    assert one == pytest.approx((44040192 + 2 * 7168) / 1.3456e6)  # one expert's INT8 weights
    big = compute.experts_us(dsv3, ASCEND_910C, INT8, pairs=1000, slots=1, params_per_expert=dsv3.params_expert)
    assert big == pytest.approx(2 * 44040192 * 1008 / (752e6 * 0.77))  # 1,000 rows padded to 63 cube tiles of 16
    assert compute.experts_us(dsv3, ASCEND_910C, INT8, pairs=0, slots=1, params_per_expert=1) == 0.0


def test_int8_never_slower_than_bf16(dsv3):
    for tokens in (1, 64, 4096):
        assert compute.dense_ffn_us(dsv3, ASCEND_910C, INT8, tokens=tokens) <= compute.dense_ffn_us(
            dsv3, ASCEND_910C, BF16, tokens=tokens)
        assert compute.lm_head_us(dsv3, ASCEND_910C, INT8, tokens=tokens) <= compute.lm_head_us(
            dsv3, ASCEND_910C, BF16, tokens=tokens)


def test_sliding_window_layers_read_at_most_their_window(gqa):
    import dataclasses

    from costmodels import memory

    half = dataclasses.replace(gqa, sliding_window=128, sliding_layers=gqa.num_layers // 2)
    # half the layers at 128 keys, half at the full context
    assert half.attended_kv(8192) == pytest.approx((8192 + 128) / 2)
    assert half.attended_kv(100) == 100 and gqa.attended_kv(8192) == 8192  # within the window / no window
    prec = compute.precision("bf16", None, H800)
    run = dict(seqs=64, q_per_seq=1, kv_len=16384, phase="decode")
    full_us, half_us = compute.attention_us(gqa, H800, prec, **run), compute.attention_us(half, H800, prec, **run)
    assert 0.45 < half_us / full_us < 0.6  # memory-bound: the bytes read roughly halve
    # the KV cache of 64 sequences of 16384 tokens: sliding layers keep 128 of each
    tokens = 64 * 16384
    assert memory.kv_bytes(half, tokens, 2.0, seq_len=16384) == pytest.approx(
        memory.kv_bytes(gqa, tokens, 2.0) * (16384 + 128) / (2 * 16384))
    assert memory.kv_bytes(gqa, tokens, 2.0, seq_len=16384) == memory.kv_bytes(gqa, tokens, 2.0)


def test_grouped_gemm_efficiency_rises_with_tokens_per_expert(dsv3):
    from costmodels.hardware import H200

    fp8 = compute.precision("fp8", None, H200)
    effs = [compute.grouped_gemm_efficiency(H200, fp8, t, dsv3.params_expert) for t in (1, 8, 64, 256, 1024, 4096)]
    assert effs == sorted(effs) and effs[0] < 0.01 < effs[-1]
    # saturates at the compute efficiency (published, or the bundled profile's when there is one)
    assert effs[-1] == pytest.approx(compute.efficiencies(H200).expert_gemm, rel=0.02)
    # tile padding: 650 tokens per expert compute 704 rows on Hopper (wgmma M = 64), 640 exactly 640
    params = 4096 * 4096  # small enough that 640 tokens are compute-bound
    at640, at650 = (compute.grouped_gemm_efficiency(H200, fp8, t, params) for t in (640, 650))
    assert at650 < at640


def test_small_batch_decode_is_latency_bound(dsv3):
    """One sequence per die: the step is weight reads, collective latency and per-layer overhead, not FLOPs."""
    from costmodels.calibration import reference_deployments
    from costmodels.serving import estimate_decode
    from costmodels.topology import get_topology
    import dataclasses

    decode, _, topo = reference_deployments()
    small = estimate_decode(dsv3, get_topology(topo), dataclasses.replace(decode, batch_per_device=2, microbatches=1))
    b = small.breakdown
    fixed = b["comm_latency"] + b["launch_overhead"]
    assert fixed > b["dispatch"] + b["combine"]  # latency terms beat the bandwidth terms
    assert fixed > 0.2 * small.step_ms
    big = estimate_decode(dsv3, get_topology(topo), dataclasses.replace(decode, batch_per_device=96, microbatches=1))
    # 48x the sequences cost far less than 48x the time: the small batch is latency-bound
    assert big.step_ms < 5 * small.step_ms


def test_fp4_weights_follow_the_hardware(dsv3):
    from costmodels.errors import InputError
    from costmodels.hardware import B200, H200

    hopper = compute.precision("mxfp4", None, H200)
    assert not hopper.fp4_compute and hopper.expert_dtype == "bf16"  # weight-only on Hopper
    assert hopper.expert_weight_bytes == pytest.approx(4.25 / 8) and hopper.weight_bytes == 2.0
    blackwell = compute.precision("nvfp4", None, B200)
    assert blackwell.fp4_compute and blackwell.expert_dtype == "fp4"
    with pytest.raises(InputError, match="nvfp4"):
        compute.precision("nvfp4", None, H200)
    with pytest.raises(InputError, match="MXFP4"):
        compute.precision("mxfp4", None, ASCEND_910C)
    # FP4 expert weights: fewer bytes to stream at small batch, so never slower than FP8 on the same device
    fp8 = compute.precision("fp8", None, B200)
    for pairs in (1, 64, 4096):
        assert compute.experts_us(dsv3, B200, blackwell, pairs=pairs, slots=8, params_per_expert=dsv3.params_expert) \
            <= compute.experts_us(dsv3, B200, fp8, pairs=pairs, slots=8, params_per_expert=dsv3.params_expert)


def test_default_precision_per_hardware():
    from costmodels.hardware import A100, B200, H100

    assert compute.precision(None, None, ASCEND_910C).quant == "int8"
    assert compute.precision(None, None, H100).quant == "fp8"
    assert compute.precision(None, None, B200).quant == "fp8"
    assert compute.precision(None, None, A100).quant == "bf16"


def test_grouped_gemm_reads_only_the_experts_its_pairs_touch(dsv3):
    """Empty groups launch no tiles: 1 pair on a die of 32 experts reads one expert's weights, and as many
    pairs as experts touch 1 - (1 - 1/32)^32 = 64% of them under balanced routing (not all 32)."""
    def us(pairs: float, slots: float) -> float:
        return compute.experts_us(dsv3, ASCEND_910C, INT8, pairs=pairs, slots=slots, params_per_expert=dsv3.params_expert)

    assert us(1, 32) == pytest.approx(us(1, 1), rel=1e-6)
    touched = 32 * (1 - (1 - 1 / 32) ** 32)
    assert us(32, 32) == pytest.approx(touched * us(32 / touched, 1), rel=1e-6)
    assert us(32, 32) < 0.7 * 32 * us(1, 1)
    # with many pairs per expert every expert is read: the slots' weights, once each
    assert us(4096, 32) == pytest.approx(32 * us(128, 1), rel=1e-3)
