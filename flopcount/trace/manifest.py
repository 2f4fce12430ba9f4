"""The integrity manifest: one JSON-lines log per rank, each entry SHA-256 chained to the previous.

Entries (``type``):
  ``segment``  one per opening of the trace dir: run identity, versions, hardware, meter options.
  ``part``     one per flush: the steps and breakdown part files with their SHA-256, sizes, row
               counts and step range.
  ``close``    at a clean exit: steps and totals of the segment.

Every entry carries ``prev`` (the previous entry's ``hash``; 64 zeros for the first) and ``hash``
= SHA-256 of the entry's canonical JSON without ``hash``/``hmac``. With ``FLOPCOUNT_HMAC_KEY`` set
at write time, ``hmac`` = HMAC-SHA256(key, hash) signs each entry. The whole manifest file is
rewritten atomically at each flush, so it is never torn.
"""
from __future__ import annotations

import hashlib
import hmac as hmac_lib
import json
import os
from dataclasses import dataclass, field

from .schema import MANIFEST_DIR
from .storage import TraceError

GENESIS = "0" * 64
HMAC_ENV = "FLOPCOUNT_HMAC_KEY"


def hmac_key() -> bytes | None:
    key = os.environ.get(HMAC_ENV)
    return key.encode() if key else None


def canonical(entry: dict) -> bytes:
    body = {k: v for k, v in entry.items() if k not in ("hash", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def sign(digest: str, key: bytes) -> str:
    return hmac_lib.new(key, digest.encode(), hashlib.sha256).hexdigest()


def seal(entry: dict, prev: str, key: bytes | None) -> dict:
    """``entry`` chained after ``prev``, with its hash (and HMAC when a key is given)."""
    sealed = dict(entry, prev=prev)
    sealed["hash"] = entry_hash(sealed)
    if key:
        sealed["hmac"] = sign(sealed["hash"], key)
    return sealed


def dumps(entries: list[dict]) -> bytes:
    return b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)


def parse(data: bytes, where: str) -> list[dict]:
    entries = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise TraceError(f"flopcount: {where} line {number} is not valid JSON: the manifest is damaged") from None
        if not isinstance(entry, dict) or "type" not in entry:
            raise TraceError(f"flopcount: {where} line {number} is not a manifest entry")
        entries.append(entry)
    return entries


def chain_problems(entries: list[dict], where: str, key: bytes | None) -> list[str]:
    problems = []
    prev = GENESIS
    for number, entry in enumerate(entries, 1):
        if entry.get("prev") != prev:
            problems.append(f"{where} entry {number}: chain broken (prev does not match the previous entry)")
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{where} entry {number}: hash does not match its content (entry altered)")
        if key is not None:
            if "hmac" not in entry:
                problems.append(f"{where} entry {number}: not signed, but {HMAC_ENV} is set")
            elif not hmac_lib.compare_digest(entry["hmac"], sign(entry.get("hash", ""), key)):
                problems.append(f"{where} entry {number}: HMAC signature does not match")
        prev = entry.get("hash")
    return problems


def load_manifests(storage) -> dict[str, list[dict]]:
    """{manifest file name: entries} of every rank in a trace dir (TraceError if one is unreadable)."""
    out = {}
    for name in storage.listdir(MANIFEST_DIR):
        if name.endswith(".jsonl"):
            rel = f"{MANIFEST_DIR}/{name}"
            out[rel] = parse(storage.read(rel), storage.describe(rel))
    return out


def chain_head_digest(manifests: dict[str, list[dict]]) -> str | None:
    """One digest for a trace dir: SHA-256 over the last entry hash of every rank's manifest."""
    heads = [f"{name}:{entries[-1]['hash']}" for name, entries in sorted(manifests.items()) if entries]
    return hashlib.sha256("\n".join(heads).encode()).hexdigest() if heads else None


def combine_digests(digests: list[str]) -> str:
    """One digest for several trace dirs (a project dir): SHA-256 over their digests, sorted."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


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


def verify(storage) -> Verification:
    """Check every part against the manifests: missing, altered and unlisted parts are problems."""
    result = Verification(storage.describe())
    key = hmac_key()
    manifests = {}
    listed = set()
    for name in storage.listdir(MANIFEST_DIR):
        if not name.endswith(".jsonl"):
            continue
        rel = f"{MANIFEST_DIR}/{name}"
        try:
            entries = parse(storage.read(rel), rel)
        except TraceError as e:
            result.problems.append(str(e).removeprefix("flopcount: "))
            continue
        manifests[rel] = entries
        result.problems += chain_problems(entries, rel, key)
        result.signed = result.signed or any("hmac" in e for e in entries)
        for entry in entries:
            for table in ("steps", "breakdown"):
                part = entry.get(table) if entry.get("type") == "part" else None
                if not part:
                    continue
                listed.add(part["file"])
                result.parts_checked += 1
                if not storage.exists(part["file"]):
                    result.problems.append(f"{part['file']}: missing (listed in {rel})")
                    continue
                digest = hashlib.sha256(storage.read(part["file"])).hexdigest()
                if digest != part["sha256"]:
                    result.problems.append(f"{part['file']}: SHA-256 does not match {rel} (file altered)")
    for table in ("steps", "breakdown"):
        for name in storage.listdir(table):
            rel = f"{table}/{name}"
            if name.endswith(".parquet") and rel not in listed:
                result.problems.append(f"{rel}: not listed in any manifest (unlisted part)")
    result.digest = chain_head_digest(manifests)
    return result
