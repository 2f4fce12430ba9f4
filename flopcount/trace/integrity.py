"""The one integrity check behind every consumer: ``verify``, ``check``, ``summarize``,
``estimate``, ``report`` and ``flopcount run`` all call ``check_integrity`` and say "verified"
only when its ``verified`` is True (docs/traces.md, "Integrity").

Interface (stable; consumers rely on it):

    result = check_integrity(traces, digest=None, public_key=None, ledger=None)
    result.verified   True only when `flopcount verify` with the same options would exit 0
    result.problems   one line per finding (an altered part, a segment without a close, ...)
    result.digest     the trace digest now (the heads of every writer's chain, combined)
    result.signed_by  the key id whose signatures were checked, else None ("not checked")
    result.as_dict()  {"verified", "problems", "digest", "signed_by"} for JSON outputs

``traces`` is an opened ``TraceSet`` (trace/reader.py). Unusable input (a malformed manifest,
an unknown schema version, an empty directory) raises TraceError (exit 2), as reading does.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Integrity:
    verified: bool
    problems: list[str] = field(default_factory=list)
    digest: str | None = None
    signed_by: str | None = None
    parts_checked: int = 0
    notes: list[str] = field(default_factory=list)  # facts that are not findings ("signatures present, not checked")

    def as_dict(self) -> dict:
        return {"verified": self.verified, "problems": list(self.problems), "digest": self.digest,
                "signed_by": self.signed_by}


def check_integrity(traces, *, digest: str | None = None, public_key=None, ledger=None) -> Integrity:
    """Every check `flopcount verify` makes, over every trace dir of ``traces``."""
    from ..distributed import rank_integrity  # first version: moves into trace/ with the new manifest
    from . import manifest as mf

    problems: list[str] = []
    parts = 0
    for trace in traces.traces:
        check = mf.verify(trace.storage)
        problems += check.problems
        parts += check.parts_checked
        problems += rank_integrity(trace.manifests, trace.name if len(traces.traces) > 1 else "")["rank_problems"]
    heads = [t.digest for t in traces.traces if t.digest]
    combined = heads[0] if len(heads) == 1 else (mf.combine_digests(heads) if heads else None)
    if digest is not None and digest != combined:
        problems.append(f"the traces no longer have digest {digest} (now {combined})")
    return Integrity(verified=not problems, problems=problems, digest=combined, signed_by=None,
                     parts_checked=parts)


def unwritten_problems(manifests: dict[str, list[dict]], label: str = "") -> list[str]:
    """One finding per closed segment whose ``unwritten`` step ranges are not empty: steps the
    writer could not store (a storage fault; trace/spool.py) are missing from every total."""
    from .spool import format_ranges

    where = f"{label}: " if label else ""
    problems = []
    for name, entries in sorted(manifests.items()):
        rank = next((e.get("rank") for e in entries if e.get("type") == "segment"), name)
        for entry in entries:
            if entry.get("type") == "close" and entry.get("unwritten"):
                problems.append(f"{where}rank {rank} segment {entry.get('segment')}: steps "
                                f"{format_ranges(entry['unwritten'])} could not be written (storage fault): "
                                f"they are missing from the totals")
    return problems
