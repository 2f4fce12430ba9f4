"""The Code of Practice export (`flopcount report --form cop`), with the notification timing of
compliance/notification.py.

The GPAI Code of Practice (transparency chapter) asks providers to fill in a Model Documentation
Form. A team that becomes the provider of a modified model documents the modification; this
module pre-fills the part of the form that flopcount measured -- model dependency (the base
model, field 1.6), training time, amount of computation, measurement methodology, training
energy -- and marks every other field the user must supply. It never fills a field with a
number it did not measure.

The notification timing (Art. 52(1): two weeks from the day the threshold is reached, or known to
be reached) is compliance/notification.py's; its names stay importable from here.
"""
from __future__ import annotations

import datetime as dt
import json

from ..compliance.check import check_traces
from ..compliance.notification import (  # noqa: F401  (also imported from here)
    NOTIFICATION_DAYS, NOTIFICATION_RULE, crossing_time, crossing_time_of_traces, expected_crossing_time,
    notification_of, notification_timing)
from ..compliance.thresholds import DEFAULT_APPROACHING
from ..errors import findings_first
from ..hardware import ASSUMED_UTILISATION, DEFAULT_DTYPE, recheck
from ..trace.integrity import check_integrity
from ..trace.reader import open_traces
from .checks import integrity_block, integrity_fields
from .escape import markdown_text as _cell
from .format import iso_time, sci2  # noqa: F401  (sci2 also imported from here)

COP_SCHEMA = "flopcount.cop-form/1"
MEASURED, PREFILLED, PARTIAL, TO_SUPPLY = "measured", "pre-filled", "measured, incomplete", "to supply"
GENERAL, COMPUTE, ENERGY = ("General information", "Computational resources (training)",
                            "Energy consumption (training and inference)")


# ---- the form ---------------------------------------------------------------------------------

def _field(section: str, number: str | None, name: str, value, text: str | None, status: str, source: str | None,
           note: str | None = None) -> dict:
    return {"section": section, "number": number, "field": name, "value": value, "text": text, "status": status,
            "source": source, "note": note}


def _dependency_field(compliance: dict) -> dict:
    base = compliance.get("base_model")
    if not base:
        return _field(GENERAL, "1.6", "Model dependencies", None, None, TO_SUPPLY, None,
                      "name the base model(s) this modification starts from (no base model was recorded)")
    flops = compliance.get("base_model_flops")
    note = (f"base model training compute {sci2(flops)} FLOP ({compliance.get('base_model_flops_source') or 'given'})"
            if flops is not None else "base model training compute not published")
    return _field(GENERAL, "1.6", "Model dependencies", base, f"{base} (modified by fine-tuning)", PREFILLED,
                  "the base model recorded with the run (flopcount.meter(base_model=...)), resolved in "
                  "flopcount's base-model registry", note + "; add the version if several were placed on the market")


def _time_field(time: dict | None) -> dict:
    name = "Training time"
    if not time or time.get("wall_clock_days") is None:
        return _field(COMPUTE, None, name, None, None, TO_SUPPLY, None, "no step times recorded")
    devices = ", ".join(f"{count} x {device}" for device, count in time["devices"].items()) or "not recorded"
    wall, hardware = time["wall_clock_days"], time.get("hardware_days")
    text = f"{sci2(wall)} days wall-clock"
    if hardware is not None:
        text += f"; {sci2(hardware)} hardware-days ({devices})"
        return _field(COMPUTE, None, name, {"wall_clock_days": wall, "hardware_days": hardware,
                                            "devices": time["devices"]}, text, MEASURED, time.get("source"))
    return _field(COMPUTE, None, name, {"wall_clock_days": wall, "hardware_days": None, "devices": time["devices"]},
                  text, PARTIAL, time.get("source"), "hardware-days: supply the number of devices and their type")


def _compute_field(summary: dict) -> dict:
    flops = summary["training_flops"]
    note = f"exact count: {flops:,} FLOP"
    split = summary.get("method", {}).get("training_split")
    if split:
        phases = ", ".join(f"{p} {sci2(f)}" for p, f in split["no_grad_phases"].items()) or "none"
        note += (f"; gradient work (forward, backward, optimizer) {sci2(split['gradient_work'])} FLOP, no-grad "
                 f"training work {sci2(split['no_grad_training_work'])} FLOP ({phases}): "
                 f"{summary['method'].get('no_grad_reason', '')}")
    return _field(COMPUTE, None, "Amount of computation used for training", flops, f"{sci2(flops)} FLOP",
                  MEASURED, "flopcount operator count (training phases; see the measurement methodology)", note)


