"""`podplan run PLAN.json`: execute a local:N plan on N processes and check it against the model."""

from __future__ import annotations

import argparse
import json
import sys

from costmodels.errors import InputError
from planner.console import stderr_console, stdout_console
from planner.plan import load_plan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a local:N plan on N processes (torch.distributed) and check it against the model")
    p.add_argument("plan", help="a plan written by `podplan compile` for --topology local:N")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="gloo (CPU processes, default) or nccl (one GPU per rank)")
    p.add_argument("--prompts", type=int, default=8, help="prompts generated in parallel (default 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt (seeded random ids; default 16)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated greedily per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    p.add_argument("--weights", metavar="PATH", help="safetensors file of the model's state_dict instead of seeded weights")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the monolithic model")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.errors import RankFailure
    from runtime.from_plan import spec_from_plan
    from runtime.launch import launch, validate
    from runtime.metrics import render, summarise
    from runtime.reference import check as check_run

    if args.timeout <= 0:
        raise InputError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    plan = load_plan(args.plan)
    spec = spec_from_plan(plan, prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          seed=args.seed, weights=args.weights, backend=args.backend)
    validate(spec)  # everything that can fail before a process starts: one line, exit 2
    err = stderr_console()
    err.print(f"running {spec.model} on {spec.world_size} ranks ({spec.backend}): {spec.prompts} prompts, "
              f"{spec.new_tokens} new tokens")
    try:
        outcome = launch(spec, timeout_s=args.timeout, validated=True)
    except RankFailure as exc:
        print(f"podplan run: error: {exc}", file=sys.stderr)
        return 1
    check = None
    if not args.no_check:
        err.print("checking against the monolithic transformers model")
        check = check_run(spec, outcome.tokens, outcome.logits)
    doc = summarise(spec, outcome.metrics, outcome.wall_s, check)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        render(doc, stdout_console())
    if check is not None and not check.ok:
        print(f"podplan run: check failed: {check.mismatches} token mismatches, max |logit diff| "
              f"{check.max_abs_diff:.2e} > {check.tolerance:.0e}", file=sys.stderr)
        return 1
    return 0
