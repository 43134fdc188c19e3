"""Parse every exported launch script with the engine's own argument parser.

    PYTHONPATH=. .venv/bin/python bench/engine_args.py                 # golden plans, every engine found
    PYTHONPATH=. /path/to/engine-venv/bin/python bench/engine_args.py --plans plans/mixtral-8x22b.h100-cluster-2.json

Exports each plan (default: plans/*.json) as sglang, vllm and vllm-ascend into a temporary folder, runs
every launch.sh (each instance's first and last node) and the P/D serving scripts with stub engine
commands that record their argv, and hands each argv to the engine's parser in this interpreter:

  sglang        `python3 -m sglang.launch_server ...` -> argparse with sglang.srt.server_args.ServerArgs.add_cli_args
  sglang-router `python3 -m sglang_router.launch_router ...` -> the router's own argument parser
  vllm          `vllm serve MODEL ...` -> vLLM's `serve` sub-command parser (vllm-ascend scripts too:
                vllm-ascend is a plugin of the same CLI)

Parsing checks flag names, value types and choices (e.g. --quantization modelslim, --attention-backend
ascend, the JSON of --eplb-config / --additional-config / --kv-transfer-config); it does not start the
engine, so checks that need devices (ServerArgs.__post_init__, vLLM's config validation) are not run.
TensorRT-LLM's trtllm-serve (a click CLI in a CUDA-only wheel) is not checked here.

Prints the version of each engine checked and one line per script; an engine that is not installed is
one "not installed" line and the run still exits 0. Exit status 1 when any script fails to parse.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import planner.export as ex  # noqa: E402  (after the path line: the script runs from anywhere)
from planner.ir.plan import load_plan  # noqa: E402

COMMANDS = ("python3", "vllm", "trtllm-llmapi-launch", "trtllm-serve")
FORMATS = ("sglang", "vllm", "vllm-ascend")
# values the serving scripts need to run (addresses are placeholders: nothing is contacted)
SERVE_ENV = {"ASCEND_MF_STORE_URL": "tcp://127.0.0.1:24666", "PROXY_SCRIPT": "proxy.py"}


class ParseError(Exception):
    """An engine parser refused an argument list."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ParseError(message)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def sglang_parser() -> Callable[[list[str]], None]:
    from sglang.srt.server_args import ServerArgs

    parser = _Parser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)

    def parse(argv: list[str]) -> None:
        parser.parse_args(argv)

    return parse


def router_parser() -> Callable[[list[str]], None]:
    from sglang_router import launch_router

    def parse(argv: list[str]) -> None:
        original = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = _Parser.error  # type: ignore[method-assign]
        try:
            launch_router.parse_router_args(argv)
        finally:
            argparse.ArgumentParser.error = original  # type: ignore[method-assign]

    return parse


def vllm_parser() -> Callable[[list[str]], None]:
    try:  # vLLM >= 0.11 keeps its argparse helpers in vllm.utils.argparse_utils
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    # building the parser fills defaults from VllmConfig, which asks for the current platform: on a host
    # without accelerators vLLM finds none unless told to use its CPU platform (parsing needs no device)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.serve import ServeSubcommand

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ParseError(message)

    parser = Parser(prog="vllm")
    subparsers = parser.add_subparsers(parser_class=Parser)
    ServeSubcommand().subparser_init(subparsers)

    def parse(argv: list[str]) -> None:
        parser.parse_args(argv)

    return parse


# engine -> (distribution whose version is reported, parser factory)
ENGINES: dict[str, tuple[str, Callable[[], Callable[[list[str]], None]]]] = {
    "sglang": ("sglang", sglang_parser),
    "sglang-router": ("sglang-router", router_parser),
    "vllm": ("vllm", vllm_parser),
}


def _engine_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """Which engine an exec'd command line is for, and the arguments its parser takes."""
    cmd, args = argv[0], argv[1:]
    if cmd == "python3" and args[:2] == ["-m", "sglang.launch_server"]:
        return "sglang", args[2:]
    if cmd == "python3" and args[:2] == ["-m", "sglang_router.launch_router"]:
        return "sglang-router", args[2:]
    if cmd == "vllm":
        return "vllm", args
    return None  # the P/D proxies are scripts of the engines' source trees; trtllm-serve: see the docstring


