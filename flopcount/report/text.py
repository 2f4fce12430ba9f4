"""Plain-text summaries for terminals: the compliance summary (used by `make demo`) and the run summary."""
from __future__ import annotations

from ..compliance.thresholds import DEFAULT_APPROACHING, flop_text, sig2, verdict_line
from ..trace import manifest as mf
from ..trace.reader import open_traces
from .build import check_traces
from .cop import resource_lines


def compliance_summary(location, *, base_model=None, base_model_flops=None, systemic_risk=None,
                       approaching: float = DEFAULT_APPROACHING, use_recorded: bool = True) -> str:
    """A short, printable compliance summary of the traces at ``location`` (a trace or project dir)."""
    traces = open_traces(location)
    summary, result = check_traces(traces, base_model=base_model, base_model_flops=base_model_flops,
                                   systemic_risk=systemic_risk, approaching=approaching,
                                   use_recorded=use_recorded)
    checks = [mf.verify(t.storage) for t in traces.traces]
    excluded = summary["method"]["phases_excluded"]
    base = result["base_model"] or "not given"
    base += (f": {flop_text(result['base_model_flops'])} ({result['base_model_method']}; "
             f"{result['base_model_flops_source']})" if result["base_model_flops"] is not None
             else ": training compute unknown")
    lines = [
        f"flopcount compliance summary: {traces.location}",
        f"  runs                 {', '.join(traces.run_ids)} ({len(summary['ranks'])} rank(s), "
        f"{summary['steps']} steps, {summary['tokens'] if summary['tokens'] is not None else '?'} tokens)",
        f"  training compute     {flop_text(summary['training_flops'])} "
        f"({' + '.join(summary['training_phases'])})",
        "  excluded             " + (", ".join(f"{p} {sig2(summary['by_phase'].get(p, 0))}" for p in excluded)
                                      or "nothing"),
        "  uncounted ops        " + (", ".join(f"{op} x{n}" for op, n in summary["uncounted_ops"].items())
                                      or "none"),
        f"  base model           {base}",
        f"  threshold            {result['text']['threshold_flops']} = {result['threshold_basis_text']}",
        f"  status               {verdict_line(result, with_basis=False)}",
    ]
    if result["combined_flops"] is not None:
        lines.append(f"  base + modification  {result['text']['combined_flops']} against 1e25 FLOP: "
                     f"{result['combined_status']} (informational)")
    verified = all(c.ok for c in checks)
    lines.append(f"  integrity            {sum(c.parts_checked for c in checks)} parts "
                 f"{'verified' if verified else 'FAILED verification: run `flopcount verify`'}"
                 + (f", manifest digest {checks[0].digest[:16]}" if len(checks) == 1 and checks[0].digest else ""))
    return "\n".join(lines)


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
    return "\n".join(lines)


compliance_text = compliance_summary  # the name demo/finetune.py imports from flopcount.report
