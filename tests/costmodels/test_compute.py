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
    assert big == pytest.approx(2 * 44040192 * 1000 / (752e6 * 0.77))
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
