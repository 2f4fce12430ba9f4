"""The method statement that the guidelines ask for with a compute estimate (para. 31, Annex A).

It says how the figure was obtained (operator counting and its conventions), which phases are
included and excluded and why, what was not counted and the uncertainty that leaves, and the
tool versions, hardware, world size and time span behind it.
"""
from __future__ import annotations

import functools
import os
import platform
import socket

from ..conventions import (EVAL, GRADIENT_PHASES, NO_GRAD_TRAINING, NO_GRAD_TRAINING_PHASES, RECOMPUTE)

ESTIMATION_METHOD = ("operator counting: every PyTorch operator the job executed was intercepted and its "
                     "FLOPs computed from its input shapes by a per-operator formula (flopcount); "
                     "no hardware-utilisation or 6ND estimate is involved")
CONVENTIONS = (
    "one multiply-add is 2 FLOP; all precisions count the same (Annex A.2)",
    "matrix product [m,k]x[k,n] = 2mkn; bias and accumulate adds in category pointwise",
    "convolution = 2 x output elements x C_in/groups x kernel elements",
    "fused attention counts only the (query, key) pairs computed (causal masks halve them); "
    "its backward counts 2x the forward GEMMs, the recomputed scores are phase recompute",
    "elementwise, normalisation, reduction, loss and optimizer ops by per-element constants; "
    "views, copies, indexing, casts and communication are zero",
    "each rank counts its local work only; ranks add up without double counting",
    "work that feeds a training step's loss is training compute with or without gradients: rollouts "
    "(generation), reference and teacher forwards, reward scoring; only held-out evaluation is eval",
)
# Why no-grad work counts (the report and the Code of Practice form quote it).
NO_GRAD_REASON = ("no-grad training work (rollouts, reference and teacher forwards, reward scoring) produces "
                  "what the step's loss is computed from: it is compute used to train the model, like the "
                  "synthetic-data generation the guidelines count; only held-out evaluation is excluded")
NO_GRAD_RULE = ("no-grad work outside any tagged phase counts as training (phase no_grad_training) when its step "
                "also ran backward, and as eval when the step ran none (evaluation between or after the "
                "training steps); framework evaluation loops and Meter.evaluating() are always eval, and the "
                "integrations tag generation, reference, teacher and reward work exactly")
CONVENTIONS_DOC = "docs/conventions.md"
EXCLUSION_REASONS = {
    RECOMPUTE: "recomputation of activations (activation checkpointing, fused-attention backward); "
               "excluded by Annex A.1",
    EVAL: "held-out evaluation (framework evaluation loops, Meter.evaluating(), no-grad work in steps "
          "without backward); diagnostics, not training",
}
USER_EXCLUDED = "user phase marked training=False"


def method_statement(summary: dict, *, flopcount_version: str, hardware=None) -> dict:
    """The method statement for a summary dict (Meter.summary() or flopcount summarize)."""
    excluded = summary.get("excluded_phases", [])
    by_phase = summary.get("by_phase", {})
    uncounted = summary.get("uncounted_ops", {})
    start, end = summary.get("start_time"), summary.get("end_time")
    uncounted_calls = sum(uncounted.values())
    if uncounted:
        uncertainty = (f"{len(uncounted)} op type(s) without a formula ran {uncounted_calls} time(s); their FLOPs "
                       "are not in the totals, so the totals are a lower bound by that much "
                       f"(ops: {', '.join(list(uncounted)[:10])})")
    else:
        uncertainty = ("every executed op had a formula or is a known zero-FLOP op; remaining uncertainty is "
                       "that of the counting conventions (per-element constants of vector ops)")
    errors = summary.get("meter_errors") or {}
    if errors:
        uncertainty += ("; the meter recovered from failures inside its hooks (" +
                        ", ".join(f"{kind}: {e.get('count')}" for kind, e in errors.items()) +
                        "); FLOPs they lost are among the uncounted ops")
    dark = summary.get("dark_modules") or {}
    if dark:  # capture/dark.py: forwards whose work no capture path saw
        uncertainty += (f"; {len(dark)} module(s) with parameters booked no FLOPs in their forward (their work ran "
                        f"outside every capture path and is not in the totals: {', '.join(list(dark)[:10])})")
    return {
        "estimation_method": ESTIMATION_METHOD,
        "training_split": training_split(summary),
        "no_grad_rule": NO_GRAD_RULE,
        "no_grad_reason": NO_GRAD_REASON,
        "conventions": list(CONVENTIONS),
        "conventions_doc": CONVENTIONS_DOC,
        "phases_included": summary.get("training_phases", []),
        "phases_excluded": {p: EXCLUSION_REASONS.get(p, USER_EXCLUDED) for p in excluded},
        "excluded_flops": sum(by_phase.get(p, 0) for p in excluded),
        "uncounted_ops": uncounted,
        "uncounted_calls": uncounted_calls,
        "dark_modules": dark,
        "uncertainty": uncertainty,
        "flopcount_version": flopcount_version,
        "torch_version": summary.get("torch_version"),
        "backend": summary.get("backend"),
        "hardware": hardware,
        "world_size": summary.get("world_size"),
        "start_time": start,
        "end_time": end,
        "duration_s": (end - start) if start is not None and end is not None else None,
    }


def training_split(summary: dict) -> dict:
    """training_flops split into gradient work (forward, backward, optimizer), no-grad training
    work (generation, reference, teacher, reward, and no_grad_training: what the plain-loop rule
    decided) and other user phases marked training; ``derived_flops``: FLOPs not seen by a capture
    path but derived from token counts (vLLM rollouts, ops named ``derived.*``)."""
    by_phase = summary.get("by_phase", {})
    included = set(summary.get("training_phases", []))
    gradient = sum(by_phase.get(p, 0) for p in GRADIENT_PHASES)
    no_grad = {p: by_phase[p] for p in NO_GRAD_TRAINING_PHASES if by_phase.get(p)}
    other = {p: f for p, f in by_phase.items()
             if p in included and p not in GRADIENT_PHASES and p not in NO_GRAD_TRAINING_PHASES and f}
    derived = sum(v.get("flops", 0) if isinstance(v, dict) else v
                  for op, v in summary.get("by_op", {}).items() if op.startswith("derived."))
    return {"gradient_work": gradient, "no_grad_training_work": sum(no_grad.values()), "no_grad_phases": no_grad,
            "no_grad_training_by_rule": by_phase.get(NO_GRAD_TRAINING, 0), "other_training_phases": other,
            "derived_flops": derived}


@functools.lru_cache(maxsize=1)
def hardware_description() -> dict:
    """This machine: CPU model and count, GPU names, host name."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "machine": platform.machine(),
            "host": socket.gethostname()}
