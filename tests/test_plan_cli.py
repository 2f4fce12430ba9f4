"""flopcount plan on the command line and through the Python API in a subprocess: outputs,
length histograms, crossing dates, bad input, and the organisation's model registry."""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flopcount.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=600)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def plan_json(*args, env=None):
    done = run("plan", *args, "--json", env=env)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_python_api_in_a_subprocess_matches_the_cli(config):
    code = ("import json, flopcount; print(json.dumps(flopcount.plan(%r, seq_len=16, batch_size=2, steps=7, "
            "lora_rank=4, base_model_flops=1e20)))" % config)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert done.returncode == 0, done.stderr
    api = json.loads(done.stdout)
    cli = plan_json("--config", config, "--seq-len", "16", "--batch-size", "2", "--steps", "7", "--lora-rank", "4",
                    "--base-model-flops", "1e20")
    for key in ("training_flops", "hardware_flops", "steps", "tokens", "threshold_flops", "status"):
        assert api[key] == cli[key]
    step = cli["per_step"]["training_flops"]
    assert cli["training_flops"] == 7 * step and cli["tokens"] == 7 * 2 * 16
    limit = Fraction(10**20, 3)
    n = cli["max_steps_below_threshold"]
    assert n * step < limit <= (n + 1) * step
    near = cli["max_steps_below_approaching"]
    assert near * step < limit * Fraction(4, 5) <= (near + 1) * step
    assert cli["max_tokens_below_threshold"] == n * 32
    six = 6 * cli["parameters"] * cli["tokens"]
    assert cli["formulas"]["6ND"]["flops"] == six
    assert cli["formulas"]["6ND"]["deviation"] == pytest.approx(six / cli["training_flops"] - 1)
    aws = (4 * cli["parameters"] + 2 * cli["trainable_parameters"]) * cli["tokens"]
    assert cli["formulas"]["aws"]["flops"] == aws


def test_crossing_date_and_notification_deadline(config, tmp_path):
    # A tiny base-model compute so that the plan crosses the threshold.
    p = plan_json("--config", config, "--seq-len", "16", "--batch-size", "2", "--steps", "100000",
                  "--base-model-flops", "3e12", "--seconds-per-step", "30", "--start", "2026-03-01T08:00")
    step = p["per_step"]["training_flops"]
    crossing = math.ceil(Fraction(3 * 10**12, 3) / step)
    assert p["status"] == "exceeds" and p["crossing"]["step"] == crossing
    when = dt.datetime(2026, 3, 1, 8, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=30 * crossing)
    assert p["crossing"]["date"] == when.isoformat(timespec="seconds")
    assert p["crossing"]["notify_by"] == (when + dt.timedelta(days=14)).date().isoformat()
    done = run("plan", "--config", config, "--seq-len", "16", "--batch-size", "2", "--steps", "100000",
               "--base-model-flops", "3e12", "--tokens-per-second", "2", "--start", "2026-03-01",
               "--format", "md", "-o", str(tmp_path / "plan.md"))
    assert done.returncode == 1  # the plan exceeds the threshold
    memo = (tmp_path / "plan.md").read_text()
    assert memo.startswith("# Training compute plan") and "| status | exceeds" in memo
    assert "notification due by" in memo


def test_length_histogram_is_the_weighted_mean_of_real_steps(config, tmp_path):
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("length,count\n16,3\n32,1\n")
    mixed = plan_json("--config", config, "--lengths", str(lengths), "--batch-size", "2", "--steps", "8")
    short = plan_json("--config", config, "--seq-len", "16", "--batch-size", "2", "--steps", "1")
    long = plan_json("--config", config, "--seq-len", "32", "--batch-size", "2", "--steps", "1")
    f16, f32 = short["training_flops"], long["training_flops"]
    assert mixed["per_length"]["16"]["training_flops"] == f16 and mixed["per_length"]["32"]["training_flops"] == f32
    assert Fraction(mixed["training_flops"]) == round(Fraction(8 * (3 * f16 + f32), 4))
    assert mixed["tokens"] == 8 * (3 * 32 + 64) // 4
    as_json = tmp_path / "lengths.json"
    as_json.write_text(json.dumps({"lengths": {"16": 3, "32": 1}}))
    assert plan_json("--config", config, "--lengths", str(as_json), "--batch-size", "2",
                     "--steps", "8")["training_flops"] == mixed["training_flops"]


