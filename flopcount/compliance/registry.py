"""The base-model registry: published training compute of open base models (base_models.csv).

Columns: ``hf_id`` (Hugging Face id), ``aliases`` (';'-separated), ``training_flop`` (empty when
not disclosed), ``method`` (reported / 6ND / hardware / combined / measured / unknown), ``systemic_risk``
(true/false), ``source``, and two optional ones: ``base_model`` (the model this one was
fine-tuned from: its lineage) and ``config`` (a config.json path for `flopcount plan`).
Which figure a shipped row carries: the provider's published training-compute figure where there is
one (``reported``), else Epoch AI's estimate (its technique as the method: ``6ND``, ``hardware``, or
``combined`` for Epoch's geometric mean of the two), else none (``unknown``: the threshold falls back to
one third of 1e23 FLOP). A 6·N·D figure computed from published parameters and tokens is not used
where neither the provider nor Epoch AI gives one; ``source`` names where each figure comes from.
Names match case-insensitively, ignoring '-', '_', ' ' and '/' (so ``Llama-3.1-8B``,
``llama3.1 8b`` and ``meta-llama/Llama-3.1-8B`` are one model).

An organisation adds its own models, its earlier fine-tunes included, in a CSV with the same
columns: ``FLOPCOUNT_MODELS=path.csv`` (several paths joined with ':') or
``flopcount models --file PATH``. Its rows are merged over the shipped registry (a row with a
shipped model's id or alias replaces it). For a fine-tune (``base_model`` set), the threshold of
a further modification is one third of the *original* model's training compute: lineage() walks
``base_model`` up to the first model that is not itself a fine-tune; the fine-tune's own
``training_flop`` is the compute of that earlier modification (method ``measured`` when
flopcount counted it).
"""
from __future__ import annotations

import csv
import difflib
import functools
import os
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import BadInput

METHODS = ("reported", "6ND", "hardware", "combined", "measured", "unknown")
COLUMNS = ("hf_id", "aliases", "training_flop", "method", "systemic_risk", "source")
OPTIONAL_COLUMNS = ("base_model", "config")
ENV = "FLOPCOUNT_MODELS"


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
    base_model: str | None = None  # the model this one was fine-tuned from
    config: str | None = None  # a config.json path (organisation rows); shipped configs: planning/configs.py
    origin: str = "shipped"  # "shipped" or the CSV file the row came from

    def as_dict(self) -> dict:
        return {"hf_id": self.hf_id, "aliases": list(self.aliases), "training_flop": self.training_flop,
                "method": self.method, "systemic_risk": self.systemic_risk, "source": self.source,
                "base_model": self.base_model, "config": self.config, "origin": self.origin}


def _key(name: str) -> str:
    return re.sub(r"[-_ /]", "", name.strip().lower())


def parse_rows(rows, where: str = "base_models.csv", origin: str = "shipped") -> list[BaseModel]:
    models = []
    for number, row in enumerate(rows, 2):
        missing = [c for c in COLUMNS if row.get(c) is None]
        if missing:
            raise BadInput(f"flopcount: {where} line {number}: missing column(s) {', '.join(missing)} "
                             f"(the header must name {','.join(COLUMNS)}[,base_model,config])")
        flop = row["training_flop"].strip()
        method = row["method"].strip()
        if method not in METHODS:
            raise BadInput(f"flopcount: {where} line {number}: method {method!r} "
                             f"is not one of {', '.join(METHODS)}")
        try:
            value = float(flop) if flop else None
        except ValueError:
            raise BadInput(f"flopcount: {where} line {number}: training_flop {flop!r} is not a number "
                             "(write FLOP like 8.4e22, or leave it empty when unknown)") from None
        if value is not None and not value > 0:
            raise BadInput(f"flopcount: {where} line {number}: training_flop {flop!r} must be positive")
        if not row["hf_id"].strip():
            raise BadInput(f"flopcount: {where} line {number}: hf_id is empty")
        config = (row.get("config") or "").strip() or None
        if config and origin != "shipped" and not os.path.isabs(config):
            config = os.path.join(os.path.dirname(os.path.abspath(origin)), config)
        models.append(BaseModel(
            hf_id=row["hf_id"].strip(),
            aliases=tuple(a.strip() for a in row["aliases"].split(";") if a.strip()),
            training_flop=value, method=method,
            systemic_risk=row["systemic_risk"].strip().lower() == "true", source=row["source"].strip(),
            base_model=(row.get("base_model") or "").strip() or None, config=config, origin=origin))
    return models


