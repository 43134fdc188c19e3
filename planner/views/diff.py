"""Semantic diff of two plans, and the `--fail-on` regression rules behind `podplan diff`'s exit code.

The diff is plain data (JSON-ready); `render_text` / `render_markdown` turn it into a report.
Expert moves are counted per physical device: an expert newly held by a device must be copied there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from costmodels.errors import InputError
from planner.ir.plan import PHASES, Instance, Phase, Plan, device_ranges
from planner.views.common import human_bytes, instance_hardware, num, serving_label

# metric -> (direction that regresses, limit kind, what it measures)
METRICS: dict[str, tuple[str, str, str]] = {
    "throughput": ("down", "pct", "throughput per device"),
    "tpot": ("up", "pct", "TPOT"),
    "ttft": ("up", "pct", "TTFT"),
    "step": ("up", "pct", "step time"),
    "memory": ("up", "pct", "memory of the fullest device of a role"),
    "balance": ("up", "pct", "worst-layer max/mean expert device load"),
    "moved-experts": ("up", "count", "experts newly placed on a device, summed over layers"),
    "migration": ("up", "bytes", "expert weight bytes to copy (moved experts x expert bytes)"),
    "feasible": ("flag", "flag", "a feasible plan or phase becoming infeasible"),
}
DEFAULT_FAIL_ON = "throughput:-1%,tpot:+1%,ttft:+1%,feasible:on"
SYNTAX = ("syntax: comma-separated [prefill.|decode.]METRIC:LIMIT, e.g. 'throughput:-0.5%,tpot:+2%,"
          "moved-experts:100,migration:10GB,balance:off' (metrics: " + ", ".join(METRICS) + "; 'none' drops the defaults)")
_PREDICTIONS = (("throughput_per_device", "throughput", "tok/s"), ("tpot_ms", "tpot", "ms"),
                ("ttft_ms", "ttft", "ms"), ("step_ms", "step", "ms"))
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


@dataclass(frozen=True)
class Rule:
    """Fail when `metric` (in `phase`, or any phase / the total when None) passes `limit`; None = off.

    limit: percent for 'pct' metrics (1.0 = 1%), a count, bytes, or 1.0 for an enabled flag.
    """

    metric: str
    phase: str | None
    limit: float | None

    @property
    def text(self) -> str:
        where = f"{self.phase}." if self.phase else ""
        direction, kind, _ = METRICS[self.metric]
        if self.limit is None:
            value = "off"
        elif kind == "pct":
            value = f"{'-' if direction == 'down' else '+'}{self.limit:g}%"
        elif kind == "bytes":
            value = human_bytes(self.limit).replace(" ", "")
        elif kind == "flag":
            value = "on"
        else:
            value = f"{self.limit:g}"
        return f"{where}{self.metric}:{value}"


def parse_fail_on(spec: str | None) -> list[Rule]:
    """The defaults, overridden rule by rule by `spec` ('none' first drops them all)."""
    rules = {(r.metric, r.phase): r for r in _parse(DEFAULT_FAIL_ON)}
    if spec is not None:
        items = [s.strip() for s in spec.split(",")]
        if "none" in items:
            rules = {}
            items = [s for s in items if s != "none"]
        for r in _parse(",".join(items)) if items else []:
            rules[(r.metric, r.phase)] = r
    return sorted(rules.values(), key=lambda r: (list(METRICS).index(r.metric), r.phase or ""))


def _parse(spec: str) -> list[Rule]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise InputError(f"--fail-on '{spec}': empty rule; {SYNTAX}")
        name, sep, value = item.partition(":")
        if not sep:
            raise InputError(f"--fail-on '{item}': no ':LIMIT'; {SYNTAX}")
        phase, dot, metric = name.strip().rpartition(".")
        if dot and phase not in PHASES:
            raise InputError(f"--fail-on '{item}': unknown phase '{phase}' (phases: {', '.join(PHASES)}); {SYNTAX}")
        if metric not in METRICS:
            raise InputError(f"--fail-on '{item}': unknown metric '{metric}'; {SYNTAX}")
        out.append(Rule(metric, phase or None, _limit(item, metric, value.strip())))
    return out


def _limit(item: str, metric: str, value: str) -> float | None:
    direction, kind, _ = METRICS[metric]
    if value == "off":
        return None
    if kind == "flag":
        if value != "on":
            raise InputError(f"--fail-on '{item}': {metric} takes 'on' or 'off'; {SYNTAX}")
        return 1.0
    if kind == "pct":
        m = re.fullmatch(r"([+-]?)(\d+(?:\.\d+)?)%", value)
        if m is None:
            raise InputError(f"--fail-on '{item}': {metric} needs a percentage such as "
                             f"{'-' if direction == 'down' else '+'}1%; {SYNTAX}")
        sign = m.group(1)
        bad = "-" if direction == "down" else "+"
        if sign and sign != bad:
            raise InputError(f"--fail-on '{item}': {metric} regresses when it goes {direction}; write "
                             f"{metric}:{bad}{m.group(2)}%")
        return float(m.group(2))
    if kind == "count":
        if not value.isdigit():
            raise InputError(f"--fail-on '{item}': {metric} needs a whole number such as 100; {SYNTAX}")
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", value)
    if m is None or m.group(2).upper() not in _UNITS:
        raise InputError(f"--fail-on '{item}': {metric} needs a size such as 10GB (units B, KB, MB, GB, TB, "
                         f"KiB, MiB, GiB, TiB); {SYNTAX}")
    return float(m.group(1)) * _UNITS[m.group(2).upper()]


# --- the diff -------------------------------------------------------------------------------------


def _pct(old: float | None, new: float | None) -> float | None:
    """Relative change in percent; None when either side is missing or the old value is 0."""
    if old is None or new is None:
        return None
    if old == 0:
        return 0.0 if new == 0 else None
    return round(100.0 * (new - old) / abs(old), 4)


def _changes(old: dict, new: dict) -> list[dict]:
    return [{"field": k, "old": old.get(k), "new": new.get(k)} for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _instance_view(plan: Plan, phase: str, inst: Instance) -> dict:
    placement = plan.placement_of(phase, inst)
    af = inst.af_ratio
    hardware = instance_hardware(plan, inst)  # a mixed topology's instances say which hardware they run on
    return {**({"hardware": hardware} if hardware else {}),
        "mode": inst.mode, "devices": device_ranges(inst.devices),
        "attention_devices": device_ranges(inst.attention_devices),
        "expert_devices": device_ranges(inst.expert_devices),
        "shared_expert_devices": device_ranges(inst.shared_expert_devices),
        "attention_dp": inst.attention_dp, "attention_tp": inst.attention_tp, "ep": inst.ep,
        "microbatches": inst.microbatches, "batch_per_device": inst.batch_per_device, "dp_domains": inst.dp_domains,
        "af_ratio": f"{len(inst.attention_devices)}:{len(inst.expert_devices)}" if af is not None else None,
        "slots_per_device": placement.slots_per_device, "expert_split": "weighted" if placement.weighted else "equal",
    }


def _phase_hardware(plan: Plan, phase: Phase) -> str:
    """The hardware a phase's instances run on: 'H200 SXM (h200-cluster:8)', or the topology's one kind."""
    kinds = sorted({instance_hardware(plan, i) or plan.topology.hardware for i in phase.instances})
    return ", ".join(kinds)


def _held(plan: Plan, phase: str) -> list[dict[int, set[int]]]:
    """Per MoE layer: physical device -> the logical experts it holds in `phase`."""
    out: list[dict[int, set[int]]] = [{} for _ in plan.model.moe_layers]
    for inst in plan.phases[phase].instances:
        placement = plan.placement_of(phase, inst)
        spd = placement.slots_per_device
        for k, d in enumerate(inst.expert_devices):
            for i, lp in enumerate(placement.layers):
                out[i].setdefault(d, set()).update(lp.phy2log[k * spd:(k + 1) * spd])
    return out


def _worst_balance(plan: Plan, phase: str) -> float | None:
    values = [lp.balance for p in plan.phases[phase].experts for lp in p.layers if lp.balance is not None]
    return max(values) if values else None


def unlike(old: Plan, new: Plan) -> list[str]:
    """What makes two plans unlike: another model or another topology. Their device ids and expert ids
    then name different things, so moves between them are not a migration anyone could run."""
    out = []
    if old.model.name != new.model.name:
        out.append(f"model {old.model.name} -> {new.model.name}")
    if old.topology.name != new.topology.name or old.topology.sha256 != new.topology.sha256:
        out.append(f"topology {old.topology.name} -> {new.topology.name}")
    return out


def _device_map(held_old: list[dict[int, set[int]]], held_new: list[dict[int, set[int]]]) -> dict[int, int]:
    """New expert device -> the old device whose experts it holds: itself when it kept its experts, else an
    old device that held exactly these experts in every layer and no longer does (renumbered, e.g. an
    instance moved to other ids), else itself (what it lacks is copied to it)."""
    devices_new = sorted(set().union(*(h.keys() for h in held_new))) if held_new else []
    devices_old = sorted(set().union(*(h.keys() for h in held_old))) if held_old else []

    def sig(held: list[dict[int, set[int]]], d: int) -> tuple:
        return tuple(frozenset(layer.get(d, ())) for layer in held)

    kept = {d for d in devices_new if d in devices_old and sig(held_new, d) == sig(held_old, d)}
    free: dict[tuple, list[int]] = {}
    for d in devices_old:
        if d not in kept:
            free.setdefault(sig(held_old, d), []).append(d)
    out = {}
    for d in devices_new:
        if d in kept:
            out[d] = d
            continue
        same = free.get(sig(held_new, d))
        out[d] = same.pop(0) if same else d
    return out


def _experts(old: Plan, new: Plan, phase: str) -> dict:
    if unlike(old, new):
        return {"comparable": False, "reason": "unlike plans (" + ", ".join(unlike(old, new)) + ")"}
    if old.model.moe_layers != new.model.moe_layers or old.model.num_routed_experts != new.model.num_routed_experts:
        return {"comparable": False, "reason": "the models' MoE layers or expert counts differ"}
    held_old, held_new = _held(old, phase), _held(new, phase)
    source = _device_map(held_old, held_new)
    renumbered = sum(1 for d, o in source.items() if d != o)
    old_insts = {i.id: i for i in old.phases[phase].instances}
    layers, moved_total, changed_total = [], 0, 0
    for i, layer in enumerate(new.model.moe_layers):
        moved = sum(len(experts - held_old[i].get(source[d], set())) for d, experts in held_new[i].items())
        changed = 0
        for inst in new.phases[phase].instances:
            slots_new = new.placement_of(phase, inst).layers[i].phy2log
            before = old_insts.get(inst.id)
            slots_old = old.placement_of(phase, before).layers[i].phy2log if before is not None else ()
            changed += sum(1 for s, e in enumerate(slots_new) if s >= len(slots_old) or slots_old[s] != e)
        if moved or changed:
            layers.append({"layer": layer, "moved": moved, "changed_slots": changed})
        moved_total += moved
        changed_total += changed
    bo, bn = _worst_balance(old, phase), _worst_balance(new, phase)
    return {
        "comparable": True, "moved": moved_total, "changed_slots": changed_total,
        "migration_bytes": moved_total * new.model.expert_bytes, "layers": layers,
        "renumbered_devices": renumbered,
        "balance": {"old": bo, "new": bn, "delta_pct": _pct(bo, bn)},
    }


def _phase_diff(old: Plan, new: Plan, name: str) -> dict:
    po, pn = old.phases.get(name), new.phases.get(name)
    if po is None or pn is None:
        ph = pn if pn is not None else po
        assert ph is not None  # the caller only diffs phases present in one plan or the other
        return {"status": "added" if po is None else "removed", "devices": len(ph.devices),
                "device_ids": device_ranges(ph.devices), "feasible": ph.feasible}
    io = {i.id: i for i in po.instances}
    inn = {i.id: i for i in pn.instances}
    changed = []
    for iid in sorted(set(io) & set(inn)):
        ch = _changes(_instance_view(old, name, io[iid]), _instance_view(new, name, inn[iid]))
        if ch:
            changed.append({"id": iid, "changes": ch})
    preds = []
    for key, _, unit in _PREDICTIONS:
        a, b = getattr(po.predictions, key), getattr(pn.predictions, key)
        if a is not None or b is not None:
            preds.append({"metric": key, "unit": unit, "old": a, "new": b, "delta_pct": _pct(a, b)})
    bo, bn = po.predictions.breakdown, pn.predictions.breakdown
    for stage in sorted(set(bo) | set(bn)):
        if bo.get(stage) == bn.get(stage):
            continue  # only the stages whose time changed
        preds.append({"metric": f"breakdown.{stage}", "unit": "ms", "old": bo.get(stage), "new": bn.get(stage),
                      "delta_pct": _pct(bo.get(stage), bn.get(stage))})
    memory = []
    for role in sorted(set(po.memory) | set(pn.memory)):
        a = po.memory[role].used_gb if role in po.memory else None
        b = pn.memory[role].used_gb if role in pn.memory else None
        memory.append({"role": role, "old_gb": a, "new_gb": b, "delta_pct": _pct(a, b),
                       "fits_old": po.memory[role].feasible if role in po.memory else None,
                       "fits_new": pn.memory[role].feasible if role in pn.memory else None})
    out: dict[str, Any] = {
        "status": "compared",
        "devices": {"old": len(po.devices), "new": len(pn.devices), "old_ids": device_ranges(po.devices),
                    "new_ids": device_ranges(pn.devices)},
        "instances": {"added": sorted(set(inn) - set(io)), "removed": sorted(set(io) - set(inn)), "changed": changed},
        "predictions": preds,
        "memory": memory,
        "feasible": {"old": po.feasible, "new": pn.feasible},
        "experts": _experts(old, new, name),
    }
    hw_old, hw_new = _phase_hardware(old, po), _phase_hardware(new, pn)
    if old.topology.groups or new.topology.groups:  # one kind of hardware throughout: the topology line says it
        out["hardware"] = {"old": hw_old, "new": hw_new}
    out["changed"] = bool(changed or out["instances"]["added"] or out["instances"]["removed"]
                          or any(p["old"] != p["new"] for p in preds)
                          or any(m["old_gb"] != m["new_gb"] for m in memory)
                          or out["experts"].get("moved") or out["experts"].get("changed_slots")
                          or out["devices"]["old_ids"] != out["devices"]["new_ids"])
    return out


def _stages_diff(old: Plan, new: Plan) -> dict:
    """Stages added, removed or changed (by name), and the pass pipeline if it changed."""
    a = {st.name: st for st in old.stages}
    b = {st.name: st for st in new.stages}
    out: dict[str, Any] = {
        "added": [n for n in b if n not in a],
        "removed": [n for n in a if n not in b],
        "changed": [n for n in b if n in a and a[n] != b[n]],
    }
    if old.provenance.passes != new.provenance.passes:
        out["passes"] = {"old": list(old.provenance.passes), "new": list(new.provenance.passes)}
    return out


def _search_view(plan: Plan) -> dict | None:
    """The chosen serving mode, why, and each mode's requests/s (or why it was refused); None for a plan
    without a search record (version 2, or not made by the search)."""
    if plan.search is None:
        return None
    return {"chosen": plan.search.chosen.mode, "why": plan.search.why,
            "modes": {m.mode: m.requests_per_s if not m.refused else f"refused: {m.refused}"
                      for m in plan.search.modes}}


def search_line(search: dict) -> str:
    """'' unless both plans record a search and its chosen mode changed."""
    old, new = search["old"], search["new"]
    if old is None or new is None or old["chosen"] == new["chosen"]:
        return ""
    return f"search: chosen mode {old['chosen']} -> {new['chosen']} ({new['why']})"


def diff_plans(old: Plan, new: Plan) -> dict:
    """The semantic difference between two plans, as JSON-ready data."""
    chosen = {n: [f"{p.phase}: {p.config}" for p in plan.frontier if p.chosen] for n, plan in (("old", old), ("new", new))}
    digest = {"old": old.digest(), "new": new.digest()}
    return {
        "identical": digest["old"] == digest["new"],
        "digest": digest,
        "unlike": unlike(old, new),
        "model": {"name": new.model.name, "changes": _changes(old.model.to_dict(), new.model.to_dict())},
        "topology": {"name": new.topology.name, "changes": _changes(_flat(old.topology.to_dict()),
                                                                    _flat(new.topology.to_dict()))},
        "workload": _changes(old.workload.to_dict(), new.workload.to_dict()),
        "serving": {"old": serving_label(old), "new": serving_label(new)},
        "search": {"old": _search_view(old), "new": _search_view(new)},
        "stages": _stages_diff(old, new),
        "phases": {name: _phase_diff(old, new, name) for name in PHASES if name in old.phases or name in new.phases},
        "frontier": {"old_points": len(old.frontier), "new_points": len(new.frontier),
                     "old_chosen": chosen["old"], "new_chosen": chosen["new"]},
        "feasible": {"old": old.feasible, "new": new.feasible},
    }


# --- regressions ----------------------------------------------------------------------------------


def _metric(phase: dict, metric: str) -> tuple[float | None, str]:
    """(value to test, how it reads) for one compared phase."""
    if metric in ("throughput", "tpot", "ttft", "step"):
        key = {m: k for k, m, _ in _PREDICTIONS}[metric]
        row = next((p for p in phase["predictions"] if p["metric"] == key), None)
        if row is None or row["delta_pct"] is None:
            return None, ""
        return row["delta_pct"], f"{num(row['old'])} -> {num(row['new'])} {row['unit']}"
    if metric == "memory":
        rows = [m for m in phase["memory"] if m["delta_pct"] is not None]
        if not rows:
            return None, ""
        worst = max(rows, key=lambda m: m["delta_pct"])
        return worst["delta_pct"], f"{worst['role']} {num(worst['old_gb'])} -> {num(worst['new_gb'])} GB"
    ex = phase["experts"]
    if not ex.get("comparable"):
        return None, ""
    if metric == "balance":
        b = ex["balance"]
        return b["delta_pct"], f"{num(b['old'])} -> {num(b['new'])}"
    if metric == "moved-experts":
        return float(ex["moved"]), f"{ex['moved']} experts"
    return float(ex["migration_bytes"]), human_bytes(ex["migration_bytes"])


# The pseudo-rule a phase whose expert placements cannot be compared breaks (see `check`).
INCOMPARABLE_RULE = "comparable"


def check(diff: dict, rules: list[Rule], *, allow_incomparable: bool = False) -> list[dict]:
    """The rules the diff breaks: [{'rule', 'phase', 'metric', 'message'}].

    A phase-scoped rule wins over the unscoped one; an unscoped count or size (moved-experts,
    migration) limits the total over phases. Expert placements that cannot be compared (another
    model's layers or expert count) are a regression unless `allow_incomparable`: otherwise a
    changed model would pass every expert rule unchecked.
    """
    compared = {n: p for n, p in diff["phases"].items() if p["status"] == "compared"}
    scoped = {(r.metric, r.phase): r for r in rules}
    out: list[dict] = []

    def broke(rule: Rule, phase: str | None, metric: str, message: str) -> None:
        out.append({"rule": rule.text, "phase": phase, "metric": metric, "message": message})

    if not allow_incomparable:
        for name, phase in compared.items():
            ex = phase["experts"]
            if not ex.get("comparable"):
                out.append({"rule": INCOMPARABLE_RULE, "phase": name, "metric": "experts",
                            "message": f"{name} experts: not comparable ({ex.get('reason', '')}); pass "
                                       "--allow-incomparable if the model change is intended"})

    for metric, (direction, kind, what) in METRICS.items():
        total = scoped.get((metric, None))
        if kind in ("count", "bytes") and total is not None and total.limit is not None:
            s = sum(v for v, _ in (_metric(p, metric) for p in compared.values()) if v is not None)
            if s > total.limit:
                shown = f"{int(s)} experts" if kind == "count" else human_bytes(s)
                broke(total, None, metric, f"{what}: {shown} over all phases, limit {total.text.split(':')[1]}")
        for name, phase in compared.items():
            rule = scoped.get((metric, name)) or (total if kind not in ("count", "bytes") else None)
            if rule is None or rule.limit is None:
                continue
            if kind == "flag":
                if phase["feasible"]["old"] and not phase["feasible"]["new"]:
                    broke(rule, name, metric, f"{name}: feasible -> infeasible")
                continue
            value, reads = _metric(phase, metric)
            if value is None:
                continue
            if kind == "pct":
                bad = -value if direction == "down" else value
                if bad > rule.limit + 1e-9:
                    broke(rule, name, metric, f"{name} {what} {direction} {abs(value):.2f}% ({reads}), "
                                              f"limit {rule.limit:g}%")
            elif value > rule.limit:
                broke(rule, name, metric, f"{name} {what}: {reads}, limit {rule.text.split(':')[1]}")
    flag = scoped.get(("feasible", None))
    phase_flagged = any(v["metric"] == "feasible" for v in out)
    plan_broke = diff["feasible"]["old"] and not diff["feasible"]["new"]
    if flag is not None and flag.limit is not None and plan_broke and not phase_flagged:
        broke(flag, None, "feasible", "plan: feasible -> infeasible")
    return out


# --- reports --------------------------------------------------------------------------------------


def _delta(pct: float | None) -> str:
    if pct is None:
        return "n/a"
    if pct == 0:
        return "0%"
    return f"{pct:+.2f}%"


def _value(v) -> str:
    if isinstance(v, float):
        return num(v)
    if isinstance(v, list) and len(v) > 6:  # e.g. moe_layers: the ends and the count are what a reader checks
        return f"[{v[0]}, {v[1]}, ... {v[-1]}] ({len(v)})"
    return "-" if v is None else str(v)


def render_text(diff: dict, violations: list[dict], rules: list[Rule], old: str, new: str) -> str:
    lines = [f"podplan diff: {old} -> {new}"]
    if diff["identical"]:
        lines.append("plans are identical (same canonical bytes)")
    if diff.get("unlike"):
        lines.append(f"unlike plans ({', '.join(diff['unlike'])}): device and expert ids do not correspond, "
                     "so only predictions are compared; no expert moves or migration")
    for part in ("model", "topology"):
        ch = diff[part]["changes"]
        lines.append(f"{part}: {diff[part]['name']}" + ("" if not ch else " CHANGED: " + ", ".join(
            f"{c['field']} {_value(c['old'])} -> {_value(c['new'])}" for c in ch[:6]) + (" ..." if len(ch) > 6 else "")))
    if diff["workload"]:
        lines.append("workload: " + ", ".join(f"{c['field']} {_value(c['old'])} -> {_value(c['new'])}" for c in diff["workload"]))
    serving = serving_line(diff["serving"])
    if serving:
        lines.append(serving)
    search = search_line(diff["search"])
    if search:
        lines.append(search)
    lines += _stage_lines(diff["stages"])
    for name, ph in diff["phases"].items():
        if ph["status"] != "compared":
            lines.append(f"{name}: phase {ph['status']} ({ph['devices']} devices {ph['device_ids']})")
            continue
        dv = ph["devices"]
        lines.append(f"{name}: devices {dv['old']} -> {dv['new']}" + (
            "" if dv["old_ids"] == dv["new_ids"] else f" ({dv['old_ids']} -> {dv['new_ids']})")
            + ("" if ph["changed"] else ", unchanged"))
        hw = ph.get("hardware")
        if hw is not None:
            lines.append(f"  hardware: {hw['old']}" + ("" if hw["old"] == hw["new"] else f" -> {hw['new']}"))
        inst = ph["instances"]
        for iid in inst["added"]:
            lines.append(f"  + instance {iid}")
        for iid in inst["removed"]:
            lines.append(f"  - instance {iid}")
        for c in inst["changed"]:
            lines.append(f"  ~ instance {c['id']}: " + ", ".join(
                f"{x['field']} {_value(x['old'])} -> {_value(x['new'])}" for x in c["changes"]))
        for p in ph["predictions"]:
            if p["old"] != p["new"] and not p["metric"].startswith("breakdown."):
                lines.append(f"  {p['metric']}: {_value(p['old'])} -> {_value(p['new'])} {p['unit']} ({_delta(p['delta_pct'])})")
        stages = [p for p in ph["predictions"] if p["metric"].startswith("breakdown.") and p["old"] != p["new"]]
        if stages:
            lines.append("  step breakdown: " + ", ".join(
                f"{p['metric'][10:]} {_value(p['old'])} -> {_value(p['new'])} ms" for p in stages))
        for m in ph["memory"]:
            if m["old_gb"] != m["new_gb"]:
                lines.append(f"  memory {m['role']}: {_value(m['old_gb'])} -> {_value(m['new_gb'])} GB ({_delta(m['delta_pct'])})")
        if ph["feasible"]["old"] != ph["feasible"]["new"]:
            lines.append(f"  feasible: {ph['feasible']['old']} -> {ph['feasible']['new']}")
        ex = ph["experts"]
        if not ex["comparable"]:
            lines.append(f"  experts: not comparable ({ex['reason']})")
        elif ex["moved"] or ex["changed_slots"] or ex["balance"]["old"] != ex["balance"]["new"]:
            b = ex["balance"]
            lines.append(f"  experts: {ex['moved']} moved ({human_bytes(ex['migration_bytes'])}) in {len(ex['layers'])} "
                         f"layers, {ex['changed_slots']} slots changed; worst balance {_value(b['old'])} -> "
                         f"{_value(b['new'])} ({_delta(b['delta_pct'])})")
        if ex.get("renumbered_devices"):
            lines.append(f"  experts: {ex['renumbered_devices']} devices renumbered (they hold the same experts under "
                         "new ids; not counted as moved)")
    if "goodput" in diff:  # podplan diff --rate
        lines.append(goodput_line(diff["goodput"]))
    rules_text = ",".join(r.text for r in rules) or "none"
    if violations:
        lines.append(f"result: {len(violations)} regression{'s' if len(violations) > 1 else ''} (rules {rules_text})")
        lines += [f"  {v['rule']}: {v['message']}" for v in violations]
    else:
        lines.append(f"result: within thresholds (rules {rules_text})")
    return "\n".join(lines) + "\n"


def serving_line(serving: dict) -> str:
    """'' when both plans serve alike; else what changed and what the decode comparison then means."""
    if serving["old"] == serving["new"]:
        return ""
    agg = "old" if serving["old"] == "aggregated" else "new"
    return (f"serving: {serving['old']} -> {serving['new']} (the {agg} plan's decode instances also run prefill, "
            "so its decode predictions include the prompt chunks of every step)")


def _stage_lines(st: dict) -> list[str]:
    lines = []
    if "passes" in st:
        lines.append(f"passes: {' -> '.join(st['passes']['old']) or 'none'} => {' -> '.join(st['passes']['new']) or 'none'}")
    for what in ("added", "removed", "changed"):
        names = st[what]
        if names:
            shown = ", ".join(names[:6]) + (f" ... ({len(names)})" if len(names) > 6 else "")
            lines.append(f"stages {what}: {shown}")
    return lines


def render_markdown(diff: dict, violations: list[dict], rules: list[Rule], old: str, new: str) -> str:
    """A report fit for a CI comment: verdict, a metric table, deployment and expert changes."""
    verdict = (f"**:x: {len(violations)} regression{'s' if len(violations) > 1 else ''}**" if violations
               else "**:white_check_mark: within thresholds**")
    lines = [f"### podplan diff: `{old}` → `{new}`", "",
             f"{verdict} (rules `{','.join(r.text for r in rules) or 'none'}`)", ""]
    if diff.get("unlike"):
        lines += [f"Unlike plans ({', '.join(diff['unlike'])}): only predictions are compared.", ""]
    serving = serving_line(diff["serving"])
    if serving:
        lines += [serving[0].upper() + serving[1:] + ".", ""]
    broken = {(v["phase"], v["metric"]) for v in violations}
    lines += ["| phase | metric | old | new | change |", "|---|---|---:|---:|---:|"]
    for name, ph in diff["phases"].items():
        if ph["status"] != "compared":
            lines.append(f"| {name} | phase {ph['status']} | | {ph['devices']} devices | |")
            continue
        lines.append(f"| {name} | devices | {ph['devices']['old']} | {ph['devices']['new']} | |")
        for p in ph["predictions"]:
            if p["metric"].startswith("breakdown."):
                continue
            bad = (name, _metric_of(p["metric"])) in broken
            lines.append(f"| {name} | {p['metric']} ({p['unit']}) | {_value(p['old'])} | {_value(p['new'])} | "
                         f"{_delta(p['delta_pct'])}{' :x:' if bad else ''} |")
        mark = " :x:" if (name, "memory") in broken else ""
        for m in ph["memory"]:
            lines.append(f"| {name} | memory {m['role']} (GB) | {_value(m['old_gb'])} | {_value(m['new_gb'])} | "
                         f"{_delta(m['delta_pct'])}{mark} |")
        f = ph["feasible"]
        mark = ":x:" if (name, "feasible") in broken else ""
        lines.append(f"| {name} | feasible | {f['old']} | {f['new']} | {mark} |")
    if "goodput" in diff:  # podplan diff --rate
        g, mark = diff["goodput"], " :x:" if (None, "goodput") in broken else ""
        lines.append(f"| plan | goodput at {g['rate']:g} req/s | {num(g['old']['goodput'])} | {num(g['new']['goodput'])} | "
                     f"{_delta(g['delta_pct'])}{mark} |")
    lines.append("")
    deploy = []
    for name, ph in diff["phases"].items():
        if ph["status"] != "compared":
            continue
        deploy += [f"- {name}: + instance `{i}`" for i in ph["instances"]["added"]]
        deploy += [f"- {name}: - instance `{i}`" for i in ph["instances"]["removed"]]
        for c in ph["instances"]["changed"]:
            deploy.append(f"- {name} `{c['id']}`: " + "; ".join(
                f"{x['field']} {_value(x['old'])} → {_value(x['new'])}" for x in c["changes"]))
    if deploy:
        lines += ["**Deployment changes**", "", *deploy, ""]
    rows = []
    for name, ph in diff["phases"].items():
        ex = ph.get("experts") if ph["status"] == "compared" else None
        if ex and ex["comparable"]:
            b = ex["balance"]
            rows.append(f"| {name} | {len(ex['layers'])} | {ex['moved']} | {ex['changed_slots']} | "
                        f"{human_bytes(ex['migration_bytes'])} | {_value(b['old'])} → {_value(b['new'])} |")
    if rows:
        header = "| phase | layers changed | moved experts | changed slots | migration | worst max/mean |"
        lines += ["**Expert placement**", "", header, "|---|---:|---:|---:|---:|---|", *rows, ""]
    stage_lines = _stage_lines(diff["stages"])
    if stage_lines:
        lines += ["**Stages**", "", *[f"- {line}" for line in stage_lines], ""]
    if violations:
        lines += ["**Regressions**", "", *[f"- `{v['rule']}`: {v['message']}" for v in violations], ""]
    return "\n".join(lines)


def goodput_line(g: dict) -> str:
    """`podplan diff --rate`: simulated goodput of both plans at one rate (planner.simulate.choose)."""
    return (f"goodput at {g['rate']:g} req/s (simulated {g['duration_s']:g} s, seed {g['seed']}): "
            f"{num(g['old']['goodput'])} -> {num(g['new']['goodput'])} req/s ({_delta(g['delta_pct'])})")


def _metric_of(key: str) -> str:
    return {"throughput_per_device": "throughput", "tpot_ms": "tpot", "ttft_ms": "ttft", "step_ms": "step"}.get(key, key)
