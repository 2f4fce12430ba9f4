"""An auditor's machine has no PyTorch: the analysis commands (verify, summarize, check, estimate,
report, models) import no torch, and run where torch is not installed; the meter says in one
line how to install it. `import flopcount` itself imports nothing heavy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import flopcount
from flopcount._torch import MIN_TORCH, _version_tuple
from tracegen import train

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI with a meta-path finder in front that makes every `import torch` fail, then reports
# which heavy modules the command imported (stderr, last line).
BLOCKED = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, NoTorch())
from flopcount.cli import main
try:
    code = main(sys.argv[1:])
finally:
    sys.stderr.write("\\nimported: " + " ".join(m for m in ("torch", "pandas") if m in sys.modules) + "\\n")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("no-torch") / "run"
    train(out, steps=4, flush_every=2, base_model="Llama-3.2-1B")
    return out


def analysis_commands(run, out):
    """(argv, expected exit code) of every analysis command."""
    return [
        (["verify", run, "--json"], 0),
        (["summarize", run, "--json"], 0),
        (["check", run, "--json"], 0),
        (["check", run, "--base-model-flops", "1"], 1),  # exceeds: a finding, still without torch
        (["estimate", run, "--steps", "100", "--json"], 0),
        (["report", run, "--format", "md", "-o", out / "report.md"], 0),
        (["report", run, "--format", "json", "-o", out / "report.json"], 0),
        (["report", run, "--form", "cop", "--format", "md"], 0),
        (["models"], 0),
        (["check", out / "missing"], 2),
    ]


def test_analysis_commands_import_no_torch(trace_dir, tmp_path):
    for argv, code in analysis_commands(trace_dir, tmp_path):
        result = subprocess.run([sys.executable, "-c", BLOCKED, *map(str, argv)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == code, (argv, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (argv, result.stderr)
        imported = result.stderr.strip().splitlines()[-1]
        assert imported.startswith("imported:") and "torch" not in imported, (argv, imported)
        if argv[0] in ("verify", "summarize", "check", "estimate", "models"):
            assert "pandas" not in imported, (argv, imported)  # 0.3 s of start-up pyarrow does not need
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["integrity"]["verified"] and report["compliance"]["status"] == "below"


ANALYSIS_MODULES = ["flopcount", "flopcount.cli", "flopcount.errors", "flopcount.summary", "flopcount.energy",
                    "flopcount.accounting", "flopcount.hardware", "flopcount.compliance", "flopcount.compliance.method",
                    "flopcount.compliance.forecast", "flopcount.report", "flopcount.report.build",
                    "flopcount.report.cop", "flopcount.report.text", "flopcount.report.markdown",
                    "flopcount.report.html", "flopcount.trace.reader", "flopcount.trace.integrity",
                    "flopcount.trace.manifest", "flopcount.trace.schema",
                    "flopcount.trace.storage"]


def test_the_analysis_modules_import_no_torch():
    code = BLOCKED.split("from flopcount.cli")[0] + "".join(f"import {m}\n" for m in ANALYSIS_MODULES) + (
        "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_flopcount_is_light_and_the_meter_is_the_function():
    code = ("import sys, flopcount; heavy = [m for m in ('torch', 'pandas', 'pyarrow') if m in sys.modules]; "
            "print(heavy, flopcount.__version__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["[]", flopcount.__version__], result.stderr
    # Both spellings work, in either order, in fresh processes: the public name is the function.
    for code in ("import flopcount; m = flopcount.meter; import flopcount.meter; from flopcount.meter import Meter; "
                 "assert flopcount.meter is m and callable(m) and flopcount.Meter is Meter",
                 "from flopcount.meter import Meter; import flopcount; "
                 "assert callable(flopcount.meter) and flopcount.meter.__name__ == 'meter' "
                 "and flopcount.Meter is Meter and isinstance(flopcount.meter(), Meter)"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]


def test_the_meter_says_how_to_install_torch():
    code = BLOCKED.split("from flopcount.cli")[0] + "import flopcount\nflopcount.meter(out=None)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: flopcount: the meter needs PyTorch >= 2.5, which is not installed: "
                           "pip install 'flopcount[torch]'"), last
    assert MIN_TORCH == (2, 5)
    assert _version_tuple("2.4.1+cu121") < MIN_TORCH <= _version_tuple("2.5.0") < _version_tuple("2.13.0+cpu")


def test_pip_install_flopcount_does_not_require_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [d.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]]
    assert "torch" not in names and {"numpy", "pyarrow"} <= set(names)
    assert project["optional-dependencies"]["torch"] == ["torch>=2.5"]


@pytest.fixture(scope="module")
def venv_without_torch(tmp_path_factory):
    """A fresh venv (no system site-packages) with only numpy, pyarrow and cryptography, from the
    local package index; flopcount comes from this checkout on PYTHONPATH."""
    root = tmp_path_factory.mktemp("venv") / "auditor"
    made = subprocess.run([sys.executable, "-m", "venv", root], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv here: {made.stderr.strip()[-300:]}")
    python = root / "bin" / "python"
    pip = subprocess.run([python, "-m", "pip", "install", "--quiet", "numpy", "pyarrow", "cryptography"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install numpy, pyarrow and cryptography into a fresh venv here: "
                    f"{pip.stderr.strip()[-300:]}")
    return python


def test_the_analysis_commands_run_where_torch_is_not_installed(venv_without_torch, trace_dir, tmp_path):
    python = venv_without_torch
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "FLOPCOUNT_RUN")}
    env["PYTHONPATH"] = str(REPO)
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert probe.stdout.strip() == "None", probe  # really no torch there
    for argv, code in analysis_commands(trace_dir, tmp_path):
        result = subprocess.run([python, "-m", "flopcount.cli", *map(str, argv)], capture_output=True, text=True,
                                env=env, timeout=120)
        assert result.returncode == code, (argv, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (argv, result.stderr)
    verify = subprocess.run([python, "-m", "flopcount.cli", "verify", trace_dir, "--json"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert json.loads(verify.stdout)["verified"] is True
    meter = subprocess.run([python, "-c", "import flopcount; flopcount.meter()"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert meter.returncode == 1
    assert "flopcount: the meter needs PyTorch >= 2.5, which is not installed" in meter.stderr.strip().splitlines()[-1]
