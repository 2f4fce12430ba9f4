"""The report's human-readable layout, shared by the Markdown and HTML renderers.

``sections(report)`` returns (title, kind, content): kind "fields" holds (label, value) pairs,
"table" holds (header, rows), "list" holds strings.
"""
from __future__ import annotations

from .checks import integrity_fields
from .cop import resource_sections
from .format import flop_text, percent, share, sig2


def sections(report: dict) -> list[tuple[str, str, object]]:
    result, totals, method = report["compliance"], report["totals"], report["method"]
    runs = report["project"]["runs"]
    integrity = report["integrity"]
    out = [
        ("Identity", "table", (["run", "ranks", "world size", "segments", "steps", "started", "manifest digest"],
                               [[r["run_id"], len(r["ranks"]), r["world_size"], r["segments"],
                                 f"{r['first_step']}-{r['last_step']}" if r["first_step"] is not None else "-",
                                 r["started"], (r["manifest_digest"] or "-")[:16]] for r in runs])),
        ("Result", "fields", [
            ("status", result["status"].upper()),
            ("training compute", f"{flop_text(totals['training_flops'])} ({totals['training_flops']:,} FLOP)"),
            ("threshold", f"{result['text']['threshold_flops']}: {result['threshold_basis_text']}"),
            ("share of threshold", percent(result["ratio"])),
            ("base model", f"{result['base_model'] or 'not given'}" + (
                f" ({flop_text(result['base_model_flops'])}, {result['base_model_method']})"
                if result["base_model_flops"] is not None else " (training compute unknown)")),
            ("base + modification", (f"{result['text']['combined_flops']} against 1e25 FLOP: "
                                     f"{result['combined_status']} (informational, Art. 51(2))")
             if result["combined_flops"] is not None else "n/a"),
            *_training_split(method),
            ("hardware compute (all phases)", flop_text(totals["hardware_flops"])),
            ("excluded from training compute", flop_text(totals["excluded_flops"])),
            ("steps / tokens / samples", f"{totals['steps']} / {totals['tokens']} / {totals['samples']}"),
            ("time span", f"{totals['start_time']} to {totals['end_time']}"),
        ]),
        ("By phase", "table", (["phase", "FLOP", "share", "counts toward training"],
                               [[p, sig2(f), share(f, totals["hardware_flops"]),
                                 "yes" if p in method["phases_included"] else "no"]
                                for p, f in report["breakdowns"]["by_phase"].items()])),
        ("By category", "table", (["category", "FLOP", "training FLOP"],
                                  [[c, sig2(f), sig2(report["breakdowns"]["training_by_category"].get(c, 0))]
                                   for c, f in report["breakdowns"]["by_category"].items()])),
        ("Top modules", "table", (["module", "FLOP", "training FLOP", "share"],
                                  [[m["module"], sig2(m["flops"]), sig2(m["training_flops"]),
                                    share(m["flops"], totals["hardware_flops"])]
                                   for m in report["breakdowns"]["top_modules"]])),
        ("Method", "fields", [
            ("estimation method", method["estimation_method"]),
            ("phases included", ", ".join(method["phases_included"])),
            ("phases excluded", "; ".join(f"{p}: {why}" for p, why in method["phases_excluded"].items()) or "none"),
            ("uncounted ops", ", ".join(f"{op} ({n})" for op, n in method["uncounted_ops"].items()) or "none"),
            *([("dark module", f"{name} ({cls})") for name, cls in method.get("dark_modules", {}).items()]
              or [("dark modules", "none")]),
            ("uncertainty", method["uncertainty"]),
            ("tool", f"flopcount {method['flopcount_version']}, torch {method['torch_version']}, "
                     f"backend {method['backend']}"),
            ("hardware", _hardware(method["hardware"])),
            ("world size", str(method["world_size"])),
        ]),
        ("Counting conventions", "list", method["conventions"] + [f"full conventions: {method['conventions_doc']}"]),
        ("Integrity", "fields", integrity_fields(integrity)),
    ]
    out[2:2] = resource_sections(report)  # time, energy, hardware cross-check, notification (report/cop.py)
    return out


def _training_split(method: dict) -> list[tuple[str, str]]:
    """Training compute split into gradient work and no-grad training work, with why both count."""
    split = method.get("training_split")
    if not split:
        return []
    phases = ", ".join(f"{p} {flop_text(f)}" for p, f in split["no_grad_phases"].items()) or "none"
    rows = [("of which gradient work", f"{flop_text(split['gradient_work'])} (forward, backward, optimizer)"),
            ("of which no-grad training work", f"{flop_text(split['no_grad_training_work'])} ({phases}); "
                                               f"{method.get('no_grad_reason', '')}")]
    if split.get("derived_flops"):
        rows.append(("of which derived (not captured)", f"{flop_text(split['derived_flops'])}: rollouts outside "
                                                         "PyTorch, from the engine's token counts"))
    return rows


def _hardware(hardware) -> str:
    if not hardware:
        return "not recorded"
    machines = hardware if isinstance(hardware, list) else [hardware]
    return "; ".join(f"{h.get('cpu')} x{h.get('cpu_count')}"
                     + (f", GPUs: {', '.join(h['gpus'])}" if h.get("gpus") else "") for h in machines)
