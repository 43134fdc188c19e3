"""`podplan run PLAN.json`: execute a local:N (CPU) or h100:N/h200:N (this host's GPUs) plan and check it
against the model.

With --job-dir the plan is only validated and written as a job for torchrun (one host or many);
`podplan run DIR` then reports and checks what that run wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator

from costmodels.errors import InputError
from costmodels.hardware import device_named
from planner.cli.console import stderr_console, stdout_console
from planner.ir.fileio import check_output_path
from planner.ir.plan import load_plan
from planner.cli.args import single_hardware

# A week: beyond this --timeout is a typo, and setitimer would overflow on absurd values.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a local:N (CPU) or h200:N/h100:N (GPU) plan here and check it against the model")
    p.add_argument("plan", help="a plan written by `podplan compile` for --topology local:N or h200:N/h100:N, or a --job-dir "
                                "that torchrun has run (report and check its result)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto (default: nccl for an h100:N/h200:N plan, or when this host has a CUDA GPU per rank; "
                        "gloo otherwise), gloo (CPU processes) or nccl (one GPU per rank)")
    p.add_argument("--no-graphs", action="store_true",
                   help="nccl: run every step eagerly (no static buffers, no CUDA graphs), for debugging")
    p.add_argument("--capacity-factor", type=float, metavar="F",
                   help="dispatch blocks hold F x the mean rows per expert device (default: the worst case, "
                        "which never overflows); an overflow fails the run and names the layer")
    p.add_argument("--prompts", type=int, default=8, help="prompts generated in parallel (default 8)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt (seeded random ids; default 16)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated greedily per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    p.add_argument("--weights", metavar="PATH", help="safetensors file of the model's state_dict instead of seeded weights")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the monolithic model")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--model-config", metavar="PATH",
                   help="config.json (or its folder) of a plan compiled from your own config; checked against the "
                        "plan's config digest (a plan's model name is never opened as a file)")
    p.add_argument("--job-dir", metavar="DIR", help="validate, write DIR/job.json and print the torchrun command "
                                                   "instead of starting processes here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.errors import RankFailure
    from runtime.from_plan import spec_from_plan
    from runtime.launch import launch, validate
    from runtime.torchrun import collect, command, is_job_dir, read_spec, write_job

    if args.capacity_factor is not None and not 0 < args.capacity_factor <= 1e6:
        raise InputError(f"--capacity-factor must be > 0, got {args.capacity_factor:g}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise InputError(f"--timeout must be in (0, {MAX_TIMEOUT_S}] seconds, got {args.timeout:g}")
    if args.job_dir:
        check_output_path(args.job_dir, flag="--job-dir", folder=True)
    if is_job_dir(args.plan):
        if args.job_dir:
            raise InputError(f"{args.plan} is already a job directory; --job-dir takes a plan file")
        spec = read_spec(args.plan)
        try:
            outcome = collect(args.plan)
        except RankFailure as exc:
            print(f"podplan run: error: {exc}", file=sys.stderr)
            return 1
        return _report(args, spec, outcome)
    started = time.monotonic()
    with _deadline(args.timeout):  # a crafted plan must not make the checks outlast --timeout
        plan = load_plan(args.plan)
        single_hardware("run", plan, args.plan, "run one group's plan on its hardware")
        spec = spec_from_plan(plan, prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                              seed=args.seed, weights=args.weights, backend=args.backend,
                              model_config=args.model_config, graphs=not args.no_graphs,
                              capacity_factor=args.capacity_factor)
        if device_named(plan.topology.hardware).nominal:
            spec = dataclasses.replace(spec, predictions=_without_timings(spec.predictions, plan.topology.hardware))
        else:
            spec = dataclasses.replace(spec, predictions=_for_this_run(plan, args))
        # everything that can fail before a process starts: one line, exit 2; with --job-dir the ranks
        # may run on other hosts: check the job, not this machine
        validate(spec, on_this_host=not args.job_dir)
    err = stderr_console()
    if args.job_dir:
        job = write_job(spec, args.job_dir)
        err.print(f"wrote {job} ({spec.world_size} ranks, {spec.backend})")
        print(command(spec, job))
        err.print(f"then: podplan run {args.job_dir}   (report and check; the job dir must be rank 0's)")
        return 0
    err.print(f"running {spec.model} on {spec.world_size} ranks ({spec.backend}): {spec.prompts} prompts, "
              f"{spec.new_tokens} new tokens")
    left = args.timeout - (time.monotonic() - started)
    try:
        outcome = launch(spec, timeout_s=max(left, 1.0), validated=True)
    except RankFailure as exc:
        print(f"podplan run: error: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # SIGTERM / SIGHUP: launch stopped the ranks and removed its run folder
        print(f"podplan run: terminated (exit {exc.code}); ranks stopped", file=sys.stderr)
        raise
    return _report(args, spec, outcome)


class _Overrun(BaseException):
    """Raised by the alarm when the pre-launch checks outlast --timeout (a BaseException: no `except
    Exception` on the way may swallow it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise an InputError if the block runs longer than `seconds` (SIGALRM; the CLI's main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(_signum: int, _frame: object) -> None:
        raise _Overrun()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Overrun:
        raise InputError(f"the checks before launch took longer than --timeout {seconds:g} s; the plan is too "
                         "large to run here (or raise --timeout)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _for_this_run(plan, args: argparse.Namespace) -> dict:
    """The cost model's numbers for the run's workload (not the plan's design batch), so they compare."""
    from planner.run_predictions import run_predictions

    return run_predictions(plan, prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                           model=args.model_config)


def _without_timings(predictions: dict, hardware: str) -> dict:
    """The plan's predictions less its times and rates: on nominal hardware (a `local:N` CPU process)
    the cost model has no measured figures, so they describe no machine; bytes still compare."""
    out = dict(predictions)
    for phase in ("prefill", "decode"):
        if isinstance(out.get(phase), dict):
            out[phase] = {k: v for k, v in out[phase].items()
                          if k not in ("step_ms", "tpot_ms", "ttft_ms", "throughput_per_device", "breakdown")}
    out["timing_note"] = (f"the plan's times are not predictions for this host: its hardware ({hardware}) has "
                          "nominal figures in the cost model; only bytes moved compare")
    return out


def _report(args: argparse.Namespace, spec, outcome) -> int:
    """Check against the monolithic model (unless --no-check), print the tables or JSON, exit 1 on a mismatch."""
    from runtime.metrics import render, summarise
    from runtime.reference import check as check_run

    check = None
    if not args.no_check:
        stderr_console().print("checking against the monolithic transformers model")
        check = check_run(spec, outcome.tokens, outcome.logits)
    doc = summarise(spec, outcome.metrics, outcome.wall_s, check)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        render(doc, stdout_console())
    if check is not None and check.inconclusive:
        print(f"podplan run: check inconclusive: two stock transformers implementations of this model (eager and SDPA "
              f"attention) already differ beyond the tolerance at {check.noisy} of {check.pairs} (prompt, step) pairs, "
              "so its seeded bf16 weights cannot tell a fault from rounding; check with a checkpoint (--weights) or "
              "fewer layers (--model-config with num_hidden_layers lowered)", file=sys.stderr)
        return 1
    if check is not None and not check.ok:
        print(f"podplan run: check failed: the run parts from the monolithic model at {check.outside} (prompt, step) "
              f"pairs ({check.mismatches} token mismatches, max |logit diff| {check.max_abs_diff:.2e}, tolerance "
              f"{check.tolerance:.0e}); allowed: {2 * check.noisy}, twice the pairs where stock transformers parts "
              "from itself", file=sys.stderr)
        return 1
    return 0
