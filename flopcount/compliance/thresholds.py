"""EU AI Act compute thresholds for a modification (guidelines C(2025) 5045, para. 60-61; Art. 51(2)).

The guidelines: Guidelines on the scope of the obligations for general-purpose AI models established
by Regulation (EU) 2024/1689, whose content the Commission approved on 18 July 2025 by the
Communication C(2025) 5045 final (the number the published text carries). The Commission adopted
them formally in November 2025; the number of that adoption, cited elsewhere as C(2025) 7719, could
not be checked against a Commission document, so flopcount cites C(2025) 5045 (paragraph numbers
as in the July text).

A modification makes its author the provider of a new general-purpose model when its training
compute exceeds one third of the base model's training compute; when that compute is unknown,
one third of 1e23 FLOP, or one third of 1e25 FLOP for a systemic-risk base model. The total of
base + modification is also compared with 1e25 FLOP (the systemic-risk presumption), for
information. Figures are quoted with two significant figures (para. 31).
"""
from __future__ import annotations

from fractions import Fraction

from ..errors import BadInput
from ..report.format import flop_text, percent, sig2  # noqa: F401  (sig2 also imported from here)
from .registry import lineage, lookup

UNKNOWN_BASE_FLOP = 1e23            # para. 61: base compute unknown
SYSTEMIC_FLOP = 1e25                # Art. 51(2): systemic-risk presumption
MODIFICATION_SHARE = Fraction(1, 3)
DEFAULT_APPROACHING = 0.8  # the one default share for 'approaching' a limit: threshold status and budget warning
STATUSES = ("below", "approaching", "exceeds")

BASIS_TEXT = {
    "base_model_compute": "one third of the base model's training compute",
    "unknown_base_compute": "one third of 1e23 FLOP (base model's training compute unknown)",
    "systemic_unknown_base_compute": "one third of 1e25 FLOP (systemic-risk base model, compute unknown)",
}


def exact(value) -> Fraction:
    """A FLOP figure as an exact number: floats by their shortest decimal (8.4e22 -> 84 x 10**21)."""
    return Fraction(value) if isinstance(value, (int, Fraction)) else Fraction(repr(float(value)))


def status_of(flops, limit, approaching: float = DEFAULT_APPROACHING) -> str:
    """'exceeds' at or over ``limit``, 'approaching' from ``approaching`` x limit, else 'below'."""
    if exact(flops) >= exact(limit):
        return "exceeds"
    if exact(flops) >= exact(approaching) * exact(limit):
        return "approaching"
    return "below"


def check_approaching(fraction) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise BadInput(f"flopcount: approaching fraction {fraction!r} is not a number") from None
    if not 0 < value <= 1:
        raise BadInput(f"flopcount: approaching fraction {fraction!r} must be in (0, 1]")
    return value


def threshold(base_flops: float | None, systemic_risk: bool = False) -> tuple[Fraction, str]:
    """(exact threshold in FLOP, basis code) for a base model of known or unknown compute."""
    if base_flops is not None:
        return exact(base_flops) * MODIFICATION_SHARE, "base_model_compute"
    if systemic_risk:
        return exact(SYSTEMIC_FLOP) * MODIFICATION_SHARE, "systemic_unknown_base_compute"
    return exact(UNKNOWN_BASE_FLOP) * MODIFICATION_SHARE, "unknown_base_compute"


MIN_FLOP = 1.0  # a FLOP figure below one FLOP (5e-324) is a typo, and dividing by it overflows
MAX_FLOP = 1e40  # 10^13 x the largest published training run: beyond it, a typo (and float overflow)