def read_file(path: str) -> list[BaseModel]:
    """An organisation's model CSV (same columns as base_models.csv)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"flopcount: cannot read model registry file {path}: {e.strerror}") from None
    return parse_rows(csv.DictReader(text.splitlines()), where=path, origin=path)


@functools.lru_cache(maxsize=1)
def shipped_models() -> tuple[BaseModel, ...]:
    text = resources.files(__package__).joinpath("base_models.csv").read_text(encoding="utf-8")
    return tuple(parse_rows(csv.DictReader(text.splitlines())))


def extra_files() -> tuple[str, ...]:
    return tuple(p for p in os.environ.get(ENV, "").split(os.pathsep) if p)


@functools.lru_cache(maxsize=8)
def _merged(files: tuple[str, ...]) -> tuple[BaseModel, ...]:
    models = list(shipped_models())
    for path in files:
        for model in read_file(path):
            names = {_key(n) for n in (model.hf_id, model.hf_id.split("/")[-1], *model.aliases)}
            models = [m for m in models if _key(m.hf_id) not in names]  # the organisation's row wins
            models.append(model)
    return tuple(models)


def base_models(files: tuple[str, ...] | None = None) -> tuple[BaseModel, ...]:
    """Every registry entry: the shipped ones, then those of FLOPCOUNT_MODELS / ``files``."""
    return _merged(tuple(files) if files is not None else extra_files())


@functools.lru_cache(maxsize=8)
def _index(files: tuple[str, ...]) -> dict[str, BaseModel]:
    index = {}
    for model in reversed(_merged(files)):  # later files first: they override
        for name in (model.hf_id, model.hf_id.split("/")[-1], *model.aliases):
            index.setdefault(_key(name), model)
    return index


def close_matches(name: str, n: int = 3, files: tuple[str, ...] | None = None) -> list[str]:
    ids = [m.hf_id for m in base_models(files)]
    by_key = {_key(i): i for i in ids}
    by_key.update({_key(i.split("/")[-1]): i for i in ids})
    keys = difflib.get_close_matches(_key(name), list(by_key), n=n * 2, cutoff=0.6)
    return list(dict.fromkeys(by_key[k] for k in keys))[:n]


def lookup(name: str, files: tuple[str, ...] | None = None) -> BaseModel:
    """The registry entry for ``name`` (an id or alias), or UnknownBaseModel naming close matches."""
    files = tuple(files) if files is not None else extra_files()
    model = _index(files).get(_key(str(name)))
    if model is not None:
        return model
    suggestions = close_matches(str(name), files=files)
    hint = f"did you mean {', '.join(suggestions)}?" if suggestions else "see `flopcount models`"
    raise UnknownBaseModel(f"flopcount: base model {name!r} is not in the registry; {hint} "
                           "(or give its training compute with --base-model-flops)")


def lineage(model: BaseModel, files: tuple[str, ...] | None = None) -> list[BaseModel]:
    """``model`` and the models it was fine-tuned from, the original (root) model last."""
    chain = [model]
    while chain[-1].base_model:
        parent = lookup(chain[-1].base_model, files)
        if any(parent.hf_id == m.hf_id for m in chain):
            raise BadInput(f"flopcount: the lineage of {model.hf_id} is a cycle "
                             f"({' -> '.join(m.hf_id for m in chain)} -> {parent.hf_id}); fix its base_model column")
        chain.append(parent)
    return chain
