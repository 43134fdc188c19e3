"""Routed experts as two Triton kernels (GPU only): gate/up with the SwiGLU fused in, then down with the
routing weight fused in.

Why not `torch._grouped_mm`: in a decode step each expert sees a handful of rows, so the experts'
cost is streaming their weights from HBM once. Measured on one H200 (bench/gpu_decode.py, Qwen3-30B-A3B,
batch 32) the grouped GEMM read the touched experts at about 2.7 TB/s and the step around it spent
as long again in small kernels (sort, histogram, activation, scatter). Here the rows are laid out
in blocks of one expert each (`runtime.moe_align`), every program streams one expert's weight
columns once for all of its rows, the activation and the routing weight are applied in registers,
and no intermediate of gate/up is written.

Weights are read in place through their strides: transformers' [E, out, in] or the transposed
[E, in, out]; gate and up are the two halves of gate_up_proj's out axis (SwiGLU, `is_concatenated`).
Registered with transformers' experts interface as "podplan_triton" (`register`); modules it cannot
run (biases, interleaved gate/up, another activation, shapes off the tile grid) fall back to
transformers' grouped_mm forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import triton
import triton.language as tl

from runtime.moe_align import block_layout, padded_rows

NAME = "podplan_triton"


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _align_kernel(ids_ptr, w_ptr, scratch_ptr, dest_ptr, row_token_ptr, row_weight_ptr, block_expert_ptr,
                  A, k, E, R: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr, BLOCK_A: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """One program lays out a decode step's A assignments (`runtime.moe_align` in one kernel): sort
    (expert, position) keys, rank each within its expert's run, pad every run to whole blocks of BM
    rows, and write each padded row's token and routing weight and each block's expert."""
    offs = tl.arange(0, BLOCK_A)
    real = offs < A
    ids = tl.load(ids_ptr + offs, mask=real, other=E).to(tl.int32)  # padding sorts after every expert
    keys = tl.sort(ids * BLOCK_A + offs)
    e = keys // BLOCK_A
    pos = keys % BLOCK_A
    real = e < E
    tl.store(scratch_ptr + offs, e)
    tl.debug_barrier()
    prev = tl.load(scratch_ptr + offs - 1, mask=offs > 0, other=-1)
    nxt = tl.load(scratch_ptr + offs + 1, mask=offs < BLOCK_A - 1, other=-1)
    run_start = tl.associative_scan(tl.where(e != prev, offs, 0), 0, _max_combine)
    rank = offs - run_start
    padded = tl.where((e != nxt) & real, (rank + BM) // BM * BM, 0)  # a run's last element: its run, padded
    dest = tl.cumsum(padded, 0) - padded + rank  # the padded runs before this one, then the rank
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        tl.store(row_token_ptr + rr, tl.full((BLOCK_R,), -1, tl.int32), mask=rr < R)
        tl.store(row_weight_ptr + rr, tl.zeros((BLOCK_R,), tl.float32), mask=rr < R)
        tl.store(block_expert_ptr + rr, tl.full((BLOCK_R,), -1, tl.int32), mask=rr < NB)
    tl.debug_barrier()
    tl.store(dest_ptr + pos, dest, mask=real)
    tl.store(row_token_ptr + dest, pos // k, mask=real)
    tl.store(row_weight_ptr + dest, tl.load(w_ptr + pos, mask=real, other=0.0).to(tl.float32), mask=real)
    tl.store(block_expert_ptr + dest // BM, e, mask=real & (rank % BM == 0))  # a block starts at a rank % BM == 0


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, row_token_ptr, block_expert_ptr, K: tl.constexpr, I: tl.constexpr,
                    stride_we, stride_wn, stride_wk, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[r, n] = silu(x[t] . Wg[e, n]) * (x[t] . Wu[e, n]) for the rows r of block pid_m (expert e; t the
    row's token, padding rows read zeros)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    tok = tl.load(row_token_ptr + rows)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + tl.maximum(tok, 0).to(tl.int64)[:, None] * K + ks[None, :]
    x_mask = (tok >= 0)[:, None]
    wg_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[:, None] * stride_wn + ks[None, :] * stride_wk
    wu_ptrs = wg_ptrs + I * stride_wn
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        acc_g = tl.dot(x, tl.trans(tl.load(wg_ptrs)), acc_g)
        acc_u = tl.dot(x, tl.trans(tl.load(wu_ptrs)), acc_u)
        x_ptrs += BK
        wg_ptrs += BK * stride_wk
        wu_ptrs += BK * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(out_ptr + rows[:, None] * I + cols[None, :], h.to(out_ptr.dtype.element_ty))


@triton.jit
def _down_kernel(x_ptr, w_ptr, rw_ptr, out_ptr, block_expert_ptr, K: tl.constexpr, N: tl.constexpr,
                 stride_we, stride_wn, stride_wk, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[r, n] = rw[r] * (x[r] . Wd[e, n]) for the rows r of block pid_m (expert e)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + rows[:, None] * K + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[:, None] * stride_wn + ks[None, :] * stride_wk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(x_ptrs), tl.trans(tl.load(w_ptrs)), acc)
        x_ptrs += BK
        w_ptrs += BK * stride_wk
    acc = acc * tl.load(rw_ptr + rows)[:, None]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(y_ptr, dest_ptr, out_ptr, H, k: tl.constexpr, BH: tl.constexpr):
    """out[t] = sum over the token's k rows of y (already weighted), accumulated in fp32."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(k):
        d = tl.load(dest_ptr + t * k + j).to(tl.int64)
        acc += tl.load(y_ptr + d * H + cols).to(tl.float32)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty))