def valid_flop(value) -> bool:
    """A base-model or budget FLOP figure: a finite number from MIN_FLOP to MAX_FLOP."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and MIN_FLOP <= value <= MAX_FLOP


def resolve_base(base_model: str | None = None, base_model_flops: float | None = None,
                 systemic_risk: bool | None = None) -> dict:
    """What is known about the base model. Raises UnknownBaseModel for a name not in the registry."""
    named = lookup(base_model) if base_model else None
    chain = lineage(named) if named else []
    # A fine-tune of a fine-tune: the threshold is one third of the original model's compute.
    entry = chain[-1] if chain else None
    flops = base_model_flops if base_model_flops is not None else (entry.training_flop if entry else None)
    if flops is not None and not valid_flop(flops):
        raise BadInput(f"flopcount: base model training compute {flops!r} must be a number of FLOP from "
                       "1 to 1e40")
    result = {
        "base_model": named.hf_id if named else base_model,
        "base_model_flops": float(flops) if flops is not None else None,
        "base_model_flops_source": ("given" if base_model_flops is not None else
                                    (entry.source if entry and entry.training_flop is not None else None)),
        "base_model_method": "given" if base_model_flops is not None else (entry.method if entry else None),
        "systemic_risk": bool(systemic_risk) if systemic_risk is not None else bool(entry and entry.systemic_risk),
    }
    if len(chain) > 1:  # only for fine-tunes, so that existing outputs keep their keys
        result["lineage"] = [m.hf_id for m in chain]
        result["original_model"] = entry.hf_id
        result["prior_modification_flops"] = sum(m.training_flop or 0 for m in chain[:-1])
    return result


def assess(training_flops: int, base: dict, approaching: float = DEFAULT_APPROACHING) -> dict:
    """The threshold check of a modification's ``training_flops`` against a resolved ``base``."""
    limit, basis = threshold(base["base_model_flops"], base["systemic_risk"])
    status = status_of(training_flops, limit, approaching)
    combined = (int(training_flops) + exact(base["base_model_flops"])) if base["base_model_flops"] is not None else None
    basis_text = BASIS_TEXT[basis]
    if basis == "base_model_compute":
        basis_text += f" ({flop_text(base['base_model_flops'])}"
        basis_text += f"; {base['base_model_flops_source']})" if base["base_model_flops_source"] else ")"
    return {
        **base,
        "training_flops": int(training_flops),
        "threshold_flops": float(limit),
        "threshold_basis": basis,
        "threshold_basis_text": basis_text,
        "ratio": float(Fraction(int(training_flops)) / limit),
        "status": status,
        "approaching_fraction": approaching,
        "combined_flops": float(combined) if combined is not None else None,
        "combined_limit_flops": SYSTEMIC_FLOP,
        "combined_status": status_of(combined, SYSTEMIC_FLOP, approaching) if combined is not None else None,
        "text": {"training_flops": flop_text(training_flops), "threshold_flops": flop_text(limit),
                 "combined_flops": flop_text(combined) if combined is not None else None},
    }


def compliance_block(training_flops: int, base_model: str | None = None, base_model_flops: float | None = None,
                     systemic_risk: bool | None = None, approaching: float = DEFAULT_APPROACHING) -> dict:
    """The ``compliance`` entry of a summary: the threshold check of this run's training FLOPs."""
    return assess(training_flops, resolve_base(base_model, base_model_flops, systemic_risk), approaching)


def summary_compliance(training_flops: int, base_model: str | None, base_model_flops: float | None) -> dict:
    """``compliance_block`` for Meter.summary(): a name not in the registry gives the unknown-compute
    threshold (the lower, cautious one) with a note, instead of an error in the middle of training."""
    try:
        return compliance_block(training_flops, base_model, base_model_flops)
    except ValueError as e:
        block = compliance_block(training_flops, None, None)
        block.update(base_model=base_model, note=str(e).removeprefix("flopcount: "))
        return block


def verdict_line(result: dict, with_basis: bool = True) -> str:
    """One line for people: 'below: 2.3e20 FLOP is 0.27% of the threshold 8.4e22 FLOP (...)';
    ``with_basis=False`` leaves out the threshold's basis where a line above states it."""
    line = (f"{result['status']}: training compute {result['text']['training_flops']} is "
            f"{percent(result['ratio'])} of the threshold {result['text']['threshold_flops']}")
    return f"{line} ({result['threshold_basis_text']})" if with_basis else line
