"""The `flopcount` command line.

Each subcommand is one ``add_<name>(parser)`` function for its arguments and one
``cmd_<name>(args) -> exit code`` function, registered in ``COMMANDS``; adding a subcommand is
two functions and one table entry.

Exit codes: 0 success (``check``/``estimate``: below the threshold; ``verify``: every part
matches); 1 a finding (at or over the threshold; a part missing, altered or unlisted; a rank of
the job missing or unfinished, from ``summarize``, ``check``, ``estimate`` and ``verify``, which
name it on stderr or in their output; ``report`` lists it under integrity); 2 bad input
(missing or empty dir, corrupt or wrong-version trace, unknown base model, bad flags), reported
as one line on stderr without a traceback. ``run`` exits with its COMMAND's exit status
(128 + N when COMMAND died of signal N).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

EXIT_OK, EXIT_FINDING, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """Bad input found by the CLI itself (exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage dumps."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---- argument types ---------------------------------------------------------------------------

def flop_count(text: str) -> float:
    """A positive FLOP figure: '8.4e22', '84000000000000000000000'."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write FLOP like 8.4e22)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of FLOP")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def add_dir(parser) -> None:
    parser.add_argument("dir", help="a trace dir (meter(out=DIR)) or a project dir holding several runs")


def add_base_model(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--base-model", metavar="NAME",
                       help="base model id or alias from the registry (default: the one the run recorded)")
    group.add_argument("--base-model-flops", metavar="X", type=flop_count,
                       help="the base model's training compute in FLOP, when it is not in the registry")
    parser.add_argument("--systemic-risk", action="store_true", default=None,
                        help="the base model is a systemic-risk model (threshold 1e25/3 when its compute is unknown)")
    parser.add_argument("--approaching", metavar="F", type=fraction, default=0.8,
                        help="share of the threshold from which the status is 'approaching' (default 0.8)")


def add_json(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# ---- subcommands ------------------------------------------------------------------------------

def add_summarize(parser) -> None:
    add_dir(parser)
    add_json(parser)
    parser.add_argument("--module-depth", type=positive_int, metavar="N",
                        help="group modules by their first N name components")
    parser.add_argument("--top", type=positive_int, default=10, metavar="N", help="modules to list (text)")


def cmd_summarize(args) -> int:
    from .report.text import summary_text
    from .summary import summarize

    summary = summarize(args.dir, module_depth=args.module_depth)
    if args.json:
        print_json(summary)
    else:
        print(summary_text(summary, top=args.top))
    return EXIT_FINDING if report_rank_problems(summary) else EXIT_OK


def report_rank_problems(summary: dict) -> bool:
    """Name each missing or unfinished rank on stderr (the total then undercounts the job);
    True when there is one, which makes the command's exit code a finding."""
    for problem in summary["rank_problems"]:
        print(f"flopcount: integrity: {problem}", file=sys.stderr)
    return bool(summary["rank_problems"])


def checked_traces(args) -> tuple[dict, dict]:
    """(summary, threshold check) of the trace dir with the base-model options of check/estimate."""
    from .report.build import check_traces
    from .trace.reader import open_traces

    return check_traces(open_traces(args.dir), base_model=args.base_model, base_model_flops=args.base_model_flops,
                        systemic_risk=args.systemic_risk, approaching=args.approaching)


def add_check(parser) -> None:
    add_dir(parser)
    add_base_model(parser)
    add_json(parser)


def cmd_check(args) -> int:
    from .compliance.thresholds import verdict_line

    summary, result = checked_traces(args)
    if args.json:
        print_json({**result, "rank_problems": summary["rank_problems"]})
    else:
        print(verdict_line(result))
        if result["combined_flops"] is not None:
            print(f"base + modification: {result['text']['combined_flops']} against 1e25 FLOP: "
                  f"{result['combined_status']} (informational)")
    short = report_rank_problems(summary)  # the verdict is then a lower bound
    return EXIT_FINDING if result["status"] == "exceeds" or short else EXIT_OK


def add_estimate(parser) -> None:
    add_dir(parser)
    plan = parser.add_mutually_exclusive_group(required=True)
    plan.add_argument("--steps", type=positive_int, metavar="N", help="planned total steps of the run")
    plan.add_argument("--tokens", type=positive_int, metavar="T", help="planned total training tokens")
    add_base_model(parser)
    add_json(parser)


def cmd_estimate(args) -> int:
    from .compliance.forecast import forecast
    from .compliance.thresholds import threshold

    summary, result = checked_traces(args)
    limit, _ = threshold(result["base_model_flops"], result["systemic_risk"])
    span = (summary["end_time"] - summary["start_time"]) if summary["start_time"] is not None else None
    projection = forecast(summary["training_flops"], summary["steps"], threshold_flops=limit,
                          measured_tokens=summary["tokens"], planned_steps=args.steps, planned_tokens=args.tokens,
                          seconds_per_step=span / summary["steps"] if span and summary["steps"] else None,
                          approaching=args.approaching)
    projection.update(threshold_basis=result["threshold_basis"], threshold_basis_text=result["threshold_basis_text"],
                      base_model=result["base_model"])
    if args.json:
        print_json({**projection, "rank_problems": summary["rank_problems"]})
    else:
        print(_estimate_text(projection))
    short = report_rank_problems(summary)  # the projection is then a lower bound
    return EXIT_FINDING if projection["projected_status"] == "exceeds" or short else EXIT_OK


def _estimate_text(p: dict) -> str:
    from .compliance.thresholds import percent

    plan = f"{p['planned_steps']} steps" if p["planned_steps"] is not None else f"{p['planned_tokens']} tokens"
    lines = [f"measured: {p['measured_steps']} steps, {p['text']['flops_per_step']} per step",
             f"projected for {plan}: {p['text']['projected_training_flops']} = {percent(p['projected_ratio'])} of the "
             f"threshold {p['text']['threshold_flops']} ({p['threshold_basis_text']}): {p['projected_status']}"]
    if p["crosses_threshold"]:
        when = f"at step {p['crossing_step']}"
        if p["crossing_tokens"] is not None:
            when += f" (~{p['crossing_tokens']:.2g} tokens)"
        if p["crossing_after_s"] is not None:
            when += f", ~{p['crossing_after_s'] / 3600:.2g} h into the run at the measured pace"
        lines.append(f"the threshold would be crossed {when}")
    else:
        lines.append(f"the threshold would be crossed only after step {p['crossing_step']} "
                     f"({p['crossing_fraction_of_plan']:.2g}x the plan)")
    return "\n".join(lines)


def add_report(parser) -> None:
    from .report import RENDERERS

    add_dir(parser)
    parser.add_argument("--format", choices=sorted(RENDERERS), default="md", help="report format (default md)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the report here (default: stdout)")
    parser.add_argument("--form", choices=("audit", "cop"), default="audit",
                        help="audit: the audit report (default); cop: the Code of Practice Model Documentation Form's "
                             "compute, time, energy and methodology fields (md or json; docs/energy.md)")
    add_base_model(parser)
    from .hardware import DTYPES

    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--steps", type=positive_int, metavar="N",
                      help="planned total steps: forecast the date the threshold will be reached")
    plan.add_argument("--tokens", type=positive_int, metavar="T", help="planned total training tokens (same)")
    parser.add_argument("--dtype", choices=DTYPES, help="peak FLOP/s of the hardware cross-check (default bf16)")
    parser.add_argument("--utilisation", type=fraction, metavar="U",
                        help="utilisation assumed by the hardware cross-check (default 0.4)")


