"""A plan as text (terminal), Markdown (a planning memo) or JSON."""
from __future__ import annotations

import json

from ..report.format import flop_text, percent, sig2


def _setup_line(p: dict) -> str:
    s = p["setup"]
    shape = f"seq {s['seq_len']}" if s["seq_len"] else "lengths " + ", ".join(f"{k}x{v}" for k, v in s["lengths"].items())
    parts = [shape, f"batch {s['batch_size']}"]
    if s["grad_accum"] > 1:
        parts.append(f"grad accum {s['grad_accum']}")
    if s["lora_rank"]:
        parts.append(f"{'QLoRA' if s['qlora'] else 'LoRA'} r={s['lora_rank']} on {','.join(s['lora_targets'])}")
    else:
        parts.append("full fine-tune")
    if s["gradient_checkpointing"]:
        parts.append("gradient checkpointing")
    parts += [s["optimizer"], f"attention {s['attn']}"]
    return ", ".join(parts)


def _rows(p: dict) -> list[tuple[str, str]]:
    step = p["per_step"]
    rows = [
        ("model", f"{p['config']} ({p['model_type']}), {p['parameters'] / 1e9:.3g}B parameters, "
                  f"{p['trainable_parameters'] / 1e6:.4g}M trainable"),
        ("setup", _setup_line(p)),
        ("per step", f"{flop_text(p['flops_per_step'])} training, {flop_text(step['hardware_flops'])} executed, "
                     f"{p['tokens_per_step']:.6g} tokens"),
        ("by phase (per step)", ", ".join(f"{k} {sig2(v)}" for k, v in step["by_phase"].items() if v)),
        ("by category (per step)", ", ".join(f"{k} {sig2(v)}" for k, v in step["by_category"].items() if v)),
        ("plan", f"{p['steps']} steps, {sig2(p['tokens'])} tokens"),
        ("training compute", flop_text(p["training_flops"])),
        ("executed (incl. recompute)", flop_text(p["hardware_flops"])),
        ("threshold", f"{flop_text(p['threshold_flops'])}: {p['threshold_basis_text']}"),
        ("status", f"{p['status']} ({percent(p['ratio'])} of the threshold)"),
        ("largest plan below the threshold", f"{p['max_steps_below_threshold']} steps, "
                                             f"{sig2(p['max_tokens_below_threshold'])} tokens"),
        (f"largest plan below 'approaching' ({p['approaching_fraction']:g} x threshold)",
         f"{p['max_steps_below_approaching']} steps, {sig2(p['max_tokens_below_approaching'])} tokens"),
    ]
    for key, label in (("6ND", "6 x N x D"), ("aws", "(4N + 2N_trainable) x D")):
        f = p["formulas"][key]
        rows.append((label, f"{flop_text(f['flops'])} ({f['deviation'] * 100:+.3g}% vs counted)"))
    c = p["crossing"]
    if c["crosses"]:
        when = f"at step {c['step']}"
        if c["after_s"] is not None:
            when += f", {c['after_s'] / 86400:.3g} days into the run"
        if c["date"]:
            when += f", on {c['date']}; Art. 52(1) notification due by {c['notify_by']}"
        rows.append(("threshold crossed", when))
    else:
        rows.append(("threshold crossed", "not under this plan"))
    if p["setup"].get("qlora_note"):
        rows.append(("QLoRA", p["setup"]["qlora_note"]))
    return rows


def render(plan: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(plan, indent=2) + "\n"
    rows = _rows(plan)
    if fmt == "md":
        out = ["# Training compute plan", "",
               "Counted by flopcount from one real training step of the model on the meta device "
               "(same formulas as a metered run; EU AI Act, Commission guidelines C(2025) 5045).", "",
               "| | |", "|---|---|"]
        out += [f"| {k} | {_cell(v)} |" for k, v in rows]
        return "\n".join(out) + "\n"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
