"""The integrity manifest: one JSON-lines log per writer, each entry SHA-256 chained to the previous.

A writer is one (rank, process) of a trace dir: ``manifest/r00000.jsonl`` for rank 0,
``manifest/r00000-p1.jsonl`` for a second metered process of rank 0 (``flopcount run``).

Entries (``type``):
  ``segment``  one per opening of the trace dir: manifest schema, run identity, a random
               ``segment_id``, the writer (rank, process, host, pid), versions, meter options, and
               ``takeover`` (the holder of a lease left by a dead writer, else null).
  ``part``     one per flush: the steps and breakdown part files with their SHA-256, sizes, row
               counts and step range.
  ``close``    at a clean exit: the segment's optimizer steps (``steps``; a trailing row is none, a
               step over int64 FLOPs of several rows is one), its ``rows``, its totals (and
               ``unwritten`` step ranges that storage faults kept from being written).

Every entry carries ``prev`` (the previous entry's ``hash``; 64 zeros for the first), ``t`` (its
time in Unix seconds, strictly increasing along the chain and later than every entry of the
trace dir when the writer opened it) and ``hash`` = SHA-256 of the entry's canonical JSON
without ``hash``/``hmac``/``sig``. ``hmac`` = HMAC-SHA256(FLOPCOUNT_HMAC_KEY, hash) and ``sig`` =
Ed25519(private key, hash) with ``key_id`` sign entries when a key is given. The whole manifest
file is rewritten atomically at each flush, so it is never torn.

The trace digest ``fc1-<H>-<T>`` commits to a time cut of every writer's chain: T is the newest
entry's time (integer microseconds) and H the SHA-256 over, per writer chain, its first entry's
hash, how many entries are at or before T, and the last of them. A later state of the same
trace dir (resumed, more writers) has the same cut at T; a truncated or rolled-back one has not.
"""
from __future__ import annotations

import hashlib
import hmac as hmac_lib
import json
import math
import os
import re
from dataclasses import dataclass, field

from .schema import MANIFEST_DIR, TRACE_SCHEMA, TRACE_SCHEMA_MAJOR, schema_major
from .storage import TraceError

GENESIS = "0" * 64
HMAC_ENV = "FLOPCOUNT_HMAC_KEY"
MANIFEST_SCHEMA = "flopcount.manifest/2"  # segment entries without the field are flopcount.manifest/1
KNOWN_MANIFEST_SCHEMAS = ("flopcount.manifest/1", MANIFEST_SCHEMA)
UNSIGNED_FIELDS = ("hash", "hmac", "sig")
TIME_FIELDS = {"segment": "started", "part": "written", "close": "ended"}  # entries older than ``t``
MAX_DEPTH = 16

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART_FILE = re.compile(r"^(steps|breakdown)/[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.parquet$")
_DIGEST = re.compile(r"^fc1-([0-9a-f]{64})-(\d{1,20})$")


def hmac_key(value: str | bytes | None = None) -> bytes | None:
    """The HMAC key: ``value`` when given, else FLOPCOUNT_HMAC_KEY, else None."""
    key = os.environ.get(HMAC_ENV) if value is None else value
    if not key:
        return None
    return key if isinstance(key, bytes) else key.encode()


def canonical(entry: dict) -> bytes:
    body = {k: v for k, v in entry.items() if k not in UNSIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def sign(digest: str, key: bytes) -> str:
    return hmac_lib.new(key, digest.encode(), hashlib.sha256).hexdigest()


def seal(entry: dict, prev: str, key: bytes | None, signer=None) -> dict:
    """``entry`` chained after ``prev``, with its hash (and HMAC / Ed25519 signature when given)."""
    sealed = dict(entry, prev=prev)
    if signer is not None:
        sealed["key_id"] = signer.key_id
    sealed["hash"] = entry_hash(sealed)
    if key:
        sealed["hmac"] = sign(sealed["hash"], key)
    if signer is not None:
        sealed["sig"] = signer.sign(sealed["hash"])
    return sealed


def dumps(entries: list[dict]) -> bytes:
    return b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)


# ---- reading and validating -------------------------------------------------------------------