def cmd_report(args) -> int:
    from .report import RENDERERS, build_report
    from .report.cop import COP_RENDERERS, build_cop_report

    options = dict(base_model=args.base_model, base_model_flops=args.base_model_flops,
                   systemic_risk=args.systemic_risk, approaching=args.approaching, planned_steps=args.steps,
                   planned_tokens=args.tokens, dtype=args.dtype, utilisation=args.utilisation)
    if args.form == "cop":
        if args.format not in COP_RENDERERS:
            raise InputError(f"flopcount: --form cop writes {' or '.join(COP_RENDERERS)}, not {args.format}")
        report = build_cop_report(args.dir, **options)
        text, status = COP_RENDERERS[args.format](report), report["threshold"]["status"]
    else:
        report = build_report(args.dir, **options)
        text, status = RENDERERS[args.format](report), report["compliance"]["status"]
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise InputError(f"flopcount: cannot write {args.output}: {e.strerror}") from None
    print(f"wrote {args.output} ({args.format}; status {status})")
    return EXIT_OK


def add_verify(parser) -> None:
    add_dir(parser)
    add_json(parser)


def cmd_verify(args) -> int:
    from .distributed import rank_integrity
    from .trace.manifest import verify
    from .trace.reader import open_traces

    traces = open_traces(args.dir).traces
    checks = [verify(trace.storage) for trace in traces]
    for trace, check in zip(traces, checks):  # a rank that never wrote or never closed its trace
        check.problems += rank_integrity(trace.manifests)["rank_problems"]
    ok = all(c.ok for c in checks)
    if args.json:
        print_json([{"location": c.location, "ok": c.ok, "parts_checked": c.parts_checked, "signed": c.signed,
                     "digest": c.digest, "problems": c.problems} for c in checks])
    else:
        for c in checks:
            state = "ok" if c.ok else f"FAILED ({len(c.problems)} problem(s))"
            print(f"{c.location}: {c.parts_checked} parts, {state}" + (", HMAC-signed" if c.signed else "")
                  + (f", digest {c.digest}" if c.digest else ""))
            for problem in c.problems:
                print(f"  {problem}")
    return EXIT_OK if ok else EXIT_FINDING


