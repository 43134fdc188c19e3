"""Plans are shared artefacts: a corpus of hostile plans through show, diff, export, replan and run.

Every plan here is schema-valid JSON that lies (about its model, its topology, its sizes) or carries
values meant to crash a command. Each must give one line and exit 2, or a harmless result: no
traceback, no file opened because the plan named it, nothing written outside the output asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from planner.cli.main import main
from planner.ir.plan import BUNDLED_FACTS_FILE, write_plan
from tests.conftest import error_lines
from tests.plan_factory import tiny_plan

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "plans" / "tiny-deepseek-v3.local-8.json"  # runnable: local:8
DSV3 = ROOT / "plans" / "deepseek-v3.cloudmatrix384.json"


def _phases(d: dict) -> list[dict]:
    return [d[p] for p in ("prefill", "decode") if d.get(p)]


def _dsv3_drops_an_expert(d: dict) -> None:
    """The probe's plan: 255 experts claimed, expert 255 remapped to 0 (every slot still 'valid')."""
    d["model"]["num_routed_experts"] = 255
    for ph in _phases(d):
        for ex in ph["experts"]:
            for lp in ex["layers"]:
                lp["phy2log"] = [0 if e == 255 else e for e in lp["phy2log"]]


def _decode_instance(**changes) -> Callable[[dict], None]:
    return lambda d: d["decode"]["instances"][0].update(changes)


# name -> (base plan, mutation, the fragment of the one line every command must print)
REFUSED: dict[str, tuple[Path, Callable[[dict], None], str]] = {
    "expert-removed": (DSV3, _dsv3_drops_an_expert, "plan.model.num_routed_experts: 255 but the bundled deepseek-v3 has 256"),
    "hidden-lie": (TINY, lambda d: d["model"].update(hidden=4096), "plan.model.hidden: 4096 but the bundled"),
    "layers-lie": (TINY, lambda d: d["model"].update(num_layers=4), "plan.stages: layer 3 has no stages"),
    "top-k-lie": (TINY, lambda d: d["model"].update(top_k=1), "plan.model.top_k"),
    "digest-lie": (TINY, lambda d: d["model"].update(config_sha256="0" * 64), "plan.model.config_sha256"),
    "expert-bytes-lie": (TINY, lambda d: d["model"].update(expert_bytes=1), "plan.model.expert_bytes"),
    "local8-claims-16": (TINY, lambda d: d["topology"].update(num_devices=16, devices_per_server=16),
                         "plan.topology.num_devices: 16, but local:8 has 8"),
    "topology-unknown": (TINY, lambda d: d["topology"].update(name="nowhere:8"), "plan.topology.name"),
    "topology-newline": (TINY, lambda d: d["topology"].update(name="local:8\n$(touch /tmp/podplan-pwned)"),
                         "is not allowed here: use letters"),
    # a plan names a model, it does not choose a file: a path is not a name
    "model-name-is-a-path": (TINY, lambda d: d["model"].update(name="/etc/hostname"), "is not allowed here: use letters"),
    "topology-hardware-lie": (TINY, lambda d: d["topology"].update(hardware="H100"), "plan.topology.hardware"),
    "quant-garbage": (TINY, lambda d: d["workload"].update(quant="garbage"), "plan.workload.quant"),
    "billion-devices": (TINY, lambda d: d["topology"].update(num_devices=10**9, devices_per_server=10**9),
                        "plan.topology.num_devices: 1000000000 must be <= 8192"),
    "trillion-experts": (TINY, lambda d: d["model"].update(num_routed_experts=10**12),
                         "plan.model.num_routed_experts"),
    "million-microbatches": (TINY, _decode_instance(microbatches=10**6), "microbatches: 1000000 must be <= 16"),
    "batch-1e308": (TINY, _decode_instance(batch_per_device=1e308), "batch_per_device: 1e+308 must be <="),
    "huge-slots": (TINY, lambda d: d["decode"]["experts"][0].update(slots_per_device=10**9), "slots_per_device"),
    "seed-negative": (TINY, lambda d: d["provenance"].update(seed=-1), "plan.provenance.seed: -1 must be >= 0"),
    "seed-2^32": (TINY, lambda d: d["provenance"].update(seed=2**32), "plan.provenance.seed: 4294967296 must be <="),
}