def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def parse(data: bytes, where: str) -> list[dict]:
    """The entries of one manifest file; TraceError (one line naming the file and line) when an
    entry is not valid JSON or not a well-formed entry of a known schema."""
    entries = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line, parse_constant=_no_constant)
        except RecursionError:
            raise TraceError(f"flopcount: {where} line {number} is nested too deeply: the manifest is damaged; "
                             "restore it or leave this trace dir out") from None
        except ValueError:
            raise TraceError(f"flopcount: {where} line {number} is not valid JSON: the manifest is damaged; "
                             "restore it or leave this trace dir out") from None
        problem = entry_problem(entry)
        if problem is not None:
            raise TraceError(f"flopcount: {where} line {number}: {problem}; restore the manifest or leave this "
                             "trace dir out")
        entries.append(entry)
    return entries


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return _is_int(value) and value >= 0


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_hex64(value) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


def _is_dict(value) -> bool:
    return isinstance(value, dict)


def _is_str(value) -> bool:
    return isinstance(value, str)


def _optional(check):
    return lambda value: value is None or check(value)


COMMON_FIELDS = {"prev": _is_hex64, "hash": _is_hex64}
OPTIONAL_FIELDS = {"hmac": _is_hex64, "sig": _is_str, "key_id": _is_str, "t": _is_time}
ENTRY_FIELDS = {
    "segment": {"run_id": _is_str, "rank": _is_count, "segment": _is_count, "first_step": _is_count,
                "started": _is_time},
    "part": {"seq": _is_count, "segment": _is_count, "first_step": _is_count, "last_step": _is_count,
             "rows": _is_count, "written": _is_time, "steps": _is_dict,
             "breakdown": _is_dict},
    "close": {"segment": _is_count, "steps": _is_count, "ended": _is_time},
}
ENTRY_OPTIONAL = {
    "segment": {"world_size": lambda v: _is_int(v) and v >= 1, "process": _is_count, "segment_id": _is_str,
                "manifest": _is_str, "schema": _is_str},
    "part": {"next_step": _is_count},
    "close": {"rows": _is_count, "training_flops": _optional(_is_count), "hardware_flops": _optional(_is_count),
              "unwritten": lambda v: isinstance(v, list) and all(
                  isinstance(r, list) and len(r) == 2 and all(map(_is_count, r)) for r in v)},
}
PART_FIELDS = {"file": _is_str, "sha256": _is_hex64, "bytes": _is_count, "rows": _is_count}


def _depth_problem(value, depth: int = 0) -> str | None:
    """Nesting deeper than MAX_DEPTH, or a non-finite number anywhere in ``value``."""
    if depth > MAX_DEPTH:
        return f"values are nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, float) and not math.isfinite(value):
        return "a number is not finite"
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        problem = _depth_problem(child, depth + 1)
        if problem:
            return problem
    return None


def next_step(part: dict) -> int:
    """The number of the first step after a part entry: one more than its last step, or its
    last step itself when its last row is trailing (a trailing row carries the number of the step
    that follows it). Entries written before ``next_step`` was recorded: one more."""
    return part.get("next_step", part["last_step"] + 1)


def steps_covered(parts: list[dict]) -> int:
    """How many step numbers a segment's part entries (in order) cover, each once: a part holds
    the steps ``first_step`` to ``next_step - 1`` (none for a part of only a trailing row)."""
    covered, reached = 0, 0
    for part in parts:
        covered += max(0, next_step(part) - max(part["first_step"], reached))
        reached = max(reached, next_step(part))
    return covered


