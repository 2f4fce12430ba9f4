"""Energy and time through the whole path: a real metered CPU run with a temporary RAPL tree,
the Parquet trace, the summarizer, the audit report and `flopcount report --form cop`."""
from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import flopcount
from flopcount import energy as en
from flopcount.cli import main
from tracegen import cli

STEPS = 4
BASE = "meta-llama/Llama-2-7b-hf"  # in the registry: 8.4e22 FLOP
JOULES = [1.5, 2.0, 2.5, 3.0]      # package energy written into the RAPL tree during each step
DRAM_JOULES = 0.25                 # per step


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def make_rapl(root) -> tuple[str, str]:
    paths = []
    for entry, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:1", "dram")):
        path = root / entry
        path.mkdir(parents=True)
        (path / "name").write_text(name + "\n")
        (path / "energy_uj").write_text("1000000\n")
        (path / "max_energy_range_uj").write_text("262143328850\n")
        paths.append(str(path))
    return paths[0], paths[1]


def advance(path: str, joules: float) -> None:
    with open(os.path.join(path, "energy_uj")) as f:
        value = int(f.read())
    with open(os.path.join(path, "energy_uj"), "w") as f:
        f.write(f"{value + round(joules * 1e6)}\n")


def metered_run(out, rapl_root, monkeypatch, **options) -> flopcount.Meter:
    package, dram = make_rapl(rapl_root)
    monkeypatch.setenv("FLOPCOUNT_RAPL_ROOT", str(rapl_root))
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=out, backend="dispatch", base_model=BASE, flush_every=3, **options) as m:
        for joules in JOULES:
            layer(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            advance(package, joules)
            advance(dram, DRAM_JOULES)
            m.step(tokens=12)
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("energy")
    with pytest.MonkeyPatch.context() as monkeypatch:
        meter = metered_run(root / "ft-1", root / "powercap", monkeypatch)
    return root / "ft-1", meter


def test_trace_rows_carry_energy_and_device_with_sources(run):
    out, _ = run
    frame = flopcount.read_trace(out)
    assert len(frame) == STEPS
    assert frame.cpu_energy_j.tolist() == pytest.approx([j + DRAM_JOULES for j in JOULES])
    assert set(frame.cpu_energy_source) == {en.RAPL}
    assert set(frame.gpu_energy_source) == {en.NO_DEVICE} and frame.gpu_energy_j.isna().all()
    assert set(frame.device_name) == {cpu_model()} and set(frame.device_count) == {1}


def test_live_and_trace_summaries_agree_with_closed_forms(run):
    out, meter = run
    frame = flopcount.read_trace(out)
    durations = (frame.end_time - frame.start_time).tolist()
    total_j = sum(JOULES) + STEPS * DRAM_JOULES
    for summary in (meter.summary(), flopcount.summarize(out)):
        energy, time = summary["energy"], summary["time"]
        assert energy["cpu_j"] == pytest.approx(total_j) and energy["gpu_j"] is None
        assert energy["total_mwh"] == pytest.approx(total_j / 3.6e9)
        assert energy["complete"] is True and energy["cpu_sources"] == {en.RAPL: STEPS}
        assert time["hardware_s"] == pytest.approx(sum(durations))
        assert time["wall_clock_s"] == pytest.approx(frame.end_time.max() - frame.start_time.min())
        assert time["devices"] == {cpu_model(): 1}
        estimate = summary["hardware_estimate"]
        assert estimate["available"] is False and cpu_model() in estimate["reason"]
        assert estimate["step_rates"][cpu_model()]["steps"] == STEPS


def test_segment_entry_says_what_is_metered(run):
    out, _ = run
    with open(out / "manifest" / "r00000.jsonl") as f:
        segment = json.loads(f.readline())
    assert segment["energy"]["device_kind"] == "cpu"
    assert segment["energy"]["cpu"]["source"] == en.RAPL and len(segment["energy"]["cpu"]["zones"]) == 2


def test_energy_switched_off_records_devices_only(tmp_path, monkeypatch):
    meter = metered_run(tmp_path / "off", tmp_path / "powercap", monkeypatch, energy=False)
    frame = flopcount.read_trace(tmp_path / "off")
    assert set(frame.cpu_energy_source) == {en.UNAVAILABLE} and frame.cpu_energy_j.isna().all()
    assert set(frame.device_count) == {1}
    assert meter.summary()["energy"]["total_j"] is None


def test_old_traces_without_the_columns_still_summarize(run, tmp_path):
    out, meter = run
    old = tmp_path / "old"
    old.mkdir()
    for sub in ("manifest", "breakdown", "steps"):
        (old / sub).mkdir()
        for name in os.listdir(out / sub):
            data = (out / sub / name).read_bytes()
            if sub == "steps":  # drop the device and energy columns, as an older flopcount wrote them
                table = pq.read_table(pa.BufferReader(data))
                table = table.drop_columns([c for c in en.RESOURCE_COLUMNS if c.startswith(("device", "gpu", "cpu"))])
                pq.write_table(table, old / sub / name)
            else:
                (old / sub / name).write_bytes(data)
    summary = flopcount.summarize(old)
    assert summary["training_flops"] == meter.summary()["training_flops"]
    assert summary["time"]["hardware_s"] is None and summary["time"]["wall_clock_s"] > 0
    assert summary["energy"]["total_j"] is None and summary["energy"]["complete"] is False


def test_cop_form_from_the_command_line(run):
    out, _ = run
    frame = flopcount.read_trace(out)
    done = cli("report", out, "--form", "cop", "--format", "json")
    assert done.returncode == 0, done.stderr
    form = json.loads(done.stdout)
    fields = {f["field"]: f for f in form["fields"]}
    assert (fields["Model dependencies"]["number"], fields["Model dependencies"]["value"]) == ("1.6", BASE)
    energy = fields["Amount of energy used for training"]
    assert energy["value"] == pytest.approx((sum(JOULES) + STEPS * DRAM_JOULES) / 3.6e9)
    assert energy["status"] == "measured"
    hardware_days = (frame.end_time - frame.start_time).sum() / 86_400
    assert fields["Training time"]["value"]["hardware_days"] == pytest.approx(hardware_days)
    assert form["notification"]["status"] == "not reached"
    html = cli("report", out, "--form", "cop", "--format", "html")
    assert html.returncode == 2 and html.stderr.count("\n") == 1 and "Traceback" not in html.stderr


def run_cli(capsys, *args) -> str:
    """The CLI in-process (the subprocess path is covered above): stdout of a successful run."""
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_markdown_form_and_report_sections(run, capsys):
    out, _ = run
    markdown = run_cli(capsys, "report", out, "--form", "cop")
    assert f"| 1.6 Model dependencies | {BASE} (modified by fine-tuning) | pre-filled |" in markdown
    assert "| Amount of energy used for training | " in markdown and "| measured |" in markdown
    audit = run_cli(capsys, "report", out, "--format", "md")
    for title in ("## Training time and energy", "## Hardware-based cross-check", "## Notification timing"):
        assert title in audit
    text = run_cli(capsys, "summarize", out)
    assert "training time" in text and "energy            " in text


def day(timestamp: float) -> dt.date:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).date()