# name -> (mutation, what `replan` says; None: replan succeeds). show/diff/export/run --job-dir accept these.
LOADABLE: dict[str, tuple[Callable[[dict], None], str | None]] = {
    "time-limit-string": (lambda d: d["provenance"]["options"].update(time_limit="x"),
                          "plan.provenance.options.time_limit: 'x'"),
    "time-limit-inf": (lambda d: d["provenance"]["options"].update(time_limit=1e300), "time_limit"),
    "loads-file-path": (lambda d: d["provenance"]["options"].update(loads="/etc/hostname.npy"),
                        "podplan does not open files a plan names"),
    "replan-seed-string": (lambda d: d["provenance"]["options"].update(replans=[{"loads": "zipf:1.2", "seed": "x"}]),
                           "replans[0].seed"),
    "replan-seed-huge": (lambda d: d["provenance"]["options"].update(replans=[{"loads": "hot:1", "seed": 2**40}]),
                         "replans[0].seed"),
    "model-path-in-options": (lambda d: d["provenance"]["options"].update(model="/proc/self"), None),
    "largest-batch": (_decode_instance(batch_per_device=1e6), None),  # the bound itself stays usable
    "most-microbatches": (_decode_instance(microbatches=16), None),
    "longest-requests": (lambda d: d["workload"].update(input_len=1 << 24, output_len=1 << 24), None),
}


def _write(tmp: Path, name: str, base: Path, mutate: Callable[[dict], None]) -> Path:
    doc = json.loads(base.read_text())
    mutate(doc)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def _commands(plan: Path, base: Path, out: Path) -> dict[str, list[str]]:
    return {
        "show": ["show", str(plan)],
        "show-html": ["show", str(plan), "--format", "html", "-o", str(out / "view.html")],
        "diff": ["diff", str(base), str(plan)],
        "export": ["export", str(plan), "--format", "sglang", "-o", str(out / "export")],
        "replan": ["replan", str(plan), "--failed-devices", "5", "-o", str(out / "new.json")],
        "run": ["run", str(plan), "--job-dir", str(out / "job")],
    }


