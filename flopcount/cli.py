"""The `flopcount` command line.

Each subcommand is one ``add_<name>(parser)`` function for its arguments and one
``cmd_<name>(args) -> exit code`` function, registered in ``COMMANDS``; adding a subcommand is
two functions and one table entry.

Exit codes (the same for every command; README "Exit codes"): 0 success (``check``/``estimate``:
below the threshold; the traces verify); 1 a finding: at or over the threshold, or traces that do
not verify -- every command that reads traces runs ``verify``'s one integrity check
(trace/integrity.py) and exits 1 whenever ``verify`` would, naming each problem on stderr
(``report`` still writes its report); 2 bad input (missing or empty dir, malformed manifest or
Parquet part, unknown schema version or base model, bad flag values, unwritable output), one
line on stderr without a traceback (errors.py: exit codes by exception type). ``run`` exits
with its COMMAND's exit status (128 + N when COMMAND died of signal N; 1 when COMMAND succeeded
but its trace does not verify, or under ``--strict`` records a dark module or an uncounted op).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import BadInput

EXIT_OK, EXIT_FINDING, EXIT_BAD_INPUT = 0, 1, 2


class InputError(BadInput):
    """Bad input found by the CLI itself (exit 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage dumps."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---- argument types ---------------------------------------------------------------------------

MAX_COUNT = 2**63 - 1  # steps, tokens: the trace's int64 range


def _shown(text: str) -> str:
    """A flag value for a one-line message (a 400-digit number is cut)."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def finite_number(text: str) -> float:
    """A finite float written as a number; ArgumentTypeError naming the value otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a finite number")
    return value


def flop_count(text: str) -> float:
    """A FLOP figure from 1 to 1e40: '8.4e22', '84000000000000000000000'."""
    from .compliance.thresholds import MAX_FLOP, MIN_FLOP

    try:
        value = finite_number(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (write FLOP like 8.4e22)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{_shown(text)} must be a positive, finite number of FLOP")
    if value < MIN_FLOP:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is less than one FLOP (write FLOP like 8.4e22)")
    if value > MAX_FLOP:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is more than 1e40 FLOP (write FLOP like 8.4e22)")
    return value


def positive_int(text: str) -> int:
    """A whole number from 1 to 2**63 - 1, also written as 1e6 (but not 1.5)."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a whole number") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{_shown(text)} must be at least 1")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is larger than 2**63 - 1")
    return int(value)


def fraction(text: str) -> float:
    value = finite_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{_shown(text)} must be in (0, 1]")
    if value < sys.float_info.min:  # subnormal: no share of anything is meant by it
        raise argparse.ArgumentTypeError(f"{_shown(text)} is too small (a share in (0, 1] like 0.8)")
    return value


def add_dir(parser) -> None:
    parser.add_argument("dir", help="a trace dir (meter(out=DIR)) or a project dir holding several runs")


def add_base_model(parser) -> None:
    from .compliance.thresholds import DEFAULT_APPROACHING

    group = parser.add_mutually_exclusive_group()
    group.add_argument("--base-model", metavar="NAME",
                       help="base model id or alias from the registry (default: the one the run recorded)")
    group.add_argument("--base-model-flops", metavar="X", type=flop_count,
                       help="the base model's training compute in FLOP, when it is not in the registry")
    parser.add_argument("--systemic-risk", action="store_true", default=None,
                        help="the base model is a systemic-risk model (threshold 1e25/3 when its compute is unknown)")
    parser.add_argument("--approaching", metavar="F", type=fraction, default=DEFAULT_APPROACHING,
                        help=f"share of the threshold from which the status is 'approaching' (default "
                             f"{DEFAULT_APPROACHING})")


def add_json(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# ---- subcommands ------------------------------------------------------------------------------

def add_summarize(parser) -> None:
    add_dir(parser)
    add_json(parser)
    add_integrity_options(parser)
    parser.add_argument("--module-depth", type=positive_int, metavar="N",
                        help="group modules by their first N name components")
    parser.add_argument("--top", type=positive_int, default=10, metavar="N", help="modules to list (text)")


def cmd_summarize(args) -> int:
    from .errors import findings_first
    from .report.text import integrity_state, summary_text
    from .summary import summarize_traces
    from .trace.reader import open_traces

    traces = open_traces(args.dir)
    integrity = integrity_of(traces, args)
    with findings_first(integrity, traces.location):
        summary = summarize_traces(traces, module_depth=args.module_depth)
    if args.json:
        print_json({**summary, "integrity": integrity.as_dict()})
    else:
        print(summary_text(summary, top=args.top))
        print(f"integrity         {integrity_state(integrity_facts(integrity))}")
    return EXIT_FINDING if report_integrity(integrity) else EXIT_OK


# ---- integrity: every consumer runs the one check that verify runs (trace/integrity.py) ---------

def digest_value(text: str) -> str:
    """A trace digest as printed by verify, check, summarize, report and `flopcount run`."""
    if not 16 <= len(text) <= 128 or not all(c.isalnum() or c in ":-_" for c in text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a trace digest (copy the one `flopcount verify` "
                                         "printed)")
    return text


def readable_file(text: str) -> str:
    import os

    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return text


def add_integrity_options(parser) -> None:
    """--digest, --public-key, --ledger: the options of the integrity check (docs/traces.md)."""
    group = parser.add_argument_group("integrity (the same check as `flopcount verify`; docs/traces.md)")
    group.add_argument("--digest", metavar="D", type=digest_value,
                       help="the trace digest recorded earlier (end of the run, a report, a ledger): a finding "
                            "unless the traces still have it (nothing removed or rolled back)")
    group.add_argument("--public-key", metavar="FILE", type=readable_file,
                       help="Ed25519 public key (flopcount-verify.pem): check every entry's signature")
    group.add_argument("--ledger", metavar="PATH",
                       help="append-only digest log kept outside the trace dir: check against its last entry")


def integrity_of(traces, args):
    """check_integrity of opened traces with the command's integrity options."""
    from .trace.integrity import check_integrity

    return check_integrity(traces, digest=args.digest, public_key=args.public_key, ledger=args.ledger)


def integrity_facts(integrity) -> dict:
    """The integrity result for text output: the JSON block and the notes."""
    return {**integrity.as_dict(), "notes": list(integrity.notes)}


def report_integrity(integrity) -> bool:
    """Name each integrity problem on stderr; True when the traces do not verify (exit code 1)."""
    from .errors import printable

    for problem in integrity.problems:
        print(f"flopcount: integrity: {printable(problem)}", file=sys.stderr)
    return not integrity.verified


def checked_traces(args):
    """(summary, threshold check, integrity) of the trace dir with the options of check/estimate."""
    from .errors import findings_first
    from .compliance.check import check_traces
    from .trace.reader import open_traces

    traces = open_traces(args.dir)
    integrity = integrity_of(traces, args)
    with findings_first(integrity, traces.location):
        summary, result = check_traces(traces, base_model=args.base_model, base_model_flops=args.base_model_flops,
                                       systemic_risk=args.systemic_risk, approaching=args.approaching)
    return summary, result, integrity


def add_check(parser) -> None:
    add_dir(parser)
    add_base_model(parser)
    add_json(parser)
    add_integrity_options(parser)


def cmd_check(args) -> int:
    from .compliance.thresholds import verdict_line
    from .errors import printable
    from .report.text import integrity_line

    summary, result, integrity = checked_traces(args)
    if args.json:
        print_json({**result, "rank_problems": summary["rank_problems"], "integrity": integrity.as_dict()})
    else:
        print(printable(verdict_line(result)))
        if result["combined_flops"] is not None:
            print(f"base + modification: {result['text']['combined_flops']} against 1e25 FLOP: "
                  f"{result['combined_status']} (informational)")
        print(integrity_line(integrity_facts(integrity)))
    unverified = report_integrity(integrity)  # the verdict then rests on evidence that does not verify
    return EXIT_FINDING if result["status"] == "exceeds" or unverified else EXIT_OK


def add_estimate(parser) -> None:
    add_dir(parser)
    plan = parser.add_mutually_exclusive_group(required=True)
    plan.add_argument("--steps", type=positive_int, metavar="N", help="planned total steps of the run")
    plan.add_argument("--tokens", type=positive_int, metavar="T", help="planned total training tokens")
    add_base_model(parser)
    add_json(parser)
    add_integrity_options(parser)


def cmd_estimate(args) -> int:
    from .compliance.forecast import forecast
    from .compliance.thresholds import threshold
    from .report.text import integrity_line

    summary, result, integrity = checked_traces(args)
    limit, _ = threshold(result["base_model_flops"], result["systemic_risk"])
    span = (summary["end_time"] - summary["start_time"]) if summary["start_time"] is not None else None
    projection = forecast(summary["training_flops"], summary["steps"], threshold_flops=limit,
                          measured_tokens=summary["tokens"], planned_steps=args.steps, planned_tokens=args.tokens,
                          seconds_per_step=span / summary["steps"] if span and summary["steps"] else None,
                          approaching=args.approaching)
    projection.update(threshold_basis=result["threshold_basis"], threshold_basis_text=result["threshold_basis_text"],
                      base_model=result["base_model"])
    if args.json:
        print_json({**projection, "rank_problems": summary["rank_problems"], "integrity": integrity.as_dict()})
    else:
        print(_estimate_text(projection))
        print(integrity_line(integrity_facts(integrity)))
    unverified = report_integrity(integrity)  # the projection then rests on evidence that does not verify
    return EXIT_FINDING if projection["projected_status"] == "exceeds" or unverified else EXIT_OK


def _estimate_text(p: dict) -> str:
    from .report.format import percent
    from .errors import printable

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
    return "\n".join(map(printable, lines))


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
    add_integrity_options(parser)


def cmd_report(args) -> int:
    from .report import RENDERERS, build_report
    from .report.cop import COP_RENDERERS, build_cop_report
    from .errors import printable
    from .report.text import integrity_line

    options = dict(base_model=args.base_model, base_model_flops=args.base_model_flops,
                   systemic_risk=args.systemic_risk, approaching=args.approaching, planned_steps=args.steps,
                   planned_tokens=args.tokens, dtype=args.dtype, utilisation=args.utilisation,
                   digest=args.digest, public_key=args.public_key, ledger=args.ledger)
    if args.form == "cop":
        if args.format not in COP_RENDERERS:
            raise InputError(f"flopcount: --form cop writes {' or '.join(COP_RENDERERS)}, not {args.format}")
        report = build_cop_report(args.dir, **options)
        text, status = COP_RENDERERS[args.format](report), report["threshold"]["status"]
    else:
        report = build_report(args.dir, **options)
        text, status = RENDERERS[args.format](report), report["compliance"]["status"]
    integrity = report["integrity"]
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise InputError(f"flopcount: cannot write {args.output}: {e.strerror}") from None
        print(f"wrote {args.output} ({args.format}; status {status})")
        print(integrity_line(integrity))
    for problem in integrity["problems"]:
        print(f"flopcount: integrity: {printable(problem)}", file=sys.stderr)
    return EXIT_OK if integrity["verified"] else EXIT_FINDING


def add_verify(parser) -> None:
    add_dir(parser)
    add_json(parser)
    add_integrity_options(parser)


def cmd_verify(args) -> int:
    from .errors import printable
    from .trace.reader import open_traces

    traces = open_traces(args.dir)
    integrity = integrity_of(traces, args)
    if args.json:
        print_json({"location": traces.location, **integrity.as_dict(), "parts_checked": integrity.parts_checked,
                    "notes": list(integrity.notes)})
    else:
        state = "verified" if integrity.verified else f"NOT verified: {len(integrity.problems)} problem(s)"
        print(f"{printable(traces.location)}: {integrity.parts_checked} parts checked, {state}"
              + (f", signed by {integrity.signed_by}" if integrity.signed_by else ""))
        print(f"digest {integrity.digest or '-'}")
        for note in integrity.notes:  # facts that are not findings: "signatures present, not checked"
            print(f"  note: {printable(note)}")
        for problem in integrity.problems:
            print(f"  {printable(problem)}")
    return EXIT_OK if integrity.verified else EXIT_FINDING


def add_models(parser) -> None:
    add_json(parser)
    parser.add_argument("--file", metavar="PATH", action="append",
                        help="an organisation's model CSV (same columns, optional base_model/config) merged over "
                             "the shipped registry, like FLOPCOUNT_MODELS=PATH; repeatable")


def cmd_models(args) -> int:
    from .compliance.registry import base_models, extra_files
    from .report.format import sig2

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
    value = finite_number(text)
    if value <= 1:
        try:
            return fraction(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{_shown(text)} must be a fraction of the threshold in (0, 1] "
                                             "or a number of FLOP above 1") from None
    value = flop_count(text)
    return int(value) if value == int(value) else value


def add_run(parser) -> None:
    from .config import cli_options  # the meter's options, listed once (MeterConfig)

    kinds = {"flops": flop_count, "budget": budget_value, "fraction": fraction}
    for name, default, spec in cli_options():
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind is not None:
            spec["type"] = kinds[kind]
        if spec.get("action") is None and default is not None:
            spec["default"] = default
        parser.add_argument("--" + name.replace("_", "-"), **spec)
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
    from .config import cli_options

    options = {name: getattr(args, name) for name, _, _ in cli_options() if name != "out"}
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


def add_keys(parser) -> None:
    parser.add_argument("action", choices=("new",), help="new: create an Ed25519 key pair")
    parser.add_argument("keydir", metavar="KEYDIR", help="directory for flopcount-signing.pem (private, mode 600) "
                        "and flopcount-verify.pem (public)")


def cmd_keys(args) -> int:
    from .trace.keys import SIGNING_KEY_ENV, new_keys

    private, public, key_id = new_keys(args.keydir)
    print(f"private key  {private} (mode 600: keep it with whoever operates the meter, not with the traces)")
    print(f"public key   {public} (give it to auditors: flopcount verify DIR --public-key {public})")
    print(f"key id       {key_id}")
    print(f"sign runs with {SIGNING_KEY_ENV}={private} or flopcount.meter(..., signing_key=...)")
    return EXIT_OK


BUILD_LOCK_WAIT_S = 900.0  # several builds' time (1.5-6 min each on two cores): only a stuck holder lasts longer


def add_build_native(parser) -> None:
    parser.add_argument("--wait", type=seconds, default=BUILD_LOCK_WAIT_S, metavar="SECONDS",
                        help=f"wait at most this long for a build another process holds the lock for "
                             f"(default {BUILD_LOCK_WAIT_S:g}); past it exit 1 naming the lock and its holder")
    parser.epilog = ("Builds into FLOPCOUNT_NATIVE_CACHE (default ~/.cache/flopcount/native), keyed by the torch "
                     "installation, compiler, flags, source and Python ABI; waits for a build another process runs, "
                     "at most --wait seconds. Exit 0 when the extension loads, 1 otherwise (the dispatch backend "
                     "is then used).")


def seconds(text: str) -> float:
    value = finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{_shown(text)} must be a number of seconds >= 0")
    return value


def cmd_build_native(args) -> int:
    from .capture.native import build

    return build(args.wait)  # loads the built library and says so (or why not, in one line)


def add_plan(parser) -> None:
    from .planning.cli import add_arguments

    add_arguments(parser, add_base_model, positive_int, flop_count)


def cmd_plan(args) -> int:
    import logging

    from .planning.cli import run

    # bitsandbytes warns at import, on CPUs with AVX512-BF16, that it could not fetch an optional
    # hub kernel (which a plan never runs): stderr keeps to the plan's own one-line messages.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return run(args, print_json)  # the planner raises BadInput for bad input (exit 2 by type)


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
    "keys": ("create the Ed25519 key pair that signs manifests: flopcount keys new KEYDIR", add_keys, cmd_keys),
    "plan": ("plan a fine-tune before it runs: one real training step of the model on the meta device, counted",
             add_plan, cmd_plan),
    "info": ("versions, the capture backend that backend='auto' picks, the native extension's build status",
             add_info, cmd_info),
    "build-native": ("build the native capture extension now (for images and shared caches)", add_build_native,
                     cmd_build_native),
}


def build_parser() -> Parser:
    parser = Parser(prog="flopcount", description="Operator-level FLOP traces and EU AI Act compute checks.",
                    epilog="exit codes: 0 ok / below threshold, 1 at or over threshold or the traces do not "
                           "verify, 2 bad input")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FlopcountError, IntegrityError, exit_code, one_line, printable

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FlopcountError as e:  # by type (errors.EXIT_CODES): one line, no traceback
        code = exit_code(e)
        if code is None:
            raise  # a kind the command line does not expect: keep its traceback
        if isinstance(e, IntegrityError):  # traces that do not verify and could not be read either
            for problem in e.problems:
                sys.stderr.write(f"flopcount: integrity: {printable(problem)}\n")
        sys.stderr.write(one_line(e) + "\n")
        return code
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
