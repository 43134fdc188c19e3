"""Run metrics: tokens/s, time per stage, bytes sent per rank, beside the plan's predictions.

Workers time every stage module they run (attention ranks the program's stages, expert ranks their
routed- and shared-experts shards): the table sums them by stage kind, the JSON document also
lists them by stage module ('layer3_attention').

On a CPU (local:N) the times are the host's processes, comparable with a plan only in shape. On a
GPU (NCCL, static buffers) steps are timed with CUDA events: TPOT is the mean of the decode steps
replayed from a CUDA graph (the first decode steps run eagerly while kernels warm up), and one eager
decode step (`runtime.worker.PROFILE_STEP`) is timed per stage, beside the cost model's breakdown.
"""

from __future__ import annotations

from runtime.reference import Check
from runtime.spec import RunSpec

# Stage columns of the per-rank table: (clock keys summed, column title); keys are stage kinds,
# the exchange's steps, the KV hand-over and sampling
STAGES = (
    (("attention",), "attention"),
    (("moe_gate",), "gate"),
    (("dense_ffn",), "dense ffn"),
    (("routed_experts",), "experts"),
    (("shared_experts",), "shared"),
    (("dispatch",), "dispatch"),
    (("combine",), "combine"),
    (("kv_transfer",), "kv"),
    (("embed", "head", "sample"), "other"),
)


def summarise(spec: RunSpec, metrics: list[dict], wall_s: float, check: Check | None) -> dict:
    """One JSON-ready document: totals, per-rank rows, the plan's predictions and the check."""
    ranks = sorted(metrics, key=lambda m: m["rank"])
    run_s = max(m.get("run_s", 0.0) for m in ranks)
    tokens = spec.prompts * spec.new_tokens
    prefill_s = max(m["steps"].get("prefill", 0.0) for m in ranks)
    decode_s = max(m["steps"].get("decode", 0.0) for m in ranks)
    graphed = [m["graph_steps"] for m in ranks if m.get("graph_steps", {}).get("count")]
    if graphed:  # steady state: the replayed steps (every rank replays the same number)
        tpot_ms = max(g["seconds"] / g["count"] for g in graphed) * 1e3
    else:
        tpot_ms = decode_s * 1e3 / (spec.new_tokens - 1) if spec.new_tokens > 1 else None
    profiled = [m["profiled_step_ms"] for m in ranks if m.get("profiled_step_ms")]
    positions = spec.prompts * (spec.prompt_len + spec.new_tokens - 1)
    sent = sum(m["bytes_sent"] for m in ranks)
    out = {
        "model": spec.model,
        "world_size": spec.world_size,
        "backend": spec.backend,
        "prompts": spec.prompts,
        "prompt_len": spec.prompt_len,
        "new_tokens": spec.new_tokens,
        "seed": spec.seed,
        "measured": {
            "tokens_per_s": round(tokens / run_s, 3) if run_s else None,
            "tokens_per_s_per_device": round(tokens / run_s / spec.world_size, 3) if run_s else None,
            "prefill_ms": round(prefill_s * 1e3, 3),
            "tpot_ms": round(tpot_ms, 3) if tpot_ms is not None else None,
            "tpot_basis": f"{graphed[0]['count']} CUDA-graph replays" if graphed else "every decode step",
            "decode_tokens_per_s": round(spec.prompts / (tpot_ms / 1e3), 1) if tpot_ms else None,
            # the slowest rank's profiled decode step per stage kind (on a GPU each stage replayed from
            # a CUDA graph of its own between two CUDA events: runtime.interpreter.StageEvents)
            "stage_ms": max(profiled, key=lambda d: sum(d.values())) if profiled else {},
            "run_s": round(run_s, 4),
            "wall_s": round(wall_s, 3),
            "bytes_sent": sent,
            "bytes_per_token": round(sent / positions, 1),
        },
        "ranks": [_rank_row(m) for m in ranks],
        "predictions": spec.predictions,
    }
    if check is not None:
        out["check"] = {"ok": check.ok, "tokens_match": check.tokens_match, "mismatches": check.mismatches,
                        "near_ties": check.near_ties, "noisy": check.noisy, "outside": check.outside,
                        "pairs": check.pairs, "inconclusive": check.inconclusive,
                        "max_abs_diff": check.max_abs_diff, "tolerance": check.tolerance}
    return out


def _rank_row(m: dict) -> dict:
    clock = m["clock"]
    stages = {title: round(sum(clock.get(k, 0.0) for k in keys) * 1e3, 3) for keys, title in STAGES}
    return {"rank": m["rank"], "instance": m["instance"], "role": m["role"], "params": m.get("params", 0),
            "tokens": m["tokens"], "expert_rows": m["expert_rows"], "bytes_sent": m["bytes_sent"],
            "setup_s": round(m.get("setup_s", 0.0), 3), "stage_ms": stages,
            "stage_module_ms": {name: round(s * 1e3, 3) for name, s in m.get("stage_clock", {}).items()}}


# stage kinds the runtime times -> the cost model's breakdown terms they correspond to
STAGE_TERMS = {"attention": "attention", "moe_gate": "gate", "routed_experts": "experts",
               "shared_experts": "shared_experts", "dispatch": "dispatch", "combine": "combine",
               "dense_ffn": "dense_ffn", "embed": "embed", "head": "lm_head"}