@pytest.mark.parametrize("args, says", [
    (["--config", "/nonexistent/config.json", "--seq-len", "8", "--batch-size", "1", "--steps", "1"],
     "cannot read config /nonexistent/config.json"),
    (["--config", "no-such-model-xyz", "--seq-len", "8", "--batch-size", "1", "--steps", "1"], "not in the registry"),
    (["--config", "{cfg}", "--seq-len", "8", "--batch-size", "1", "--steps", "1", "--qlora"], "--lora-rank"),
    (["--config", "{cfg}", "--seq-len", "8", "--batch-size", "1", "--steps", "1", "--lora-rank", "2",
      "--lora-targets", "wq"], "name no Linear layer"),
    (["--config", "{cfg}", "--seq-len", "8", "--batch-size", "1", "--steps", "1", "--start", "March"],
     "not an ISO date"),
    (["--config", "{cfg}", "--lengths", "{bad}", "--batch-size", "1", "--steps", "1"], "length,count"),
    (["--config", "{cfg}", "--seq-len", "0", "--batch-size", "1", "--steps", "1"], "at least 1"),
    (["--config", "{notjson}", "--seq-len", "8", "--batch-size", "1", "--steps", "1"], "is not JSON"),
])
def test_bad_input_is_one_line_and_exit_2(config, tmp_path, args, says):
    bad = tmp_path / "bad.csv"
    bad.write_text("len;n\n8;1\n")
    notjson = tmp_path / "broken.json"
    notjson.write_text("{model_type: llama")
    args = [a.format(cfg=config, bad=bad, notjson=notjson) for a in args]
    done = run("plan", *args)
    assert done.returncode == 2
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_organisation_models_lineage_and_shipped_configs(config, tmp_path):
    org = tmp_path / "models.csv"
    org.write_text("hf_id,aliases,training_flop,method,systemic_risk,source,base_model,config\n"
                   f"acme/llama-legal-v1,acme-legal-v1,2.0e20,measured,false,flopcount trace runs/legal-v1,"
                   f"meta-llama/Llama-3.1-8B,{config}\n")
    listed = run("models", "--file", str(org), "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(m for m in json.loads(listed.stdout) if m["hf_id"] == "acme/llama-legal-v1")
    assert entry["base_model"] == "meta-llama/Llama-3.1-8B" and entry["method"] == "measured"
    # A fine-tune of the organisation's own fine-tune: one third of the original model's compute.
    p = plan_json("--config", "acme-legal-v1", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
                  env={"FLOPCOUNT_MODELS": str(org)})
    assert p["base_model"] == "acme/llama-legal-v1"
    assert p["threshold_flops"] == pytest.approx(1.2e24 / 3)
    assert p["threshold_basis"] == "base_model_compute"
    bad = tmp_path / "bad_models.csv"
    bad.write_text("hf_id,aliases,training_flop,method,systemic_risk,source\nacme/x,,lots,measured,false,me\n")
    done = run("models", "--file", str(bad))
    assert done.returncode == 2 and "training_flop 'lots' is not a number" in done.stderr


def test_every_shipped_config_names_a_registry_model():
    from flopcount.compliance.registry import lookup
    from flopcount.planning.configs import shipped_config_name

    folder = os.path.join(ROOT, "flopcount", "compliance", "configs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    assert names
    for name in names:
        hf_id = name[:-len(".json")].replace("--", "/")
        assert shipped_config_name(lookup(hf_id).hf_id) == name
        with open(os.path.join(folder, name)) as f:
            assert json.load(f)["model_type"]


SHIPPED = sorted(n for n in os.listdir(os.path.join(ROOT, "flopcount", "compliance", "configs")) if n.endswith(".json"))


def test_every_shipped_config_has_a_source():
    import csv

    with open(os.path.join(ROOT, "flopcount", "compliance", "configs", "sources.csv"), newline="") as f:
        sources = {row["config"]: row["source"] for row in csv.DictReader(f)}
    assert sorted(sources) == SHIPPED
    assert all(len(source) > 20 for source in sources.values())


def one_layer(values: dict) -> dict:
    """The config with one decoder layer (per-layer lists cut to match): the same modules, built fast."""
    values = dict(values["text_config"]) if isinstance(values.get("text_config"), dict) else dict(values)
    values["num_hidden_layers"] = 1
    for key in ("layer_types", "no_rope_layers"):
        if isinstance(values.get(key), list):
            values[key] = values[key][:1]
    return values


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_builds_and_plans_one_step(name):
    """Each shipped config builds with the installed transformers on the meta device (cut to one layer) and
    plans one full fine-tuning step; its lm_head GEMMs equal the closed form 3 x 2·T·hidden·vocab
    (forward, input gradient, weight gradient)."""
    import flopcount
    from flopcount.planning.configs import shipped_config

    values = shipped_config(name[:-len(".json")].replace("--", "/"))
    small = one_layer(values)
    attn = "eager" if small["model_type"] in ("gpt_oss", "gemma2") else "sdpa"  # transformers has no SDPA path for these
    tokens = 8
    planned = flopcount.plan(small, seq_len=tokens, batch_size=1, steps=1, optimizer="sgd", attn=attn)
    assert planned["per_step"]["by_module"]["lm_head"] == 3 * 2 * tokens * small["hidden_size"] * small["vocab_size"]
    assert planned["per_step"]["uncounted_ops"] == {}


def test_demo_planned_step_equals_metered(tmp_path):
    """`make demo`'s script plans its fine-tune before training and prints the planned training FLOPs beside
    the metered ones: the same number (its data pipeline samples with Python ints, so it adds no tensor op)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "finetune.py"), "--out", str(tmp_path / "demo"),
                           "--steps", "2", "--batch", "2", "--seq", "32"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("Planned before training"))
    planned, metered = (int(x) for x in re.findall(r"(\d+) FLOP", line))
    assert planned == metered > 0 and line.endswith("identical")