# Tiles by rows per block (BM): a block holds one expert's rows, so BM near the rows an expert gets
# keeps each expert's weights read once (decode: a few rows per expert; prefill: many). BN output
# columns and BK of the reduction per step; timed on one H200 (bench/moe_kernels.py --sweep).
TILES = {16: {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
         32: {"BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
         64: {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 4}}
ALIGN_MAX = 2048  # assignments up to which one program lays them out (`_align_kernel`); torch past it
COMBINE_BH = 256  # columns per program of the combine


def block_rows(assignments: int, num_experts: int) -> int:
    """BM for a call: the smallest tile that holds about twice the mean rows per expert, 16 to 64."""
    mean = assignments / max(num_experts, 1)
    return 16 if mean <= 4 else 32 if mean <= 12 else 64


def _weight_strides(w: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """(expert, out, in) strides of a [E, out, in] weight, or of a transposed [E, in, out] one."""
    return (w.stride(0), w.stride(2), w.stride(1)) if transposed else (w.stride(0), w.stride(1), w.stride(2))


def _is_silu(act: object) -> bool:
    """transformers' SiLUActivation, torch's nn.SiLU or anything else that computes x * sigmoid(x)."""
    if not callable(act):
        return False
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    try:
        return bool(torch.allclose(act(probe), torch.nn.functional.silu(probe)))
    except Exception:  # noqa: BLE001 - an activation that cannot take a CPU float tensor is not SiLU here
        return False


def supports(module: Any) -> bool:  # Any: transformers' experts modules share no base class
    """True when the kernels compute exactly what transformers' experts forward does for `module`."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or not gate_up.is_cuda:
        return False
    if gate_up.dtype not in (torch.bfloat16, torch.float16) or gate_up.dim() != 3:
        return False
    if (not getattr(module, "has_gate", False) or getattr(module, "has_bias", True)
            or not getattr(module, "is_concatenated", False) or getattr(module, "has_post_expert_norm", True)):
        return False
    if type(module)._apply_gate.__name__ != "_default_apply_gate" or not _is_silu(getattr(module, "act_fn", None)):
        return False
    if getattr(module, "_is_expert_parallel", False):  # sentinel ids: transformers' path handles them
        return False
    H, I = module.hidden_dim, module.intermediate_dim
    return all(not (H % t["BK"] or I % t["BK"] or H % t["BN"] or I % t["BN"]) for t in TILES.values()) \
        and H % COMBINE_BH == 0


def triton_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward contract: tokens [T, H], top-k ids and weights [T, k] -> [T, H]."""
    ok = getattr(self, "_podplan_triton", None)
    if ok is None:  # decided once per module: the probe is host work a captured step must not repeat
        ok = self._podplan_triton = supports(self)
    if not ok:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    T, k = top_k_index.shape
    E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
    A = T * k
    BM = block_rows(A, E)
    t = TILES[BM]
    R = padded_rows(A, E, BM)
    NB = R // BM
    dev = hidden_states.device
    x = hidden_states.to(self.gate_up_proj.dtype).contiguous()
    if A <= ALIGN_MAX:
        block_a = triton.next_power_of_2(A)
        dest = torch.empty(A, dtype=torch.int32, device=dev)
        row_token = torch.empty(R, dtype=torch.int32, device=dev)
        row_weight = torch.empty(R, dtype=torch.float32, device=dev)
        block_expert = torch.empty(NB, dtype=torch.int32, device=dev)
        scratch = torch.empty(block_a, dtype=torch.int32, device=dev)
        _align_kernel[(1,)](top_k_index.contiguous(), top_k_weights.contiguous(), scratch, dest, row_token, row_weight,
                            block_expert, A, k, E, R=R, NB=NB, BM=BM, BLOCK_A=block_a, BLOCK_R=1024, num_warps=8)
    else:  # prefill: the same layout from torch operations (`runtime.moe_align`)
        layout = block_layout(top_k_index, E, BM)
        dest, block_expert = layout.dest, layout.block_expert
        row_token = torch.full((R,), -1, dtype=torch.int32, device=dev)
        row_token[dest] = torch.arange(A, device=dev, dtype=torch.int32) // k
        row_weight = torch.zeros(R, dtype=torch.float32, device=dev)
        row_weight[dest] = top_k_weights.reshape(-1).float()
    launch = {"BM": BM, "BN": t["BN"], "BK": t["BK"], "num_warps": t["num_warps"], "num_stages": t["num_stages"]}
    h = torch.empty(R, I, dtype=x.dtype, device=dev)
    we, wn, wk = _weight_strides(self.gate_up_proj, self.is_transposed)
    _gate_up_kernel[(NB, I // t["BN"])](x, self.gate_up_proj, h, row_token, block_expert, H, I, we, wn, wk, **launch)
    y = torch.empty(R, H, dtype=x.dtype, device=dev)
    we, wn, wk = _weight_strides(self.down_proj, self.is_transposed)
    _down_kernel[(NB, H // t["BN"])](h, self.down_proj, row_weight, y, block_expert, I, H, we, wn, wk, **launch)
    out = torch.empty(T, H, dtype=hidden_states.dtype, device=dev)
    _combine_kernel[(T, H // COMBINE_BH)](y, dest, out, H, k=k, BH=COMBINE_BH)
    return out


def register() -> str:
    """Make "podplan_triton" an experts implementation transformers' experts modules dispatch to."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[NAME] = triton_experts_forward
    return NAME
