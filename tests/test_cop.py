"""The Code of Practice form export and the notification timing (closed forms)."""
from __future__ import annotations

import datetime as dt
import json
from fractions import Fraction

import pytest

from flopcount.report import cop


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()


def test_two_significant_figures_in_the_forms_notation():
    assert [cop.sci2(v) for v in (23_400, 0.00123, 8.4e22, 10**20, 0, None)] == [
        "2.3*10^4", "1.2*10^-3", "8.4*10^22", "1.0*10^20", "0", None]


def test_crossing_time_is_the_end_of_the_step_that_reaches_the_threshold():
    rows = [(3.0, 5), (1.0, 4), (2.0, 3)]  # any order; cumulative by time: 4, 7, 12
    assert cop.crossing_time(rows, 7) == 2.0
    assert cop.crossing_time(rows, 8) == 3.0
    assert cop.crossing_time(rows, 13) is None
    # one third of 1e23 FLOP, exact: ten steps of 1e22 reach it at the fourth (4e22 >= 3.33e22)
    big = [(float(i), 10**22) for i in range(10)]
    assert cop.crossing_time(big, Fraction(10**23, 3)) == 3.0
    assert cop.crossing_time(big, 1e23 / 3) == 3.0


def test_notification_window_from_an_actual_crossing():
    result = cop.notification_timing(crossed_at=ts("2026-11-26T10:00:00"))
    assert (result["status"], result["date"], result["window_starts"], result["notify_by"]) == (
        "reached", "2026-11-26", "2026-11-26", "2026-12-10")
    assert "Art. 52(1)" in result["rule"]


def test_notification_window_of_a_forecast_starts_when_it_becomes_known():
    result = cop.notification_timing(expected_at=ts("2026-12-20T08:00:00"), known_at=ts("2026-11-26T12:00:00"))
    assert (result["status"], result["date"], result["known_since"], result["notify_by"]) == (
        "expected", "2026-12-20", "2026-11-26", "2026-12-10")
    assert cop.notification_timing()["notify_by"] is None
    undated = cop.notification_timing(forecast_crosses=True, known_at=ts("2026-11-26T12:00:00"))
    assert (undated["status"], undated["date"], undated["notify_by"]) == ("expected", None, "2026-12-10")


def test_expected_crossing_time_at_the_measured_pace():
    projection = {"crosses_threshold": True, "crossing_step": 100, "measured_steps": 40}
    assert cop.expected_crossing_time(projection, 1_000.0, 2.0) == 1_000.0 + 60 * 2.0
    assert cop.expected_crossing_time({**projection, "crosses_threshold": False}, 1_000.0, 2.0) is None


def summary(**extra) -> dict:
    base = {"training_flops": 234_000_000_000_000_000_000, "run_id": "ft-1", "steps": 10,
            "method": {"estimation_method": "operator counting", "phases_included": ["backward", "forward"],
                       "phases_excluded": {"recompute": "excluded by Annex A.1"}, "uncertainty": "none",
                       "flopcount_version": "0.1.0", "torch_version": "2.13.0"}}
    return {**base, **extra}


COMPLIANCE = {"status": "below", "threshold_flops": 8.4e22 / 3, "threshold_basis_text": "one third of ...",
              "ratio": 0.0084, "base_model": "meta-llama/Llama-3.1-8B", "base_model_flops": 1.224e24,
              "base_model_flops_source": "Meta model card"}


def by_field(form: dict) -> dict:
    return {f["field"]: f for f in form["fields"]}


def test_form_prefills_what_was_measured_and_marks_the_rest():
    time = {"wall_clock_days": 0.5, "hardware_days": 4.0, "devices": {"NVIDIA H100 80GB HBM3": 8}, "source": "steps"}
    energy = {"total_j": 3.6e9 * 0.0123, "total_mwh": 0.0123, "complete": True, "coverage": "GPU boards (NVML)",
              "gpu_sources": {"nvml_energy_counter": 10}, "cpu_sources": {"unavailable": 10}}
    form = cop.cop_form(summary(time=time, energy=energy), COMPLIANCE, cop.notification_timing())
    fields = by_field(form)
    assert fields["Model dependencies"]["number"] == "1.6"
    assert fields["Model dependencies"]["value"] == "meta-llama/Llama-3.1-8B"
    assert "1.2*10^24" in fields["Model dependencies"]["note"]
    assert fields["Amount of computation used for training"]["text"] == "2.3*10^20 FLOP"
    assert fields["Amount of computation used for training"]["status"] == cop.MEASURED
    assert fields["Training time"]["text"] == "5.0*10^-1 days wall-clock; 4.0*10^0 hardware-days (8 x NVIDIA H100 80GB HBM3)"
    assert fields["Amount of energy used for training"]["text"] == "1.2*10^-2 MWh"
    assert fields["Amount of energy used for training"]["status"] == cop.MEASURED
    assert "NVML cumulative energy counter" in fields["Measurement methodology (energy)"]["text"]
    assert form["to_supply"] == ["Legal name for the model provider", "Model name",
                                 "Benchmarked amount of computation used for inference"]
    json.dumps(form)  # serialisable


def test_form_never_invents_energy_or_a_dependency():
    form = cop.cop_form(summary(energy={"total_j": None, "total_mwh": None, "complete": False}),
                        {**COMPLIANCE, "base_model": None, "base_model_flops": None}, cop.notification_timing())
    fields = by_field(form)
    assert fields["Amount of energy used for training"]["value"] is None
    assert fields["Amount of energy used for training"]["status"] == cop.TO_SUPPLY
    assert fields["Model dependencies"]["status"] == cop.TO_SUPPLY
    partial = cop.cop_form(summary(energy={"total_j": 1e6, "total_mwh": 1e6 / 3.6e9, "complete": False,
                                           "coverage": "GPU energy; lower bound", "gpu_sources": {}}),
                           COMPLIANCE, cop.notification_timing())
    assert by_field(partial)["Amount of energy used for training"]["status"] == cop.PARTIAL
    assert "Amount of energy used for training" in partial["to_supply"]


def test_markdown_rendering():
    form = cop.cop_form(summary(), COMPLIANCE, cop.notification_timing(crossed_at=ts("2026-11-20T00:00:00")))
    text = cop.render_cop_markdown(form)
    assert "| 1.6 Model dependencies | meta-llama/Llama-3.1-8B (modified by fine-tuning) | pre-filled |" in text
    # "*" escaped: Markdown shows 2.3*10^20 literally instead of starting emphasis
    assert "| Amount of computation used for training | 2.3\\*10^20 FLOP | measured |" in text
    assert "| 1.1 Legal name for the model provider | _to supply_ | **to supply** | - |" in text
    assert "notify by 2026-12-04" in text
    assert json.loads(cop.render_cop_json(form))["schema"] == cop.COP_SCHEMA


@pytest.mark.parametrize("value", [1.0, 99.5, 0.000999])
def test_sci2_round_trips_to_two_significant_figures(value):
    mantissa, exponent = cop.sci2(value).split("*10^")
    assert float(mantissa) * 10 ** int(exponent) == pytest.approx(float(f"{value:.2g}"))
