"""Every rank's communication program, and the dry run that rejects a deadlock before any process starts.

`programs(spec, moe_layers)` lists, per rank, the collectives and point-to-point transfers it issues,
in issue order. Workers check each operation they issue against this list, so the dry run replays
exactly what will run. The dry run executes all programs with blocking semantics (an operation
completes only when every participant has reached it), which is stricter than the asynchronous
execution: a schedule that passes it cannot hang on a missing partner or a collective-order mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import SpecError
from runtime.spec import RunSpec, kv_routes, steps_of

WORLD = "world"


@dataclass(frozen=True)
class Op:
    """One communication: a collective on `group`, or a send/recv with `peer`; `key` names what it carries."""

    kind: str  # "coll", "send", "recv"
    key: str
    group: str = ""
    peer: int = -1

    def __str__(self) -> str:
        if self.kind == "coll":
            return f"{self.key} on group {self.group}"
        return f"{self.kind} {self.key} {'to' if self.kind == 'send' else 'from'} rank {self.peer}"


def layer_ops(inst: str, step: int, layer: int, mb: int, part: str) -> Op:
    return Op("coll", f"step {step} layer {layer} mb {mb} {part}", group=inst)


def programs(spec: RunSpec, moe_layers: list[int]) -> dict[int, list[Op]]:
    """rank -> its operations in issue order (mirrors worker.RankWorker.run)."""
    progs: dict[int, list[Op]] = {r: [] for r in range(spec.world_size)}
    routes = kv_routes(spec)
    for inst in spec.instances:
        for rank in inst.ranks:
            prog = progs[rank]
            if inst.phases == ("decode",):
                prog += [Op("recv", "kv", peer=src) for src, dst, _ in routes if dst == rank]
            for step in steps_of(spec, inst):
                for layer in moe_layers:
                    for mb in range(inst.microbatches):
                        prog.append(layer_ops(inst.name, step, layer, mb, "dispatch"))
                    for mb in range(inst.microbatches):
                        prog.append(layer_ops(inst.name, step, layer, mb, "combine"))
            if inst.phases == ("prefill",):
                prog += [Op("send", "kv", peer=dst) for src, dst, _ in routes if src == rank]
    for prog in progs.values():
        prog.append(Op("coll", "gather results", group=WORLD))
    return progs


def dry_run(progs: dict[int, list[Op]], groups: dict[str, tuple[int, ...]]) -> int:
    """Replay all programs; return the number of operations matched, or raise SpecError naming the stuck ranks."""
    groups = {WORLD: tuple(sorted(progs)), **groups}
    pc = {r: 0 for r in progs}
    matched = 0

    def head(r: int) -> Op | None:
        return progs[r][pc[r]] if pc[r] < len(progs[r]) else None

    progress = True
    while progress:
        progress = False
        for r in sorted(progs):
            op = head(r)
            if op is None:
                continue
            if op.kind == "coll":
                members = groups[op.group]
                heads = {m: head(m) for m in members}
                if all(h == op for h in heads.values()):
                    for m in members:
                        pc[m] += 1
                    matched += 1
                    progress = True
                    continue
                _check_order(op, r, heads)
            else:
                want = Op("recv" if op.kind == "send" else "send", op.key, peer=r)
                if op.peer in progs and head(op.peer) == want:
                    pc[r] += 1
                    pc[op.peer] += 1
                    matched += 1
                    progress = True
    stuck = [r for r in sorted(progs) if head(r) is not None]
    if stuck:
        waits = "; ".join(f"rank {r} waits at {head(r)}" for r in stuck[:4])
        more = f" (+{len(stuck) - 4} more ranks)" if len(stuck) > 4 else ""
        raise SpecError(f"dry run: deadlock: {waits}{more}; the ranks' communication orders disagree (a runtime bug "
                        "or an inconsistent spec)")
    return matched


def _check_order(op: Op, rank: int, heads: dict[int, Op | None]) -> None:
    """Two members of a group at different collectives of that group: they would hang or mix data."""
    for m, h in heads.items():
        if h is not None and h.kind == "coll" and h.group == op.group and h != op:
            raise SpecError(f"dry run: collective order mismatch on group {op.group}: rank {rank} issues "
                            f"'{op.key}' while rank {m} issues '{h.key}'; every member must issue the group's "
                            "collectives in the same order")
