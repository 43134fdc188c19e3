"""Hostile names in a plan never run as code in an exported script, and the loader refuses them.

Plans are shared artefacts (CI, pull requests): a model name, instance id, topology or hardware name
holding a newline, `$(...)`, backticks, quotes or a triple quote must stay data. Two layers: the plan
loader refuses such names (one line naming the JSON path), and the exporters quote every value anyway,
shown here on plans built around the loader.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import jinja2
import pytest
import yaml

import planner.export as ex
from planner.ir.errors import PlanError
from planner.export.render import comment, environment
from planner.ir import plan as ir
from planner.ir.plan import from_json, load_plan
from tests.conftest import ROOT, assert_one_line_error, run_cli
from tests.plan_factory import tiny_plan

# the commands the exported scripts exec (engines, sglang_router and the P/D proxy through python3)
ENGINE_COMMANDS = ("python3", "vllm", "trtllm-llmapi-launch", "trtllm-serve")


def _payloads(canary: Path) -> list[str]:
    """Each would create `canary` if it ran in a shell or in Python."""
    c = str(canary)
    return [
        f"m\n touch {c}",
        f"m$(touch {c})",
        f"m`touch {c}`",
        f"m'; touch {c}; '",
        f'm"; touch {c}; "',
        f'm"""\nimport os; os.system("touch {c}")\n"""',
        f"m'''\nimport os; os.system('touch {c}')\n'''",
        f"m\r\n$(touch {c})\\",
    ]


def _bypass(node, **fields):
    """A copy of a frozen plan node with `fields` set, skipping validation (as a hand-edited file would
    look to an exporter if the loader let it through)."""
    out = copy.copy(node)
    for key, value in fields.items():
        object.__setattr__(out, key, value)
    return out


def _hostile(name: str):
    plan = tiny_plan()
    phases = {p: _bypass(phase, instances=tuple(_bypass(inst, id=f"{name}-{p}{i}")
                                                for i, inst in enumerate(phase.instances)))
              for p, phase in plan.phases.items()}
    return _bypass(plan, model=_bypass(plan.model, name=name),
                   topology=_bypass(plan.topology, name=name, kind=name), **phases)


def _run_launch(script: Path, stubs: Path, log: Path) -> list[str]:
    """Run launch.sh with the engine command replaced by a stub that records its arguments."""
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(stubs), "INSTANCE": "0", "NODE_RANK": "0"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30,
                          cwd=script.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(log.read_text())


@pytest.fixture
def stubs(tmp_path: Path) -> tuple[Path, Path]:
    folder, log = tmp_path / "bin", tmp_path / "argv.json"
    folder.mkdir()
    for name in ENGINE_COMMANDS:
        stub = folder / name
        stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c '
                        f'"import json, sys; json.dump(sys.argv[1:], open({str(log)!r}, \'w\'))" "$@"\n')
        stub.chmod(0o755)
    return folder, log


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_hostile_names_stay_data_in_every_format(fmt, tmp_path, stubs):
    canary = tmp_path / "pwned"
    folder, log = stubs
    for k, name in enumerate(_payloads(canary)):
        plan = _hostile(name)
        export = ex.export_plan(plan, fmt, plan_file=name + ".json")
        out = tmp_path / f"{fmt}-{k}"
        ex.write_export(export, out)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["plan"]["model"] == name  # data files carry the name as JSON data
        for group in manifest["groups"]:
            files = {Path(f).name for f in group["files"]}
            assert files == set(ex.EXPORTERS[fmt].files)
            root = out / group["name"]
            if "launch.sh" in files:
                script = root / "launch.sh"
                assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
                # in comments the name is escaped onto its line: it cannot end the comment
                header = script.read_text().splitlines()[1]
                assert header.startswith("# podplan export") and comment(name) in header
                argv = _run_launch(script, folder, log)
                assert name in argv  # the model reached the engine as one argument, verbatim
            if "moe_load_balancer.py" in files:
                source = (root / "moe_load_balancer.py").read_text()
                tree = ast.parse(source)
                compile(source, "moe_load_balancer.py", "exec")
                consts = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
                          if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
                assert consts["MODEL"] == name
                kinds = [type(n).__name__ for n in tree.body]
                assert kinds == ["Expr", "Import", "ImportFrom", "Try"] + ["Assign"] * 5 + ["FunctionDef", "If"]
            if "extra_llm_api_options.yaml" in files:
                doc = yaml.safe_load((root / "extra_llm_api_options.yaml").read_text())
                assert set(doc) <= {"enable_attention_dp", "moe_config", "cache_transceiver_config",
                                    "disable_overlap_scheduler"}
        # the tiny plan's prefill and decode sit on separate devices: the serving files join them
        for rel in manifest["serve"]:
            script = out / rel
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
            assert comment(name) in script.read_text().splitlines()[1]
            env = {"PATH": f"{folder}:/usr/bin:/bin", "HOME": str(folder), "PROXY_SCRIPT": "proxy.py",
                   "PREFILL_URLS": "p:1", "DECODE_URLS": "d:1", "PREFILL_HOSTS": "p", "DECODE_HOSTS": "d",
                   "CONTEXT_URLS": "p:1", "GENERATION_URLS": "d:1"}
            proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
        assert not canary.exists(), f"{fmt}: payload {name!r} ran"
    # hardware no spec sheet names is refused before anything is rendered
    odd = _bypass(tiny_plan(), topology=_bypass(tiny_plan().topology, hardware=f"GPU\n$(touch {canary})"))
    with pytest.raises(PlanError, match=r"^plan\.topology\.hardware: .* re-compile the plan$"):
        ex.export_plan(odd, fmt)


def test_templates_refuse_unquoted_strings():
    env = environment()
    assert env.from_string("{{ x|sh }} {{ n }}").render(x="a b", n=3) == "'a b' 3"
    with pytest.raises(TypeError, match="unquoted"):
        env.from_string("run {{ x }}").render(x="$(id)")
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ missing|sh }}").render()


def _doc_with(path: tuple, value: str) -> str:
    doc = json.loads(tiny_plan().to_json())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize("path, shown", [
    (("model", "name"), "plan.model.name"),
    (("topology", "name"), "plan.topology.name"),
    (("topology", "kind"), "plan.topology.kind"),
    (("topology", "hardware"), "plan.topology.hardware"),
])
def test_loader_refuses_hostile_names(path, shown, tmp_path):
    for name in _payloads(tmp_path / "pwned") + ["", "-rf", "a b", "../etc", "x" * 129, "é"]:
        if path[-1] == "hardware" and name == "a b":
            continue  # spec-sheet names have single spaces ("H100 SXM")
        with pytest.raises(PlanError) as err:
            from_json(_doc_with(path, name))
        message = str(err.value)
        assert message.startswith(f"{shown}: ") and "\n" not in message, message


def test_loader_refuses_hostile_instance_ids_and_cli_says_one_line(tmp_path):
    doc = json.loads(tiny_plan().to_json())
    doc["decode"]["instances"][0]["id"] = "d$(touch x)"
    plan_file = tmp_path / "hostile.json"
    plan_file.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"plan\.decode\.instances\[0\]\.id: "):
        load_plan(plan_file)
    assert_one_line_error(run_cli("export", str(plan_file), "--format", "sglang", "-o", str(tmp_path / "out")),
                          "plan.decode.instances[0].id")
    assert not (tmp_path / "out").exists()


def test_golden_and_bundled_names_load():
    from planner.frontend.zoo import BUNDLED
    from costmodels.hardware import DEVICES

    for path in sorted((ROOT / "plans").glob("*.json")):
        load_plan(path)
    name_rule = typing.get_args(ir.Name)[1]  # what the loader checks model names against
    for name in BUNDLED:
        assert re.fullmatch(name_rule.regex, name) and len(name) <= name_rule.max_length, name
    label_rule = typing.get_args(ir.Label)[1]
    for spec in DEVICES.values():
        assert re.fullmatch(label_rule.regex, spec.name) and len(spec.name) <= label_rule.max_length, spec.name


def test_trust_remote_code_only_where_the_engine_lacks_the_code():
    golden = load_plan(ROOT / "plans" / "deepseek-v3.cloudmatrix384.json")
    for fmt in ("sglang", "vllm", "vllm-ascend"):
        for rel, data in ex.export_plan(golden, fmt).files.items():
            if rel.endswith("launch.sh"):
                assert b"--trust-remote-code" not in data, (fmt, rel)
    kimi = load_plan(ROOT / "plans" / "kimi-k2.cloudmatrix384.json")  # its tokenizer is repository code
    launch = ex.export_plan(kimi, "sglang").files["decode/launch.sh"].decode()
    assert "\n  --trust-remote-code \\\n" in launch


def test_unknown_format_is_one_line(tmp_path):
    plan_file = tmp_path / "tiny.json"
    plan_file.write_text(tiny_plan().to_json())
    assert_one_line_error(run_cli("export", str(plan_file), "--format", "tensorflow", "-o", str(tmp_path / "o")),
                          "tensorflow", *ex.FORMATS)
    with pytest.raises(Exception, match="unknown format 'x'; use one of sglang, vllm"):
        ex.export_plan(tiny_plan(), "x")