def _call(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_plan_is_one_line_and_exit_2_everywhere(case, capsys, tmp_path):
    base, mutate, fragment = REFUSED[case]
    plan = _write(tmp_path, case, base, mutate)
    out = tmp_path / "out"
    out.mkdir()
    for command, argv in _commands(plan, base, out).items():
        rc, stdout, err = _call(capsys, argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, (command, rc, err)
        assert fragment in lines[0] and str(plan) in lines[0], (command, lines[0])
        assert stdout == "", command
    assert list(out.iterdir()) == []  # nothing written
    assert not Path("/tmp/podplan-pwned").exists()


@pytest.mark.parametrize("case", list(LOADABLE))
def test_loadable_hostile_plan_is_harmless(case, capsys, tmp_path):
    mutate, replan_says = LOADABLE[case]
    plan = _write(tmp_path, case, TINY, mutate)
    out = tmp_path / "out"
    out.mkdir()
    for command, argv in _commands(plan, TINY, out).items():
        rc, _, err = _call(capsys, argv)
        if command == "replan" and replan_says is not None:
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and replan_says in lines[0], (rc, err)
            continue
        assert rc in (0, 1), (command, rc, err)  # diff: 1 is a regression verdict, not a failure
        assert "Traceback" not in err
        if command == "replan":
            # the plan's recorded model path is never opened: predictions are re-estimated from the name
            assert "cannot rebuild" not in err
    wrote = {"export", "view.html", "job"} | ({"new.json"} if replan_says is None else set())
    assert {p.name for p in out.iterdir()} == wrote  # the outputs asked for, and only by commands that succeeded


def test_every_limit_names_a_plan_field():
    import dataclasses

    from planner.ir import plan as plan_mod

    for cls_name, limits in plan_mod.LIMITS.items():
        cls = getattr(plan_mod, cls_name)
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(limits) <= names, f"LIMITS[{cls_name!r}] names fields {sorted(set(limits) - names)} it lacks"


def test_bundled_facts_file_is_up_to_date():
    from planner.golden import facts_text

    assert BUNDLED_FACTS_FILE.read_text() == facts_text(), "regenerate with `python -m planner.golden --write`"


def test_golden_plans_load(capsys):
    for path in sorted((ROOT / "plans").glob("*.json")):
        assert main(["show", str(path), "--format", "json", "-o", os.devnull]) == 0, capsys.readouterr().err


# --- diff: another model's experts are a regression unless allowed ---------------------------------


def test_incomparable_experts_are_a_regression_unless_allowed(capsys, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_plan(tiny_plan(), a)
    other = tiny_plan("tiny-deepseek-v3")  # MoE layers 1-2 instead of 0-1
    write_plan(other, b)
    rc, _, err = _call(capsys, ["diff", str(a), str(b)])  # another model: refused, not diffed device by device
    assert rc == 2 and "unlike plans (model tiny-mixtral -> tiny-deepseek-v3)" in err
    # two revisions of one (own, unbundled) model whose MoE layers moved: compared, and its experts cannot be
    for plan, path in ((tiny_plan(), a), (other, b)):
        write_plan(dataclasses.replace(plan, model=dataclasses.replace(plan.model, name="my-moe")), path)
    rc, out, _ = _call(capsys, ["diff", str(a), str(b), "--fail-on", "none"])
    assert rc == 1 and "comparable: decode experts: not comparable" in out and "--allow-incomparable" in out
    rc, out, _ = _call(capsys, ["diff", str(a), str(b), "--fail-on", "none", "--allow-incomparable"])
    assert rc == 0 and "within thresholds" in out
    rc, out, _ = _call(capsys, ["diff", str(a), str(b), "--fail-on", "none", "--json"])
    doc = json.loads(out)
    assert rc == 1 and {r["metric"] for r in doc["regressions"]} == {"experts"}
    rc, _, _ = _call(capsys, ["diff", str(a), str(a)])
    assert rc == 0


# --- values from the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["balance", "hot:inf", "--layers", "2", "--experts", "8"], "hot:K needs an integer"),
    (["balance", "hot:nan", "--layers", "2", "--experts", "8"], "hot:K needs an integer"),
    (["balance", "zipf:nan", "--layers", "2", "--experts", "8"], "zipf:S needs an exponent"),
    (["balance", "uniform", "--layers", "2", "--experts", "8", "--seed", "-1"], "--seed must be >= 0"),
    (["balance", "uniform", "--layers", "2", "--experts", "8", "--seed", str(2**32)], "--seed must be <= 4294967295"),
    (["balance", "uniform", "--layers", "2", "--experts", "8", "--time-limit", "nan"], "--time-limit must be a finite"),
    (["balance", "uniform", "--layers", "2", "--experts", "8", "--migration-slack", "inf"], "--migration-slack"),
])
def test_bad_balance_values_are_one_line(argv, fragment, capsys, tmp_path):
    rc, _, err = _call(capsys, argv + ["--devices", "2", "--slots-per-device", "5", "-o", str(tmp_path / "b.json")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err


def test_large_seeds_balance(capsys, tmp_path):
    """CP-SAT takes an int32 seed: 2**32 - 1 still solves (the solver gets seed mod 2**31)."""
    rc, _, err = _call(capsys, ["balance", "uniform", "--layers", "2", "--experts", "8", "--devices", "2",
                                "--slots-per-device", "5", "--seed", str(2**32 - 1), "-o", str(tmp_path / "b.json")])
    assert rc == 0, err


@pytest.mark.parametrize("flags, fragment", [
    (["--loads", "hot:inf"], "hot:K"),
    (["--seed", str(2**32)], "--seed must be <= 4294967295"),
    (["--time-limit", "inf"], "--time-limit must be a finite"),
])
def test_bad_replan_values_are_one_line(flags, fragment, capsys, tmp_path):
    rc, _, err = _call(capsys, ["replan", str(TINY), "--failed-devices", "5", *flags, "-o", str(tmp_path / "n.json")])
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err


def test_compile_refuses_non_finite_flags_and_huge_seeds(capsys, tmp_path):
    for flags, fragment in ((["--tpot-ms", "nan"], "--tpot-ms must be a finite"),
                            (["--seed", str(2**32)], "--seed must be <= 4294967295")):
        rc, _, err = _call(capsys, ["compile", "tiny-mixtral", "--topology", "local:8", *flags,
                                    "-o", str(tmp_path / "p.json")])
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


# --- plans of a user's config: the config comes from the command line, checked by digest ---------


@pytest.fixture()
def user_plan(tmp_path):
    """The tiny golden plan renamed to a model that is not bundled, and its config in a folder."""
    from planner.frontend.zoo import load_source

    cfg = tmp_path / "my-model"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(load_source("tiny-deepseek-v3").config))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(load_source("tiny-mixtral").config))
    plan = _write(tmp_path, "user", TINY, lambda d: d["model"].update(name="my-model"))
    return plan, cfg, other


def test_run_takes_a_user_config_from_the_command_line(user_plan, capsys, tmp_path):
    plan, cfg, other = user_plan
    rc, _, err = _call(capsys, ["run", str(plan), "--job-dir", str(tmp_path / "j0")])
    assert rc == 2 and "'my-model' is not a bundled model" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _call(capsys, ["run", str(plan), "--job-dir", str(tmp_path / "j1"), "--model-config", str(other)])
    assert rc == 2 and "digest is not the plan's model.config_sha256" in err, err
    rc, _, err = _call(capsys, ["run", str(plan), "--job-dir", str(tmp_path / "j2"), "--model-config", str(cfg)])
    assert rc == 0, err
    job = json.loads((tmp_path / "j2" / "job.json").read_text())
    assert job["model"] == str((cfg / "config.json").resolve())


def test_replan_takes_a_user_config_from_the_command_line(user_plan, capsys, tmp_path):
    plan, cfg, other = user_plan
    out = tmp_path / "n.json"
    rc, _, err = _call(capsys, ["replan", str(plan), "--failed-devices", "5", "--model-config", str(other),
                                "-o", str(out)])
    assert rc == 2 and "digest is not the plan's model.config_sha256" in err and not out.exists()
    rc, _, err = _call(capsys, ["replan", str(plan), "--failed-devices", "5", "--model-config", str(cfg),
                                "-o", str(out)])
    assert rc == 0 and "predictions kept" not in err, err


# --- `podplan run DIR`: what the ranks wrote is data too ----------------------------------------------


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("job") / "run"
    assert main(["run", str(TINY), "--job-dir", str(d)]) == 0
    return d


@pytest.mark.parametrize("name, content, fragment", [
    ("result.pt", b"not a torch file", "result.pt: not a result podplan wrote"),
    ("result.pt", b"", "result.pt: not a result podplan wrote"),
    ("rank0.error.json", b"{", "rank0.error.json: not an error report"),
    ("rank3.error.json", b"[1, 2]", "rank3.error.json: not an error report"),
    ("rank1.error.json", json.dumps({"secondary": False, "time": "x", "rank": 1, "message": "m"}).encode(),
     "rank1.error.json: not an error report"),
    ("job.json", b"[]", "is not a podplan job"),
])
def test_corrupt_run_outputs_are_one_line(job_dir, name, content, fragment, capsys):
    path = job_dir / name
    saved = path.read_bytes() if path.exists() else None
    path.write_bytes(content)
    try:
        rc, _, err = _call(capsys, ["run", str(job_dir), "--no-check"])
    finally:
        if saved is None:
            path.unlink()
        else:
            path.write_bytes(saved)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err


def test_a_torch_result_missing_keys_is_one_line(job_dir, capsys):
    import torch

    torch.save({"tokens": [1, 2]}, job_dir / "result.pt")
    try:
        rc, _, err = _call(capsys, ["run", str(job_dir), "--no-check"])
    finally:
        (job_dir / "result.pt").unlink()
    assert rc == 2 and "not a result podplan wrote" in err and len(err.strip().splitlines()) == 1, err


# --- time: pre-launch checks run under --timeout --------------------------------------------------------


def test_prelaunch_checks_run_under_the_timeout(capsys, monkeypatch):
    import runtime.launch

    def slow(*_args, **_kwargs):
        time.sleep(30)

    monkeypatch.setattr(runtime.launch, "validate", slow)
    t0 = time.monotonic()
    rc, _, err = _call(capsys, ["run", str(TINY), "--timeout", "0.5"])
    assert rc == 2 and "took longer than --timeout 0.5 s" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 10
    for bad in ("nan", "inf", "-1"):
        rc, _, err = _call(capsys, ["run", str(TINY), "--timeout", bad])
        assert rc == 2 and "--timeout must be in" in err, err


# --- Ctrl-C during start-up ------------------------------------------------------------------------------


# From 0.3 s on the interpreter runs podplan's imports (its own start-up, site and runpy, takes ~0.04 s
# here and cannot be handled by podplan); 1.0 and 2.5 s land in the command modules and the compile.
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_during_start_up_is_one_line(delay, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "p.json"
    proc = subprocess.Popen([sys.executable, "-m", "planner", "compile", "tiny-mixtral", "--topology", "local:8",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal: nothing to check
        return
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "Traceback" not in err and len(error_lines(err)) <= 1, err  # progress lines aside
    assert not out.exists()


def test_the_shipped_schema_publishes_every_limit():
    from planner.ir.plan import LIMITS, json_schema

    defs = json_schema()["$defs"]
    for cls, fields in LIMITS.items():
        for name, (low, high) in fields.items():
            prop = defs[cls]["properties"][name]
            prop = prop["anyOf"][0] if "anyOf" in prop else prop
            assert prop["maximum"] == high and prop.get("minimum") == low, (cls, name, prop)