def test_notification_timing_actual_and_forecast(run, capsys):
    out, meter = run
    frame = flopcount.read_trace(out).sort_values("end_time")
    per_step = frame.training_flops.tolist()
    # a base model whose third is reached during the second step: the window starts that day
    base_flops = 3 * (per_step[0] + per_step[1] / 2)
    done = run_cli(capsys, "report", out, "--form", "cop", "--format", "json", "--base-model-flops", repr(base_flops))
    notification = json.loads(done)["notification"]
    crossed = day(frame.end_time.iloc[1])
    assert notification["status"] == "reached" and notification["date"] == crossed.isoformat()
    assert notification["notify_by"] == (crossed + dt.timedelta(days=14)).isoformat()
    audit = json.loads(run_cli(capsys, "report", out, "--format", "json", "--base-model-flops", repr(base_flops)))
    assert audit["compliance"]["notification"]["date"] == crossed.isoformat()
    # not reached yet, but a plan of 100x the measured steps crosses: expected, known today
    base_flops = 3 * sum(per_step) * 10
    planned = run_cli(capsys, "report", out, "--form", "cop", "--format", "json", "--base-model-flops",
                      repr(base_flops), "--steps", 100 * STEPS)
    notification = json.loads(planned)["notification"]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert notification["status"] == "expected" and notification["known_since"] == today.isoformat()
    assert notification["notify_by"] == (today + dt.timedelta(days=14)).isoformat()