def entry_problem(entry) -> str | None:
    """What makes ``entry`` malformed (one phrase), or None for a well-formed entry."""
    if not isinstance(entry, dict):
        return "not a manifest entry (a JSON object)"
    kind = entry.get("type")
    if kind not in ENTRY_FIELDS:
        return f"type {str(kind)[:40]!r} is not segment, part or close"
    problem = _depth_problem(entry)
    if problem:
        return problem
    for name, check in {**COMMON_FIELDS, **ENTRY_FIELDS[kind]}.items():
        if name not in entry:
            return f"the {kind} entry has no {name!r}"
        if not check(entry[name]):
            return f"{name!r} of the {kind} entry has the wrong type or value ({str(entry[name])[:40]!r})"
    for name, check in {**OPTIONAL_FIELDS, **ENTRY_OPTIONAL[kind]}.items():
        if name in entry and not check(entry[name]):
            return f"{name!r} of the {kind} entry has the wrong type or value ({str(entry[name])[:40]!r})"
    if kind == "segment":
        version = entry.get("manifest", KNOWN_MANIFEST_SCHEMAS[0])
        if version not in KNOWN_MANIFEST_SCHEMAS:
            return (f"manifest schema {version[:40]!r} is not one this flopcount reads "
                    f"({', '.join(KNOWN_MANIFEST_SCHEMAS)}): use a flopcount version that matches the trace")
        if "schema" in entry and schema_major(entry["schema"]) != TRACE_SCHEMA_MAJOR:
            return (f"trace schema {entry['schema'][:40]!r} is not the one this flopcount reads ({TRACE_SCHEMA}): "
                    "use a flopcount version that matches the trace")
    if kind == "part":
        if entry["last_step"] < entry["first_step"]:
            return "the part's last_step is before its first_step"
        if next_step(entry) not in (entry["last_step"], entry["last_step"] + 1):
            return "the part's next_step is neither its last_step (a trailing last row) nor the step after it"
        for table in ("steps", "breakdown"):
            part = entry[table]
            for name, check in PART_FIELDS.items():
                if name not in part or not check(part[name]):
                    return f"{table}.{name} of the part entry is missing or has the wrong type"
            if not _PART_FILE.match(part["file"]) or ".." in part["file"] or not part["file"].startswith(table + "/"):
                return (f"part path {part['file'][:80]!r} is not a {table}/<name>.parquet file inside the trace dir "
                        "(relative, no '..')")
    return None


def load_manifests(storage) -> dict[str, list[dict]]:
    """{manifest file name: entries} of every writer in a trace dir (TraceError if one is unusable)."""
    out = {}
    for name in storage.listdir(MANIFEST_DIR):
        if name.endswith(".jsonl") and not name.startswith("."):
            rel = f"{MANIFEST_DIR}/{name}"
            out[rel] = parse(storage.read(rel), storage.describe(rel))
    return out


# ---- chains -----------------------------------------------------------------------------------

def chain_problems(entries: list[dict], where: str, key: bytes | None) -> list[str]:
    """Breaks of the chain and of the hashes; with an HMAC key, every HMAC checked."""
    problems = []
    prev = GENESIS
    for number, entry in enumerate(entries, 1):
        if entry.get("prev") != prev:
            problems.append(f"{where} entry {number}: chain broken (prev does not match the previous entry)")
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{where} entry {number}: hash does not match its content (entry altered)")
        if key is not None:
            if "hmac" not in entry:
                problems.append(f"{where} entry {number}: no HMAC, but an HMAC key was given")
            elif not hmac_lib.compare_digest(entry["hmac"], sign(entry.get("hash", ""), key)):
                problems.append(f"{where} entry {number}: HMAC signature does not match")
        prev = entry.get("hash")
    return problems


def signature_problems(entries: list[dict], where: str, verifier) -> list[str]:
    """Every entry's Ed25519 signature, checked with the public key the user supplied."""
    problems = []
    for number, entry in enumerate(entries, 1):
        if "sig" not in entry:
            problems.append(f"{where} entry {number}: not signed (no Ed25519 signature)")
        elif entry.get("key_id") != verifier.key_id:
            problems.append(f"{where} entry {number}: signed by key {str(entry.get('key_id'))[:32]}, "
                            f"not by the given key {verifier.key_id}")
        elif not verifier.valid(entry["hash"], entry["sig"]):
            problems.append(f"{where} entry {number}: Ed25519 signature does not match (entry altered or re-signed)")
    return problems


def segments_of(entries: list[dict]) -> list[tuple[dict, list[dict], dict | None]]:
    """(segment entry, its part entries, its close entry or None) for each segment of a chain."""
    found = []
    for entry in entries:
        if entry["type"] == "segment":
            found.append([entry, [], None])
        elif found and entry["type"] == "part":
            found[-1][1].append(entry)
        elif found and entry["type"] == "close" and entry.get("segment") == found[-1][0]["segment"]:
            found[-1][2] = entry
    return [tuple(s) for s in found]


# ---- the trace digest -------------------------------------------------------------------------

def entry_time_us(entry: dict) -> int:
    """An entry's time in integer microseconds: ``t``, or its type's own time field (older traces)."""
    t = entry.get("t", entry.get(TIME_FIELDS[entry["type"]]))
    return int(round(t * 1e6))


