"""The one integrity check behind every consumer: ``verify``, ``check``, ``summarize``,
``estimate``, ``report`` and ``flopcount run`` all call ``check_integrity`` and say "verified"
only when its ``verified`` is True (docs/traces.md, "Integrity" and "Threat model").

Interface (stable; consumers rely on it):

    result = check_integrity(traces, digest=None, public_key=None, ledger=None, hmac_key=None)
    result.verified   True only when `flopcount verify` with the same options would exit 0
    result.problems   one line per finding (an altered part, a segment without a close, ...)
    result.digest     the trace digest now (a time cut of every writer's chain: manifest.py)
    result.signed_by  the key id whose Ed25519 signatures were all checked, else None ("not checked")
    result.notes      facts that are not findings ("signatures present, not checked", "extends
                      digest D by N entries"): print them, never read them as "verified"
    result.as_dict()  {"verified", "problems", "digest", "signed_by"} for JSON outputs

``traces`` is an opened ``TraceSet`` (trace/reader.py). Unusable input (a malformed manifest,
an unknown schema version, an empty directory, a malformed digest, key or ledger) raises
TraceError (exit 2), as reading does. Nothing here imports torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import ledger as ledger_log
from . import manifest as mf
from .footer import footer_steps
from .keys import load_verifier
from .lease import active_holders, describe_holder
from .schema import STEPS_SCHEMA
from .storage import TraceError, pa_errors


@dataclass
class Integrity:
    verified: bool
    problems: list[str] = field(default_factory=list)
    digest: str | None = None
    signed_by: str | None = None
    parts_checked: int = 0
    notes: list[str] = field(default_factory=list)  # facts that are not findings ("signatures present, not checked")
    hmac_checked: bool = False  # every entry's HMAC checked with a key the user supplied

    def as_dict(self) -> dict:
        return {"verified": self.verified, "problems": list(self.problems), "digest": self.digest,
                "signed_by": self.signed_by}


def check_integrity(traces, *, digest: str | None = None, public_key=None, ledger=None,
                    hmac_key: str | bytes | None = None) -> Integrity:
    """Every check `flopcount verify` makes, over every trace dir of ``traces``.

    ``digest``: a digest recorded earlier (the run's end, a report): the traces must still hold
    that state (resumed since is fine). ``public_key``: an Ed25519 public key (PEM path or bytes):
    every entry must carry a valid signature by it. ``ledger``: a digest ledger (meter(ledger=)):
    the traces must hold the state of its last record for this location. ``hmac_key``: check every
    HMAC (default: FLOPCOUNT_HMAC_KEY)."""
    verifier = load_verifier(public_key) if public_key is not None else None
    key = mf.hmac_key(hmac_key)
    several = len(traces.traces) > 1
    problems: list[str] = []
    notes: list[str] = []
    parts = 0
    hmacs, signatures, bad_signatures = False, set(), 0
    for trace in traces.traces:
        label = f"{trace.name}: " if several and trace.name else ""
        if not any(trace.all_manifests.values()):
            problems.append(f"{label or trace.storage.describe() + ': '}no manifest entries (the trace files were "
                            "removed?)")
            continue
        for rel, entries in sorted(trace.all_manifests.items()):
            problems += [label + p for p in mf.chain_problems(entries, rel, key)]
            if verifier is not None:
                found = mf.signature_problems(entries, rel, verifier)
                bad_signatures += len(found)
                problems += [label + p for p in found]
            hmacs = hmacs or any("hmac" in e for e in entries)
            signatures.update(e.get("key_id") for e in entries if "sig" in e)
        files = StepsFiles(trace.all_manifests)
        found, checked = mf.part_problems(trace.storage, trace.all_manifests, files)
        problems += [label + p for p in found]
        parts += checked
        problems += [label + p for p in segment_problems(trace.manifests, files.found)]
        problems += rank_integrity(trace.manifests, trace.name if several else "")["rank_problems"]
    problems += [d.describe() for d in traces.duplicates]
    notes += _still_running(traces)
    now = traces.digest
    if digest is not None:
        problems += _against_digest(traces, digest, "digest", notes)
    if ledger is not None:
        problems += _against_ledger(traces, ledger, notes)
    signed_by = None
    if verifier is not None:
        if not bad_signatures:
            signed_by = verifier.key_id
            notes.append(f"Ed25519-signed by key {verifier.key_id}: every entry checked")
    elif signatures:
        ids = ", ".join(sorted(str(k)[:32] for k in signatures))
        notes.append(f"Ed25519 signatures present (key {ids}), not checked: pass --public-key to check them")
    if key is not None and hmacs:
        notes.append("HMAC-signed: every entry's HMAC checked with the given key")
    elif hmacs:
        notes.append("HMAC present, not checked: set FLOPCOUNT_HMAC_KEY to check it")
    return Integrity(verified=not problems, problems=problems, digest=now, signed_by=signed_by,
                     parts_checked=parts, notes=notes, hmac_checked=key is not None and hmacs)


def _still_running(traces) -> list[str]:
    """Writers whose lease is held now: their open segment is a run in progress, not a lost one."""
    notes = []
    for trace in traces.traces:
        try:
            holders = active_holders(trace.storage)
        except (OSError, TraceError):  # unreadable leases say nothing about the trace
            continue
        notes += [f"{trace.storage.describe()}: {h['lease']} is held by a live writer ({describe_holder(h)}): "
                  "its segment is still being written" for h in holders]
    return notes


def _against_digest(traces, expected: str, what: str, notes: list[str]) -> list[str]:
    """Problems when the traces no longer hold the state ``expected`` (whole location, else one of
    its trace dirs when the digest is of a single run of a project dir)."""
    cut = mf.parse_digest(expected)  # TraceError (exit 2) for a malformed digest
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cut / 1e6))
    candidates = [(traces.location, traces.chains)]
    if len(traces.traces) > 1:
        candidates += [(t.name, [c for c in t.manifests.values() if c]) for t in traces.traces]
    for where, chains in candidates:
        later = mf.digest_extension(chains, expected)
        if later is not None:
            scope = "" if where == traces.location else f" (trace dir {where})"
            notes.append(f"holds the state of {what} {expected}{scope} from {when}"
                         + (f", extended by {later} entries since" if later else ", unchanged since"))
            return []
    return [f"the traces no longer hold the state of {what} {expected} (recorded {when}): entries written up to "
            "then were removed, altered or rolled back (an older copy restored, or a later segment deleted)"]


def _against_ledger(traces, location, notes: list[str]) -> list[str]:
    records = ledger_log.read(location)
    record = ledger_log.last_for(records, traces.location, traces.run_ids)
    if record is None:
        return [f"the ledger {location} has no record of {traces.location} (run {', '.join(traces.run_ids)}): "
                "the run's closing digests were not recorded there"]
    return _against_digest(traces, record["digest"], f"the ledger's last record ({location})", notes)


def segment_problems(manifests: dict[str, list[dict]], files: dict | None = None) -> list[str]:
    """Each writer's segments agree with their parts: step ranges in order and not overlapping
    (each part after the previous part's ``next_step``, which ``StepsFiles`` checks against the
    rows), part sequence numbers counting up, a close's steps and rows equal to its parts'
    (``_close_problems``; ``files``: ``StepsFiles.found``, what the parts' files hold). (An honest
    writer never breaks these; an edited manifest that was re-hashed can.)"""
    problems = []
    for rel, entries in sorted(manifests.items()):
        next_step, seq = 0, 0  # the first step number a part may start with (after a trailing row: its own)
        for segment, parts, close in mf.segments_of(entries):
            name = f"{rel} segment {segment['segment']}"
            for part in parts:
                if part["seq"] != seq:
                    problems.append(f"{name}: part {part['seq']} is out of sequence (expected part {seq})")
                if part["first_step"] < next_step:
                    problems.append(f"{name}: part {part['seq']} repeats steps up to {next_step - 1} "
                                    f"(steps {part['first_step']}-{part['last_step']})")
                if part["steps"]["rows"] != part["rows"]:
                    problems.append(f"{name}: part {part['seq']} lists {part['rows']} rows but its steps file "
                                    f"{part['steps']['rows']}")
                seq, next_step = part["seq"] + 1, max(next_step, mf.next_step(part))
            closes = sum(e["type"] == "close" and e.get("segment") == segment["segment"] for e in entries)
            if closes > 1:
                problems.append(f"{name}: closed {closes} times (a writer closes its segment once)")
            if close is not None:
                problems += _close_problems(name, close, parts, files or {})
    return problems


def _close_problems(name: str, close: dict, parts: list[dict], files: dict) -> list[str]:
    """A close entry's counts against what its segment's parts hold (their files where read,
    ``files``; else their entries): ``steps``, the optimizer steps, against the step numbers the
    parts cover (a trailing row is none, a step of several rows one), ``rows`` against their rows.
    A close without ``rows`` was written when ``steps`` counted the rows: its ``steps`` is checked
    against the rows, as then (each split row and trailing row counted)."""
    held = [files.get(id(part)) for part in parts]
    rows = sum(f.rows if f is not None else p["rows"] for p, f in zip(parts, held))
    if "rows" not in close:
        return [] if close["steps"] == rows else [f"{name}: its close counts {close['steps']} steps (rows, as "
                                                  f"flopcount counted them before it recorded rows), its parts {rows}"]
    steps = mf.steps_covered([p if f is None else f.as_range(p) for p, f in zip(parts, held)])
    problems = []
    if close["steps"] != steps:
        problems.append(f"{name}: its close counts {close['steps']} steps, its parts {steps}")
    if close["rows"] != rows:
        problems.append(f"{name}: its close counts {close['rows']} rows, its parts {rows}")
    return problems


@dataclass(frozen=True)
class StepsFile:
    """What an intact steps part's file holds: its rows, its first and last step numbers, and
    whether its last row is trailing (None: the last row was not read)."""

    rows: int
    first: int
    last: int
    trailing: bool | None = None

    def as_range(self, part: dict) -> dict:
        """The step range this file holds, as a part entry's keys (``steps_covered``): a last row
        not read is no trailing row when the entry claims none (else it would have been read)."""
        trailing = self.trailing if self.trailing is not None else mf.next_step(part) == part["last_step"]
        return {"first_step": self.first, "last_step": self.last, "next_step": self.last + (0 if trailing else 1)}


class StepsFiles:
    """The ``steps_check`` of ``mf.part_problems``: every intact steps part's claims against its
    file. Its rows and step range (``first_step``, ``last_step``) from the Parquet footer's
    statistics, without reading data pages (``footer.footer_steps`` where it confirms the claims,
    else ``steps_file``); its ``next_step`` against its last
    row where that row can be trailing: each segment's last part (a trailing row is written at
    exit, in the segment's last flush) and any part whose ``next_step`` claims one. Every other
    part's ``next_step`` is ``last_step + 1`` (``entry_problem`` allows no other value), and
    reading every part's rows makes verify five times slower on traces of many small parts.
    ``found``: id(part entry) -> StepsFile, for the close entries' check."""

    def __init__(self, manifests: dict[str, list[dict]]) -> None:
        self.last_parts = {id(parts[-1]) for entries in manifests.values()
                           for _, parts, _ in mf.segments_of(entries) if parts}
        self.found: dict[int, StepsFile] = {}

    def __call__(self, part: dict, data: bytes, manifest: str) -> list[str]:
        last_row = id(part) in self.last_parts or mf.next_step(part) == part["last_step"]
        quick = None if last_row else footer_steps(data)  # 0.02 ms; a confirmation, else pyarrow's answer
        if quick is not None and quick == (part["steps"]["rows"], part["first_step"], part["last_step"]):
            held = StepsFile(*quick)
        else:
            held = steps_file(data, last_row)
        if held is None:  # not a readable steps part: left to the readers (bad input, exit 2)
            return []
        self.found[id(part)] = held
        return claim_problems(part, held, manifest)


def claim_problems(part: dict, held: StepsFile, manifest: str) -> list[str]:
    """A part entry's rows, ``first_step``, ``last_step`` and (where its last row was read)
    ``next_step`` against what its steps file holds: the step after the part is the last row's
    step when that row is trailing (it carries the number of the step after it), else the one
    after it. Resume and the step-order check (``segment_problems``) read ``next_step``, so an
    edited, re-hashed value is a finding here. Entries without ``next_step`` were written when a
    trailing row still took a step number of its own: the step after them is the one after their
    last row."""
    name = f"{manifest} segment {part['segment']} part {part['seq']}"
    file = part["steps"]["file"]
    problems = []
    if part["steps"]["rows"] != held.rows:
        problems.append(f"{name}: lists {part['steps']['rows']} rows, but its steps file {file} holds {held.rows}")
    if part["first_step"] != held.first:
        problems.append(f"{name}: lists first_step {part['first_step']}, but its steps file {file} "
                        f"starts with step {held.first}")
    if part["last_step"] != held.last:
        problems.append(f"{name}: lists last_step {part['last_step']}, but its steps file {file} "
                        f"ends with step {held.last}")
    if held.trailing is not None:
        expected = held.last if held.trailing and "next_step" in part else held.last + 1
        if mf.next_step(part) != expected:
            row = "a trailing row" if held.trailing else "a step"
            problems.append(f"{name}: records next_step {mf.next_step(part)}, but its steps file {file} "
                            f"ends with {row} numbered {held.last}, so the next step is {expected}")
    return problems


# Where flopcount writes these columns (a flat schema: one leaf per column).
STEP_COLUMN_INDEX, TRAILING_COLUMN_INDEX = STEPS_SCHEMA.get_field_index("step"), STEPS_SCHEMA.get_field_index("trailing")


def steps_file(data: bytes, last_row: bool = False) -> StepsFile | None:
    """What a steps part's bytes hold (``StepsFile``): rows and the step range from the footer's
    column statistics (min and max of ``step``: exact, int64 values are never truncated), read
    from the rows where a row group has none (another writer); with ``last_row``, whether the
    last row is trailing (absent or null in older traces: not). None when the bytes are not a
    readable steps part with rows.

    About 0.1 ms a part, the footer's decoding (footer.py reads the statistics in 0.02 ms where
    they agree with a part's claims): pyarrow's ``ParquetReader`` (what ``pq.ParquetFile`` wraps,
    without the 0.08 ms it spends on the schema's nested paths), and the column chunks' names
    (the footer's schema object would take 0.04 ms more)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow._parquet import ParquetReader

    try:
        part = ParquetReader()
        part.open(pa.BufferReader(data))
        meta = part.metadata
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        groups = [(g, group) for g, group in enumerate(groups) if group.num_rows]
        if not groups:
            return None
        step = _column_index(groups[0][1], "step", STEP_COLUMN_INDEX)
        if step is None or groups[0][1].column(step).physical_type != "INT64":
            return None
        lows, highs = [], []
        for g, group in groups:
            stats = group.column(step).statistics
            if stats is not None and stats.has_min_max:
                lows.append(stats.min)
                highs.append(stats.max)
            else:  # no statistics: read this row group's steps
                steps = part.read_row_group(g, column_indices=[step]).column(0)
                lows.append(pc.min(steps).as_py())
                highs.append(pc.max(steps).as_py())
        trailing = None
        if last_row:
            g, group = groups[-1]
            column = _column_index(group, "trailing", TRAILING_COLUMN_INDEX)
            flag = part.read_row_group(g, column_indices=[column]).column(0)[-1].as_py() if column is not None else None
            trailing = flag is True
        return StepsFile(meta.num_rows, min(lows), max(highs), trailing)
    except (OSError, ValueError, *pa_errors()):
        return None


def _column_index(group, name: str, where: int) -> int | None:
    """The index of the column ``name`` in a row group's metadata (flopcount writes it at
    ``where``; other writers anywhere), None when it has none."""
    if where < group.num_columns and group.column(where).path_in_schema == name:
        return where
    return next((i for i in range(group.num_columns) if group.column(i).path_in_schema == name), None)


def rank_integrity(manifests: dict[str, list[dict]], label: str = "") -> dict:
    """Which writers of a trace dir's world are missing or did not close a segment.

    ``manifests`` maps each writer's manifest file to its entries. A rank of the recorded world
    with no manifest is missing (it never wrote: killed early, or its files are lost). A segment
    with no "close" entry, at any position, was killed (or, the last one, is still running): its
    committed steps are intact and counted, the steps after its last flush are not. A close that
    lists ``unwritten`` steps (storage faults) undercounts too. Each is an integrity problem."""
    world_size = 0
    ranks: set[int] = set()
    unfinished: set[int] = set()
    where = f"{label}: " if label else ""
    unclosed: list[str] = []
    for rel, entries in sorted(manifests.items()):  # one file per writer
        segments = mf.segments_of(entries)
        if not segments:
            continue
        rank = int(segments[-1][0]["rank"])
        world_size = max([world_size] + [int(s.get("world_size", 1)) for s, _, _ in segments])
        ranks.add(rank)
        for number, (segment, parts, close) in enumerate(segments):
            who = f"rank {rank}" + (f" (process {segment['process']})" if segment.get("process") else "")
            flushed = (f"its last flush (step {parts[-1]['last_step']})" if parts
                       else f"step {segment['first_step']} (nothing was flushed)")
            ident = f"segment {segment['segment']} of {rel}" + (
                f", id {segment['segment_id'][:12]}" if segment.get("segment_id") else "")
            if close is None:
                unfinished.add(rank)
                if number == len(segments) - 1:
                    unclosed.append(f"{where}{who} of {{world}} did not close its trace (killed or still running): "
                                    f"steps after its last flush are not counted ({ident}; after {flushed})")
                else:
                    unclosed.append(f"{where}{who} of {{world}}: segment {segment['segment']} has no close (killed, "
                                    f"then resumed): the steps after {flushed} were lost ({ident})")
            for first, last in (close or {}).get("unwritten", []):
                unfinished.add(rank)
                unclosed.append(f"{where}{who} of {{world}}: steps {first}-{last} of segment {segment['segment']} "
                                f"could not be written (storage faults) and are not counted ({rel})")
    missing = sorted(set(range(world_size)) - ranks)
    problems = [f"{where}rank {r} of {world_size} is missing (no trace written)" for r in missing]
    problems += [p.replace("{world}", str(world_size)) for p in unclosed]
    return {"missing_ranks": missing, "unfinished_ranks": sorted(unfinished), "rank_problems": problems}