def add_models(parser) -> None:
    add_json(parser)
    parser.add_argument("--file", metavar="PATH", action="append",
                        help="an organisation's model CSV (same columns, optional base_model/config) merged over "
                             "the shipped registry, like FLOPCOUNT_MODELS=PATH; repeatable")


def cmd_models(args) -> int:
    from .compliance.registry import base_models, extra_files
    from .compliance.thresholds import sig2

    models = base_models(extra_files() + tuple(args.file or ()))
    if args.json:
        print_json([m.as_dict() for m in models])
        return EXIT_OK
    width = max(len(m.hf_id) for m in models)
    print(f"{'model':<{width}}  {'training FLOP':>13}  {'method':<8}  systemic  source")
    for m in models:
        flop = sig2(m.training_flop) if m.training_flop is not None else "unknown"
        print(f"{m.hf_id:<{width}}  {flop:>13}  {m.method:<8}  {'yes' if m.systemic_risk else 'no':<8}  {m.source}")
    return EXIT_OK


def budget_value(text: str) -> float:
    """A budget: a fraction of the threshold in (0, 1] or a number of FLOP above 1."""
    value = flop_count(text)
    return int(value) if value > 1 and value == int(value) else value


def add_run(parser) -> None:
    parser.add_argument("--out", metavar="DIR", help="trace dir (default: flopcount-run-<UTC time>)")
    parser.add_argument("--base-model", metavar="NAME", help="base model id or alias from the registry")
    parser.add_argument("--base-model-flops", metavar="X", type=flop_count,
                        help="the base model's training compute in FLOP, when it is not in the registry")
    parser.add_argument("--strict", action="store_true", help="fail on any op without a formula")
    parser.add_argument("--backend", choices=("auto", "dispatch", "native"), default="auto",
                        help="capture backend (default auto)")
    parser.add_argument("--budget", metavar="B", type=budget_value,
                        help="stop before training compute would reach B: a fraction of the threshold "
                             "(0.5) or FLOP (1e21)")
    parser.add_argument("--budget-warn-at", metavar="F", type=fraction, default=0.8,
                        help="warn when compute reaches this share of the budget (default 0.8)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the program to meter, e.g. -- python train.py, -- torchrun ..., -- accelerate launch ...")


def cmd_run(args) -> int:
    import time

    from .integrations.launcher import run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    out = args.out or time.strftime("flopcount-run-%Y%m%d-%H%M%S", time.gmtime())
    if args.base_model:  # a typo is an error now, not after hours of training
        from .compliance.registry import lookup

        lookup(args.base_model)
    options = {"backend": args.backend, "base_model": args.base_model, "base_model_flops": args.base_model_flops,
               "strict": args.strict, "budget": args.budget, "budget_warn_at": args.budget_warn_at}
    return run(command, out, options)


def add_info(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")


def cmd_info(args) -> int:
    from .capture.native import describe

    facts = describe()
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    for key, value in facts.items():
        if value is not None:
            print(f"{key + ':':<22}{value}")
    return EXIT_OK


def add_plan(parser) -> None:
    from .planning.cli import add_arguments

    add_arguments(parser, add_base_model, positive_int, flop_count)


def cmd_plan(args) -> int:
    from .planning.cli import run

    return run(args, print_json)


# name -> (one-line help, add arguments, run). A new subcommand is one entry here.
COMMANDS = {
    "summarize": ("roll up a trace or project dir across steps, ranks and runs", add_summarize, cmd_summarize),
    "check": ("check training compute against the EU AI Act modification threshold", add_check, cmd_check),
    "estimate": ("project a run's total compute from measured steps and the plan", add_estimate, cmd_estimate),
    "report": ("write an audit report (json, md or html), or the Code of Practice form (--form cop)", add_report,
               cmd_report),
    "verify": ("check every trace part against the hash-chained manifest", add_verify, cmd_verify),
    "models": ("list the base-model registry (published training compute)", add_models, cmd_models),
    "run": ("meter an unmodified training command: flopcount run [--out DIR] -- python train.py", add_run, cmd_run),
    "plan": ("plan a fine-tune before it runs: one real training step of the model on the meta device, counted",
             add_plan, cmd_plan),
    "info": ("versions, the capture backend that backend='auto' picks, the native extension's build status",
             add_info, cmd_info),
}


def build_parser() -> Parser:
    parser = Parser(prog="flopcount", description="Operator-level FLOP traces and EU AI Act compute checks.",
                    epilog="exit codes: 0 ok / below threshold, 1 at or over threshold or integrity failure, "
                           "2 bad input")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .compliance.registry import UnknownBaseModel
    from .trace.storage import TraceError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceError, UnknownBaseModel, InputError) as e:
        message = str(e)
        sys.stderr.write(message if message.startswith("flopcount") else f"flopcount: {message}")
        sys.stderr.write("\n")
        return EXIT_BAD_INPUT
    except ValueError as e:  # flopcount's own input checks raise ValueError with a one-line message
        if not str(e).startswith("flopcount"):
            raise
        sys.stderr.write(f"{e}\n")
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