def _fmt(x, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.3g}{unit}" if isinstance(x, float) else f"{x:,}{unit}"


def _err(measured, predicted) -> str:
    if not isinstance(measured, (int, float)) or not isinstance(predicted, (int, float)) or not predicted:
        return "-"
    return f"{(measured - predicted) / predicted:+.0%}"


def comparison_rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(metric, measured, plan, relative error) rows where the plan predicts something comparable."""
    m, p = doc["measured"], doc.get("predictions") or {}
    dec, pre = p.get("decode") or {}, p.get("prefill") or {}
    per_dev = m.get("decode_tokens_per_s")
    per_dev = per_dev / doc["world_size"] if per_dev else None
    rows = [
        ("tokens/s (all devices, whole run)", _fmt(m["tokens_per_s"]), "-", "-"),
        ("decode tokens/s per device", _fmt(per_dev), _fmt(dec.get("throughput_per_device")),
         _err(per_dev, dec.get("throughput_per_device"))),
        ("TTFT / prefill step (ms)", _fmt(m["prefill_ms"]), _fmt(pre.get("ttft_ms")), _err(m["prefill_ms"], pre.get("ttft_ms"))),
        ("TPOT / decode step (ms)", _fmt(m["tpot_ms"]), _fmt(dec.get("tpot_ms")), _err(m["tpot_ms"], dec.get("tpot_ms"))),
        ("bytes moved per token", _fmt(m["bytes_per_token"]), _fmt(p.get("cut_bytes_per_token")), "-"),
    ]
    return rows


def stage_rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(term, measured ms of the profiled decode step, predicted ms of the decode breakdown, error)."""
    measured: dict[str, float] = {}
    for kind, ms in (doc["measured"].get("stage_ms") or {}).items():
        term = STAGE_TERMS.get(kind, kind)
        measured[term] = measured.get(term, 0.0) + ms
    predicted = ((doc.get("predictions") or {}).get("decode") or {}).get("breakdown") or {}
    terms = sorted(set(measured) | {t for t, v in predicted.items() if v})
    return [(t, _fmt(measured.get(t)), _fmt(predicted.get(t)), _err(measured.get(t), predicted.get(t))) for t in terms]


def render(doc: dict, console) -> None:
    """The tables `podplan run` prints: plan vs measured, then one row per rank."""
    from rich.table import Table

    t = Table(title=f"podplan run: {doc['model']} on {doc['world_size']} ranks ({doc['backend']}), "
                    f"{doc['prompts']} prompts x {doc['prompt_len']} tokens, {doc['new_tokens']} new tokens")
    t.add_column("metric")
    t.add_column("measured", justify="right")
    t.add_column("plan predicts", justify="right")
    t.add_column("error", justify="right")
    for row in comparison_rows(doc):
        t.add_row(*row)
    console.print(t)
    basis = (doc.get("predictions") or {}).get("basis")
    if basis:
        console.print(f"predictions: {basis}; TPOT measured over {doc['measured'].get('tpot_basis')}")
    stages = stage_rows(doc) if doc["measured"].get("stage_ms") else []
    if stages:
        s = Table(title="one decode step by stage (ms): measured (a CUDA graph per stage on a GPU; host clocks on a CPU) vs the cost model")
        for col in ("term", "measured", "plan predicts", "error"):
            s.add_column(col, justify="left" if col == "term" else "right")
        for row in stages:
            s.add_row(*row)
        console.print(s)
    note = (doc.get("predictions") or {}).get("timing_note")
    if note:
        console.print(f"note: {note}")
    r = Table(title="per rank: time per stage (ms, summed over steps), bytes sent to other ranks")
    for col in ("rank", "instance", "role", "params"):
        r.add_column(col, justify="right" if col in ("rank", "params") else "left")
    for _, title in STAGES:
        r.add_column(title, justify="right")
    r.add_column("bytes sent", justify="right")
    for row in doc["ranks"]:
        r.add_row(str(row["rank"]), str(row["instance"] or "-"), row["role"], f"{row['params']:,}",
                  *(f"{row['stage_ms'][title]:.1f}" for _, title in STAGES), f"{row['bytes_sent']:,}")
    console.print(r)
    check = doc.get("check")
    if check is None:
        console.print("check against the monolithic model: skipped (--no-check)")
        return
    verdict = "OK" if check["ok"] else "INCONCLUSIVE" if check.get("inconclusive") else "FAILED"
    tokens = "identical" if check["tokens_match"] else f"differ at {check['mismatches']} (prompt, step) pairs"
    if check.get("near_ties"):
        tokens += f" ({check['near_ties']} bf16 near-ties within the tolerance)"
    bound = f"tolerance {check['tolerance']:.0e}"
    if check.get("noisy") or check.get("outside"):
        bound += (f"; beyond it at {check.get('outside', 0)} of {check.get('pairs', 0)} (prompt, step) pairs, where "
                  f"stock eager and SDPA attention part at {check.get('noisy', 0)}")
    console.print(f"check against the monolithic transformers model: {verdict} (fed the run's tokens): tokens {tokens}, "
                  f"max |logit diff| {check['max_abs_diff']:.2e} ({bound})")
    if doc["backend"] == "gloo":
        console.print("note: times are this host's processes, so only their shape compares with the plan's; bytes "
                      "count traffic between different ranks in the model's dtype (the plan counts bf16)")
