"""Where a planned model's architecture comes from: a config.json path, a dict, or a registry name.

Registry models ship their public config.json values in flopcount/compliance/configs/, one file
per model named after its Hugging Face id ('/' written as '--'), so `plan --config NAME` works
offline. An organisation's own models (FLOPCOUNT_MODELS) may name a config file in their
``config`` column.
"""
from __future__ import annotations

import json
import os
from importlib import resources

from ..errors import BadInput


def shipped_config_name(hf_id: str) -> str:
    return hf_id.replace("/", "--") + ".json"


def shipped_config(hf_id: str) -> dict | None:
    """The shipped config.json values of a registry model, or None when none ships."""
    path = resources.files("flopcount.compliance").joinpath("configs", shipped_config_name(hf_id))
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except OSError as e:
        raise BadInput(f"flopcount: cannot read config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"flopcount: config {path} is not JSON ({e.msg} at line {e.lineno}); "
                         "give a Hugging Face config.json") from None
    if not isinstance(values, dict):
        raise BadInput(f"flopcount: config {path} is not a JSON object; give a Hugging Face config.json")
    return values


def load_config(config) -> tuple[dict, str, str | None]:
    """(config.json values, a name for the plan, the registry id when ``config`` names one)."""
    if isinstance(config, dict):
        return dict(config), str(config.get("_name_or_path") or config.get("model_type") or "config"), None
    text = os.fspath(config)
    if os.path.exists(text) or text.endswith(".json"):
        if os.path.isdir(text):
            text = os.path.join(text, "config.json")
        return _read(text), text, None
    from ..compliance.registry import lookup

    entry = lookup(text)  # UnknownBaseModel (one line, close matches) when it is no registry name
    if entry.config:
        return _read(entry.config), entry.hf_id, entry.hf_id
    values = shipped_config(entry.hf_id)
    if values is None:
        raise BadInput(f"flopcount: no architecture config ships for {entry.hf_id}; give its config.json "
                         "with --config PATH")
    return values, entry.hf_id, entry.hf_id