def _method_field(summary: dict) -> dict:
    method = summary.get("method", {})
    excluded = "; ".join(f"{p}: {why}" for p, why in method.get("phases_excluded", {}).items()) or "none"
    text = (f"{method.get('estimation_method', 'operator counting (flopcount)')}. Phases included: "
            f"{', '.join(method.get('phases_included', []))}. Excluded: {excluded}. {method.get('uncertainty', '')}.")
    check = summary.get("hardware_estimate") or {}
    if check.get("available"):
        text += (f" Cross-check ({check['method']}, {check['dtype']} peak): {sci2(check['estimate_flops'])} FLOP at an "
                 f"assumed utilisation of {check['utilisation_assumed']:.0%}; the counted figure implies a utilisation "
                 f"(MFU) of {check['implied_utilisation']:.1%}.")
    elif check:
        text += f" Hardware-based cross-check unavailable: {check.get('reason')}."
    text += (f" Tools: flopcount {method.get('flopcount_version')}, torch {method.get('torch_version')}; "
             f"conventions in {method.get('conventions_doc', 'docs/conventions.md')}.")
    return _field(COMPUTE, None, "Measurement methodology (computation)", None, text, PREFILLED,
                  "flopcount method statement", "review and extend with anything flopcount did not see "
                  "(e.g. training outside the metered runs)")


def _energy_field(energy: dict | None) -> dict:
    name = "Amount of energy used for training"
    if not energy or energy.get("total_mwh") is None:
        return _field(ENERGY, None, name, None, None, TO_SUPPLY, None,
                      "no energy figure was measured (no NVML energy counter or readable RAPL); supply the "
                      "known or estimated energy in MWh")
    value = energy["total_mwh"]
    status = MEASURED if energy.get("complete") else PARTIAL
    note = energy.get("coverage")
    if status == PARTIAL:
        note += "; confirm or replace with the complete figure"
    return _field(ENERGY, None, name, value, f"{sci2(value)} MWh", status, _energy_sources(energy), note)


def _energy_sources(energy: dict) -> str:
    labels = {"nvml_energy_counter": "NVML cumulative energy counter", "nvml_power_x_time": "NVML power x time",
              "rapl": "RAPL package/DRAM counters"}
    used = [labels[s] for kind in ("gpu_sources", "cpu_sources") for s in (energy.get(kind) or {})
            if s in labels]
    return ", ".join(dict.fromkeys(used)) or "none"


def _energy_method_field(energy: dict | None) -> dict:
    if not energy or energy.get("total_j") is None:
        return _field(ENERGY, None, "Measurement methodology (energy)", None, None, TO_SUPPLY, None,
                      "describe how the energy was measured or estimated")
    text = ("Energy read from cumulative hardware counters at every training-step boundary on every rank "
            f"({_energy_sources(energy)}), summed over steps and ranks; each step row records its source and "
            f"rows without a figure are counted, not filled in. Covered: {energy['coverage']}.")
    return _field(ENERGY, None, "Measurement methodology (energy)", None, text, PREFILLED, "flopcount energy meter",
                  "add facility overhead (PUE) if the figure should cover the data centre")


def cop_form(summary: dict, compliance: dict, notification: dict, *, generated_at: str | None = None) -> dict:
    """The compute, time, energy and methodology part of the Model Documentation Form, as a dict."""
    from .. import __version__

    fields = [
        _field(GENERAL, "1.1", "Legal name for the model provider", None, None, TO_SUPPLY, None, None),
        _field(GENERAL, "1.2", "Model name", None, None, TO_SUPPLY, None,
               "the unique identifier of the modified model and its versions"),
        _dependency_field(compliance),
        _time_field(summary.get("time")),
        _compute_field(summary),
        _method_field(summary),
        _energy_field(summary.get("energy")),
        _energy_method_field(summary.get("energy")),
        _field(ENERGY, None, "Benchmarked amount of computation used for inference", None, None, TO_SUPPLY, None,
               "not part of training; meter an inference benchmark with flopcount.meter() to measure it"),
    ]
    return {
        "schema": COP_SCHEMA,
        "title": "Model Documentation Form (GPAI Code of Practice): the modification's compute, time, energy "
                 "and methodology",
        "generated_at": generated_at or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"flopcount_version": __version__},
        "runs": summary.get("run_id"),
        "threshold": {"status": compliance["status"], "threshold_flops": compliance["threshold_flops"],
                      "basis": compliance["threshold_basis_text"], "ratio": compliance["ratio"]},
        "notification": notification,
        "fields": fields,
        "to_supply": [f["field"] for f in fields if f["status"] in (TO_SUPPLY, PARTIAL)],
    }