def chain_cut(entries: list[dict], cut_us: int) -> int:
    """How many leading entries of a chain are at or before ``cut_us``."""
    n = 0
    for entry in entries:
        if entry_time_us(entry) > cut_us:
            break
        n += 1
    return n


def trace_digest(chains, cut_us: int | None = None) -> str | None:
    """The digest ``fc1-<sha256>-<cut>`` of the writer chains ``chains`` cut at ``cut_us`` (default:
    the newest entry); None when there are no entries."""
    chains = [c for c in chains if c]
    if not chains:
        return None
    if cut_us is None:
        cut_us = max(max(entry_time_us(e) for e in c) for c in chains)
    lines = sorted(f"{c[0]['hash']}:{n}:{c[n - 1]['hash']}" for c in chains if (n := chain_cut(c, cut_us)))
    return f"fc1-{hashlib.sha256(chr(10).join(lines).encode()).hexdigest()}-{cut_us}"


def parse_digest(text: str) -> int:
    """The cut time of a digest string; TraceError when it is not one."""
    match = _DIGEST.match(str(text).strip())
    if match is None:
        raise TraceError(f"flopcount: {str(text)[:100]!r} is not a flopcount trace digest (fc1-<64 hex>-<time>): "
                         "pass the digest that `flopcount verify` or the run printed")
    return int(match.group(2))


def digest_extension(chains, expected: str) -> int | None:
    """How many entries the chains hold after the state ``expected``, or None when they no longer
    hold that state (an entry up to its time was removed, altered or rolled back)."""
    cut = parse_digest(expected)
    if trace_digest(chains, cut) != expected.strip():
        return None
    return sum(len(c) - chain_cut(c, cut) for c in chains if c)


def chain_head_digest(manifests: dict[str, list[dict]]) -> str | None:
    """The trace digest of one trace dir's manifests."""
    return trace_digest(list(manifests.values()))


# ---- parts ------------------------------------------------------------------------------------

@dataclass
class Verification:
    location: str
    parts_checked: int = 0
    problems: list[str] = field(default_factory=list)
    signed: bool = False
    digest: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def part_problems(storage, manifests: dict[str, list[dict]], steps_check=None) -> tuple[list[str], int]:
    """(problems, parts checked): every listed part exists as a regular file with its SHA-256, and
    every part file is listed. ``steps_check(entry, data, manifest)``: the problems of an intact
    steps part (its SHA-256 matched) against its part entry, read from the bytes already read."""
    problems, checked = [], 0
    listed: dict[str, str] = {}
    for rel, entries in manifests.items():
        for entry in entries:
            if entry["type"] != "part":
                continue
            for table in ("steps", "breakdown"):
                part = entry[table]
                if part["file"] in listed:
                    if listed[part["file"]] != part["sha256"]:
                        problems.append(f"{part['file']}: listed twice with different SHA-256 ({rel})")
                    continue
                listed[part["file"]] = part["sha256"]
                checked += 1
                if not storage.exists(part["file"]):
                    problems.append(f"{part['file']}: missing (listed in {rel})")
                    continue
                # storage.read refuses anything but a regular file (TraceError): a FIFO would block open()
                data = storage.read(part["file"])
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    problems.append(f"{part['file']}: SHA-256 does not match {rel} (file altered)")
                elif table == "steps" and steps_check is not None:
                    problems += steps_check(entry, data, rel)
    for table in ("steps", "breakdown"):
        for name in storage.listdir(table):
            rel = f"{table}/{name}"
            if name.endswith(".parquet") and rel not in listed:
                problems.append(f"{rel}: not listed in any manifest (unlisted part)")
    return problems, checked


def verify(storage) -> Verification:
    """Parts and chains of one trace dir (the first version's interface; trace/integrity.py has all checks)."""
    result = Verification(storage.describe())
    manifests = load_manifests(storage)
    key = hmac_key()
    for rel, entries in manifests.items():
        result.problems += chain_problems(entries, rel, key)
        result.signed = result.signed or any("hmac" in e for e in entries)
    problems, result.parts_checked = part_problems(storage, manifests)
    result.problems += problems
    result.digest = chain_head_digest(manifests)
    return result