def _stubs(folder: Path, log: Path) -> dict[str, str]:
    folder.mkdir()
    for name in COMMANDS:
        stub = folder / name
        stub.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                        f"\"import json, sys; json.dump([{name!r}] + sys.argv[1:], open({str(log)!r}, 'w'))\" \"$@\"\n")
        stub.chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin", "HOME": str(folder)}


def _argvs(out: Path, env: dict[str, str], log: Path) -> list[tuple[str, list[str]]]:
    """(script label, argv it exec'd) for every launch.sh node tested and every serving script."""
    manifest = json.loads((out / "manifest.json").read_text())
    runs: list[tuple[str, dict[str, str]]] = []
    for group in manifest["groups"]:
        script = f"{group['name']}/launch.sh"
        if script not in group["files"]:
            continue
        text = (out / script).read_text()
        nodes = text.count(") VISIBLE=") // len(group["instances"])  # node table rows of one instance
        for node in sorted({0, nodes - 1}):
            runs.append((script, {"INSTANCE": "0", "NODE_RANK": str(node)}))
    prefill = sum(len(g["instances"]) for g in manifest["groups"] if g["phase"] == "prefill")
    decode = sum(len(g["instances"]) for g in manifest["groups"] if g["phase"] == "decode")
    for rel in manifest.get("serve", []):
        runs.append((rel, {"PREFILL_URLS": " ".join(f"http://p{i}:30000" for i in range(prefill)),
                           "DECODE_URLS": " ".join(f"http://d{i}:30000" for i in range(decode)),
                           "PREFILL_HOSTS": " ".join(f"p{i}" for i in range(prefill)),
                           "DECODE_HOSTS": " ".join(f"d{i}" for i in range(decode))}))
    out_argvs = []
    for rel, extra in runs:
        log.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(out / rel)], env={**env, **SERVE_ENV, **extra}, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"engine_args: {out / rel} exited {proc.returncode}: {proc.stderr.strip()}")
        label = f"{rel} node {extra['NODE_RANK']}" if "NODE_RANK" in extra else rel
        out_argvs.append((label, json.loads(log.read_text())))
    return out_argvs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="*", type=Path, default=sorted((ROOT / "plans").glob("*.json")))
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    args = ap.parse_args()

    parsers: dict[str, Callable[[list[str]], None] | None] = {}
    for engine, (dist, factory) in ENGINES.items():
        version = _version(dist)
        if version is None:
            print(f"{engine}: not installed in {sys.executable}; its scripts are not checked")
            parsers[engine] = None
            continue
        try:
            parsers[engine] = factory()
        except ImportError as exc:
            print(f"{engine} {version}: installed but its parser does not import ({exc}); not checked")
            parsers[engine] = None
            continue
        print(f"{engine} {version}: checking with its own parser")

    failures = checked = 0
    with tempfile.TemporaryDirectory(prefix="engine_args.") as tmp:
        root = Path(tmp)
        env = _stubs(root / "bin", root / "argv.json")
        for plan_path in args.plans:
            plan = load_plan(plan_path)
            for fmt in args.formats:
                out = root / f"{plan_path.stem}.{fmt}"
                ex.write_export(ex.export_plan(plan, fmt, plan_file=plan_path.name), out)
                for label, argv in _argvs(out, env, root / "argv.json"):
                    found = _engine_of(argv)
                    if found is None or parsers.get(found[0]) is None:
                        continue
                    engine, engine_args = found
                    parse = parsers[engine]
                    assert parse is not None
                    checked += 1
                    try:
                        parse(engine_args)
                    except ParseError as exc:
                        failures += 1
                        print(f"FAIL {plan_path.name} {fmt} {label}: {engine} refuses: {exc}")
                    else:
                        print(f"ok   {plan_path.name} {fmt} {label}")
    print(f"{checked} command lines parsed, {failures} refused")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