def add_resources(traces, summary: dict, result: dict, *, planned_steps: int | None = None,
                  planned_tokens: int | None = None, dtype: str | None = None, utilisation: float | None = None,
                  approaching: float = DEFAULT_APPROACHING, now: float | None = None) -> None:
    """Complete a (summary, threshold check) pair for a report: ``result["notification"]``, and the
    hardware cross-check redone for ``dtype`` / ``utilisation`` when given."""
    if dtype is not None or utilisation is not None:
        summary["hardware_estimate"] = recheck(summary["hardware_estimate"], dtype=dtype or DEFAULT_DTYPE,
                                               utilisation=utilisation or ASSUMED_UTILISATION)
    result["notification"] = notification_of(traces, summary, result, planned_steps=planned_steps,
                                             planned_tokens=planned_tokens, approaching=approaching, now=now)


def build_cop_report(location, *, base_model=None, base_model_flops=None, systemic_risk=None,
                     approaching: float = DEFAULT_APPROACHING, planned_steps: int | None = None, planned_tokens: int | None = None,
                     dtype: str | None = None, utilisation: float | None = None, now: float | None = None,
                     digest: str | None = None, public_key=None, ledger=None) -> dict:
    """``cop_form`` for the traces at ``location``, with the notification timing (actual, or
    forecast from a plan), the hardware cross-check for ``dtype`` / ``utilisation`` and the
    integrity check (``digest`` / ``public_key`` / ``ledger``: trace/integrity.py)."""
    traces = open_traces(location)
    integrity = check_integrity(traces, digest=digest, public_key=public_key, ledger=ledger)
    with findings_first(integrity, traces.location):
        summary, result = check_traces(traces, base_model=base_model, base_model_flops=base_model_flops,
                                       systemic_risk=systemic_risk, approaching=approaching)
        add_resources(traces, summary, result, planned_steps=planned_steps, planned_tokens=planned_tokens,
                      dtype=dtype, utilisation=utilisation, approaching=approaching, now=now)
    return {**cop_form(summary, result, result["notification"]), "integrity": integrity_block(integrity)}


def resource_sections(report: dict) -> list[tuple[str, str, object]]:
    """The audit report's time, energy, cross-check and notification sections (report/sections.py)."""
    totals = report["totals"]
    time, energy, check = totals.get("time"), totals.get("energy"), totals.get("hardware_estimate")
    notification = report["compliance"].get("notification")
    out = []
    if time:
        devices = ", ".join(f"{n} x {d}" for d, n in time["devices"].items()) or "not recorded"
        out.append(("Training time and energy", "fields", [
            ("wall-clock time", f"{sci2(time['wall_clock_days'])} days ({time['wall_clock_s']:.0f} s)"
             if time["wall_clock_s"] is not None else "n/a"),
            ("hardware time", f"{sci2(time['hardware_days'])} device-days" if time["hardware_days"] is not None
             else "not recorded"),
            ("devices", devices),
            ("energy", f"{sci2(energy['total_mwh'])} MWh ({energy['total_j']:.4g} J)" if energy["total_j"] is not None
             else "unavailable"),
            ("energy sources (step rows)", "; ".join(
                f"{kind}: " + ", ".join(f"{s} {n}" for s, n in energy[f"{kind}_sources"].items())
                for kind in ("gpu", "cpu"))),
            ("energy coverage", energy["coverage"]),
        ]))
    if check:
        rows = [("method", check["method"]), ("dtype of the peak", check["dtype"])]
        if check["available"]:
            per_step = [f"{d['device']}: median {d['mfu_per_step']['median']:.1%} "
                        f"(p10 {d['mfu_per_step']['p10']:.1%}, p90 {d['mfu_per_step']['p90']:.1%})"
                        for d in check["devices"] if d["mfu_per_step"]]
            rows += [("estimate", f"{sci2(check['estimate_flops'])} FLOP at an assumed utilisation of "
                                  f"{check['utilisation_assumed']:.0%}"),
                     ("counted training compute", f"{sci2(check['counted_training_flops'])} FLOP "
                                                  f"({check['ratio_counted_to_estimate']:.2g}x the estimate)"),
                     ("implied utilisation (MFU)", f"{check['implied_utilisation']:.1%}"),
                     ("MFU per step", "; ".join(per_step) or "n/a"),
                     ("peaks", "; ".join(f"{d['table_key']}: {d['peak_source']}" for d in check["devices"]))]
        else:
            rows.append(("estimate", f"unavailable: {check['reason']}"))
        out.append(("Hardware-based cross-check", "fields", rows))
    if notification:
        rows = [("status", notification["status"]), ("when", notification["text"])]
        if notification["notify_by"]:
            rows.append(("window", f"{notification['window_starts']} to {notification['notify_by']}"))
        out.append(("Notification timing", "fields", rows + [("rule", notification["rule"])]))
    return out


