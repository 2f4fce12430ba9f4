"""The shared number, date and table-cell formats of every human-readable output (reports, the
Code of Practice form, terminal summaries, plans, warnings): one home, so that a figure reads the
same everywhere. Two significant figures for FLOP figures (guidelines C(2025) 5045, para. 31)."""
from __future__ import annotations

import datetime as dt

__all__ = ["flop_text", "iso_date", "iso_time", "percent", "sci2", "share", "sig2"]


def _mantissa_exponent(value) -> tuple[str, int]:
    mantissa, exponent = f"{float(value):.1e}".split("e")
    return mantissa, int(exponent)


def sig2(value: float | int | None) -> str:
    """``value`` with two significant figures in e-notation: 23400 -> '2.3e4'."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    mantissa, exponent = _mantissa_exponent(value)
    return f"{mantissa}e{exponent}"


def sci2(value) -> str | None:
    """Two significant figures in the form's notation: 23400 -> '2.3*10^4', 0.00123 -> '1.2*10^-3'."""
    if value is None:
        return None
    if value == 0:
        return "0"
    mantissa, exponent = _mantissa_exponent(value)
    return f"{mantissa}*10^{exponent}"


def flop_text(value) -> str:
    """A FLOP figure for people: 23400 -> '2.3e4 FLOP'."""
    return f"{sig2(value)} FLOP"


def percent(ratio: float) -> str:
    """A ratio as a percentage with two significant figures: 0.2734 -> '27%', 7.1e-18 -> '7.1e-16%'."""
    return f"{ratio * 100:.2g}%"


def share(part: int, whole: int) -> str:
    """A table cell for a part of a whole: '12.5%', or '-' when the whole is zero."""
    return f"{part / whole:.1%}" if whole else "-"


def iso_date(timestamp: float | None) -> str | None:
    """A Unix time as its UTC day, '2026-11-26'."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).date().isoformat()


def iso_time(timestamp: float | None) -> str | None:
    """A Unix time in UTC to the second, '2026-11-26T10:00:00+00:00'."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
