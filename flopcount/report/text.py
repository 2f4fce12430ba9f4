"""Plain-text summaries for terminals: the compliance summary (used by `make demo`) and the run summary."""
from __future__ import annotations

from ..compliance.thresholds import DEFAULT_APPROACHING, verdict_line
from .build import build_report
from .cop import resource_lines
from .escape import printable
from .format import flop_text, sig2


def integrity_state(integrity: dict) -> str:
    """An integrity result (trace/integrity.py ``as_dict()``, or the report's block) in words:
    "verified" only when it is, the key only when one was checked, the notes (facts that are not
    findings), and the digest to keep (``flopcount verify --digest``)."""
    if integrity["verified"]:
        state = "verified" + (f", signed by {integrity['signed_by']}" if integrity["signed_by"] else "")
    else:
        state = f"NOT verified ({len(integrity['problems'])} problem(s): run `flopcount verify`)"
    state += "".join(f"; {note}" for note in integrity.get("notes", []))
    return printable(f"{state}; digest {integrity['digest'] or '-'}")


def integrity_line(integrity: dict) -> str:
    return f"integrity: {integrity_state(integrity)}"


def compliance_summary(location, *, base_model=None, base_model_flops=None, systemic_risk=None,
                       approaching: float = DEFAULT_APPROACHING, use_recorded: bool = True, **integrity_options) -> str:
    """A short, printable compliance summary of the traces at ``location`` (a trace or project dir).
    ``integrity_options``: ``digest``, ``public_key``, ``ledger`` of the integrity check."""
    return report_summary(build_report(location, base_model=base_model, base_model_flops=base_model_flops,
                                       systemic_risk=systemic_risk, approaching=approaching,
                                       use_recorded=use_recorded, **integrity_options))


def report_summary(report: dict) -> str:
    """The compliance summary of a built audit report (report/build.py): what `flopcount run` prints."""
    result, totals, method = report["compliance"], report["totals"], report["method"]
    runs = report["project"]["runs"]
    excluded = method["phases_excluded"]
    by_phase = report["breakdowns"]["by_phase"]
    base = result["base_model"] or "not given"
    base += (f": {flop_text(result['base_model_flops'])} ({result['base_model_method']}; "
             f"{result['base_model_flops_source']})" if result["base_model_flops"] is not None
             else ": training compute unknown")
    integrity = report["integrity"]
    lines = [
        f"flopcount compliance summary: {report['project']['location']}",
        f"  runs                 {', '.join(sorted({r['run_id'] for r in runs}))} "
        f"({len({rank for r in runs for rank in r['ranks']})} rank(s), "
        f"{totals['steps']} steps, {totals['tokens'] if totals['tokens'] is not None else '?'} tokens)",
        f"  training compute     {flop_text(totals['training_flops'])} "
        f"({' + '.join([p for p in method['phases_included'] if by_phase.get(p)] or method['phases_included'])})",
        "  excluded             " + (", ".join(f"{p} {sig2(by_phase.get(p, 0))}" for p in excluded) or "nothing"),
        "  uncounted ops        " + (", ".join(f"{op} x{n}" for op, n in method["uncounted_ops"].items())
                                      or "none"),
        f"  base model           {base}",
        f"  threshold            {result['text']['threshold_flops']} = {result['threshold_basis_text']}",
        f"  status               {verdict_line(result, with_basis=False)}",
    ]
    if result["combined_flops"] is not None:
        lines.append(f"  base + modification  {result['text']['combined_flops']} against 1e25 FLOP: "
                     f"{result['combined_status']} (informational)")
    lines.append(f"  integrity            {integrity['parts_checked']} parts checked: {integrity_state(integrity)}")
    lines += [f"    problem: {p}" for p in integrity["problems"]]
    return "\n".join(map(printable, lines))  # run ids, module names, paths: no control characters


def summary_text(summary: dict, top: int = 10) -> str:
    """A human-readable `flopcount summarize` output."""
    total = summary["hardware_flops"] or 1
    run = summary["run_id"] if isinstance(summary["run_id"], str) else ", ".join(summary["run_id"] or [])
    lines = [
        f"run(s)            {run}: {len(summary['ranks'])} rank(s) of world size {summary['world_size']}, "
        f"{summary['steps']} steps, tokens {summary['tokens']}, samples {summary['samples']}",
        f"training FLOP     {sig2(summary['training_flops'])} ({summary['training_flops']:,})",
        f"hardware FLOP     {sig2(summary['hardware_flops'])} ({summary['hardware_flops']:,})",
        "by phase          " + ", ".join(f"{p} {sig2(f)}" for p, f in summary["by_phase"].items()),
        "by category       " + ", ".join(f"{c} {sig2(f)}" for c, f in summary["by_category"].items() if f),
        "excluded phases   " + ", ".join(summary["excluded_phases"]),
        "uncounted ops     " + (", ".join(f"{op} x{n}" for op, n in summary["uncounted_ops"].items()) or "none"),
        "dark modules      " + (", ".join(f"{m} ({c})" for m, c in summary.get("dark_modules", {}).items()) or "none"),
        *resource_lines(summary),
        f"top modules (of {len(summary['by_module'])}):",
    ]
    lines += [f"  {f / total:6.1%}  {sig2(f):>8}  {name}" for name, f in list(summary["by_module"].items())[:top]]
    if "compliance" in summary:
        lines.append("compliance        " + verdict_line(summary["compliance"]))
    return "\n".join(map(printable, lines))  # run ids, module names, paths: no control characters


compliance_text = compliance_summary  # the name demo/finetune.py imports from flopcount.report
