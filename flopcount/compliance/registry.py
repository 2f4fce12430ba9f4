"""The base-model registry: published training compute of open base models (base_models.csv).

Columns: ``hf_id`` (Hugging Face id), ``aliases`` (';'-separated), ``training_flop`` (empty when
not disclosed), ``method`` (reported / 6ND / hardware / unknown), ``systemic_risk`` (true/false),
``source``. Names match case-insensitively, ignoring '-', '_', ' ' and '/' (so ``Llama-3.1-8B``,
``llama3.1 8b`` and ``meta-llama/Llama-3.1-8B`` are one model).
"""
from __future__ import annotations

import csv
import difflib
import functools
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import BadInput

METHODS = ("reported", "6ND", "hardware", "unknown")


class UnknownBaseModel(BadInput):
    """A base-model name that is not in the registry (message lists close matches)."""


@dataclass(frozen=True)
class BaseModel:
    hf_id: str
    aliases: tuple[str, ...]
    training_flop: float | None
    method: str
    systemic_risk: bool
    source: str

    def as_dict(self) -> dict:
        return {"hf_id": self.hf_id, "aliases": list(self.aliases), "training_flop": self.training_flop,
                "method": self.method, "systemic_risk": self.systemic_risk, "source": self.source}


def _key(name: str) -> str:
    return re.sub(r"[-_ /]", "", name.strip().lower())


def parse_rows(rows) -> list[BaseModel]:
    models = []
    for number, row in enumerate(rows, 2):
        flop = row["training_flop"].strip()
        if row["method"] not in METHODS:
            raise BadInput(f"flopcount: base_models.csv line {number}: method {row['method']!r} "
                             f"is not one of {', '.join(METHODS)}")
        models.append(BaseModel(
            hf_id=row["hf_id"].strip(),
            aliases=tuple(a.strip() for a in row["aliases"].split(";") if a.strip()),
            training_flop=float(flop) if flop else None, method=row["method"],
            systemic_risk=row["systemic_risk"].strip().lower() == "true", source=row["source"].strip()))
    return models


@functools.lru_cache(maxsize=1)
def base_models() -> tuple[BaseModel, ...]:
    """Every registry entry, in file order."""
    text = resources.files(__package__).joinpath("base_models.csv").read_text(encoding="utf-8")
    return tuple(parse_rows(csv.DictReader(text.splitlines())))


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, BaseModel]:
    index = {}
    for model in base_models():
        for name in (model.hf_id, model.hf_id.split("/")[-1], *model.aliases):
            index.setdefault(_key(name), model)
    return index


def close_matches(name: str, n: int = 3) -> list[str]:
    ids = [m.hf_id for m in base_models()]
    by_key = {_key(i): i for i in ids}
    by_key.update({_key(i.split("/")[-1]): i for i in ids})
    keys = difflib.get_close_matches(_key(name), list(by_key), n=n * 2, cutoff=0.6)
    return list(dict.fromkeys(by_key[k] for k in keys))[:n]


def lookup(name: str) -> BaseModel:
    """The registry entry for ``name`` (an id or alias), or UnknownBaseModel naming close matches."""
    model = _index().get(_key(str(name)))
    if model is not None:
        return model
    suggestions = close_matches(str(name))
    hint = f"did you mean {', '.join(suggestions)}?" if suggestions else "see `flopcount models`"
    raise UnknownBaseModel(f"flopcount: base model {name!r} is not in the registry; {hint} "
                           "(or give its training compute with --base-model-flops)")