def resource_lines(summary: dict) -> list[str]:
    """`flopcount summarize` text lines for time, energy and the hardware cross-check."""
    time, energy, check = summary.get("time"), summary.get("energy"), summary.get("hardware_estimate")
    if not time:
        return []
    devices = ", ".join(f"{n} x {d}" for d, n in time["devices"].items()) or "not recorded"
    hardware = f"{sci2(time['hardware_days'])} device-days" if time["hardware_days"] is not None else "not recorded"
    lines = [f"training time     {sci2(time['wall_clock_days'])} days wall-clock, {hardware} ({devices})"]
    total = energy["total_j"]
    lines.append("energy            " + (f"{sci2(energy['total_mwh'])} MWh ({total:.4g} J): {energy['coverage']}"
                                          if total is not None else f"unavailable: {energy['coverage']}"))
    if check and check["available"]:
        lines.append(f"hardware estimate {sci2(check['estimate_flops'])} FLOP ({check['dtype']} peak x "
                     f"{check['utilisation_assumed']:.0%}); implied MFU {check['implied_utilisation']:.1%}")
    elif check:
        lines.append(f"hardware estimate unavailable: {check['reason']}")
    return lines


# ---- renderers --------------------------------------------------------------------------------

def render_cop_json(form: dict) -> str:
    return json.dumps(form, indent=2) + "\n"


def render_cop_markdown(form: dict) -> str:
    lines = [f"# {form['title']}", "",
             f"Generated {form['generated_at']} by flopcount {form['tool']['flopcount_version']} "
             f"(schema {form['schema']}). Fields marked **{TO_SUPPLY}** are for you to fill in; "
             "flopcount fills only what it measured.", ""]
    for section in dict.fromkeys(f["section"] for f in form["fields"]):
        lines += [f"## {section}", "", "| field | value | status | source |", "|---|---|---|---|"]
        for f in (f for f in form["fields"] if f["section"] == section):
            label = f"{f['number']} {f['field']}" if f["number"] else f["field"]
            value = _cell(f["text"]) if f["text"] is not None else "_to supply_"
            status = f"**{f['status']}**" if f["status"] in (TO_SUPPLY, PARTIAL) else f["status"]
            lines.append(f"| {_cell(label)} | {value} | {status} | {_cell(f['source'] or '-')} |")
        lines.append("")
    notes = [f"- **{f['field']}**: {_cell(f['note'])}" for f in form["fields"] if f["note"]]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    threshold, notification = form["threshold"], form["notification"]
    lines += ["## Threshold and notification", "",
              f"- **status**: {threshold['status']} ({threshold['ratio'] * 100:.2g}% of {sci2(threshold['threshold_flops'])} "
              f"FLOP: {_cell(threshold['basis'])})",
              f"- **notification**: {_cell(notification['text'])}"]
    if notification["notify_by"]:
        lines.append(f"- **window**: {notification['window_starts']} to {notification['notify_by']} "
                     f"({_cell(notification['basis'])})")
    lines += [f"- **rule**: {_cell(notification['rule'])}", ""]
    if "integrity" in form:
        lines += ["## Integrity of the evidence", ""]
        lines += [f"- **{label}**: {_cell(value)}" for label, value in integrity_fields(form["integrity"])] + [""]
    lines += ["To supply: " + (", ".join(form["to_supply"]) or "nothing") + ".", ""]
    return "\n".join(lines)


# format name -> renderer(form dict) -> str, for `flopcount report --form cop --format ...`
COP_RENDERERS = {"md": render_cop_markdown, "json": render_cop_json}
