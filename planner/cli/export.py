"""`podplan export PLAN.json --format sglang|vllm|vllm-ascend|trtllm|eplb -o DIR`: engine files and launch scripts."""

from __future__ import annotations

import argparse

from planner.export.registry import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a plan's expert placement and launch scripts for SGLang, vLLM, vllm-ascend, TensorRT-LLM or EPLB",
        description=(
            "One folder per phase shape (prefill, decode, ...) with the engine's expert-placement file and a "
            "launch.sh holding its parallel sizes, redundant experts and EP flags, plus DIR/manifest.json. "
            "What an engine cannot express is said on stderr, one line each, with the fallback used."
        ),
    )
    p.add_argument("plan", metavar="PLAN.json", help="plan written by `podplan compile` or `podplan replan`")
    p.add_argument("--format", required=True, choices=FORMATS, help="engine format")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder to write (replaced when it holds an earlier podplan export)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.cli.console import stderr_console, stdout_console
    from planner.export import export_plan, write_export
    from planner.ir.fileio import check_output_path
    from planner.ir.plan import load_plan
    from planner.cli.args import single_hardware

    check_output_path(args.output, flag="-o", folder=True)  # DIR may be missing; its parent must exist
    plan = load_plan(args.plan)
    single_hardware("export", plan, args.plan, "engines launch one kind of hardware per deployment file")
    export = export_plan(plan, args.format, plan_file=args.plan)
    write_export(export, args.output)
    err = stderr_console()
    for note in export.notes:
        err.print(f"podplan export --format {args.format}: {note}", soft_wrap=True, markup=False)
    out = stdout_console()
    folders = sorted({rel.split("/")[0] for rel in export.files if "/" in rel})
    out.print(f"wrote {len(export.files)} files for {args.format} to {args.output}: {', '.join(folders)} "
              f"(+ manifest.json)")
    return 0
