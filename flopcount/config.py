"""MeterConfig: every option of a meter, documented and validated once.

``Meter.__init__`` (``flopcount.meter(out, **options)``), ``flopcount run``'s options and the
environment it hands its processes (integrations/launcher.py, integrations/process.py, the
``run`` command in cli.py) and the Trainer and Lightning callbacks (integrations/hf.py,
integrations/lightning.py) all derive from the fields below: each field's metadata holds its
documentation (``doc``), whether ``flopcount run`` passes it to its processes (``run``) and its
command-line option, if it has one (``cli``). Imports no torch: the CLI builds its options from it.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from fractions import Fraction

from .budget import DEFAULT_WARN_AT, budget_limit, check_warn_at
from .errors import BadInput

BACKENDS = ("auto", "dispatch", "native")
BUDGET_ACTIONS = ("raise", "stop")


def option(default, doc: str, *, run: bool = False, cli: dict | None = None):
    """A MeterConfig field: ``run``: passed on by ``flopcount run``; ``cli``: its command-line
    option (``help``, ``metavar``, ``kind``: the CLI's parser for the value, ``action``)."""
    return field(default=default, metadata={"doc": doc, "run": run, "cli": cli})


@dataclass(frozen=True)
class MeterConfig:
    """The options of one meter (each field's ``doc`` below; ``MeterConfig.describe()``)."""

    # In the order `flopcount run --help` lists them.
    out: object = option(None, "trace dir or fsspec URI; None keeps everything in memory",
                         cli={"help": "trace dir (default: flopcount-run-<UTC time>)", "metavar": "DIR"})
    base_model: str | None = option(
        None, "base model id or alias from the registry: the threshold's basis", run=True,
        cli={"help": "base model id or alias from the registry", "metavar": "NAME"})
    base_model_flops: float | None = option(
        None, "the base model's training compute in FLOP, when it is not in the registry", run=True,
        cli={"help": "the base model's training compute in FLOP, when it is not in the registry",
             "metavar": "X", "kind": "flops"})
    strict: bool = option(False, "raise UncountedOpError for any op without a formula", run=True,
                          cli={"help": "fail on any op without a formula", "action": "store_true"})
    backend: str = option("auto", "capture backend: auto (native when it builds, else dispatch), dispatch "
                          "or native", run=True, cli={"help": "capture backend (default auto)", "choices": BACKENDS})
    budget: object = option(
        None, "a fraction of the threshold in (0, 1] or FLOP above 1 (budget.py)", run=True,
        cli={"help": "stop before training compute would reach B: a fraction of the threshold (0.5) or FLOP (1e21)",
             "metavar": "B", "kind": "budget"})
    budget_warn_at: float = option(
        DEFAULT_WARN_AT, "the share of the budget at which a BudgetWarning is issued", run=True,
        cli={"help": f"warn when compute reaches this share of the budget (default {DEFAULT_WARN_AT})",
             "metavar": "F", "kind": "fraction"})
    budget_action: str = option(
        "raise", "when the next step would reach the budget: 'raise' BudgetExceeded from step() or "
        "optimizer.step() (traces flushed), or 'stop': set Meter.should_stop and let the caller stop "
        "(the framework callbacks)")
    module_depth: int | None = option(None, "module names in summaries cut to this many levels", run=True)
    run_id: str | None = option(None, "the run's id in traces and summaries", run=True)
    flush_every: int = option(50, "steps per Parquet part", run=True)
    track_modules: bool = option(True, "attribute FLOPs to modules (by_module)")
    warn: bool = option(True, "warn once per uncounted op and meter failure")
    sync_every: int | None = option(None, "steps between automatic job-wide totals (one all-reduce)")
    auto_steps: bool = option(True, "close a step after each optimizer.step(); False: only step() closes "
                              "steps (the framework callbacks)")
    energy: bool = option(True, "read NVML and RAPL energy counters at step boundaries (docs/energy.md)")
    devices: list | None = option(None, "the CUDA devices this process trains on (default: the rank's "
                                  "device under a launcher, else those holding its memory)")
    signing_key: object = option(None, "an Ed25519 private key file that signs every manifest entry "
                                 "(default: FLOPCOUNT_SIGNING_KEY)")
    ledger: object = option(None, "a file or URI outside out that gets each closing trace digest")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BadInput(f"flopcount: backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        _positive_or_none("module_depth", self.module_depth)
        if not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise BadInput(f"flopcount: flush_every={self.flush_every!r} must be a positive integer")
        _positive_or_none("sync_every", self.sync_every)
        if self.budget_action not in BUDGET_ACTIONS:
            raise BadInput(f"flopcount: budget_action={self.budget_action!r} is not one of "
                           f"{', '.join(BUDGET_ACTIONS)}")
        if self.budget is not None:  # the limit itself needs the threshold: BudgetGuard.create
            check_warn_at(self.budget_warn_at)
            budget_limit(self.budget, Fraction(1))

    def replace(self, **changes) -> "MeterConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Option name -> its documentation."""
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}


def _positive_or_none(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise BadInput(f"flopcount: {name}={value!r} must be a positive integer or None")


def init_signature() -> inspect.Signature:
    """``Meter.__init__``'s signature as help() and editors show it: ``(self, out=None, *, <every
    MeterConfig field>, config=None)``."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature([
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        *(inspect.Parameter(f.name, keyword, default=f.default) for f in dataclasses.fields(MeterConfig)
          if f.name != "out"),
        inspect.Parameter("config", keyword, default=None)])


def run_options() -> tuple[str, ...]:
    """The options ``flopcount run`` passes to its processes (JSON-serialisable values)."""
    return tuple(f.name for f in dataclasses.fields(MeterConfig) if f.metadata["run"])


def cli_options() -> list[tuple[str, object, dict]]:
    """(option name, default, its command-line spec) of the options ``flopcount run`` takes."""
    return [(f.name, f.default, f.metadata["cli"]) for f in dataclasses.fields(MeterConfig) if f.metadata["cli"]]
