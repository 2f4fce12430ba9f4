"""The integrity check of opened traces as the report block and fields that the audit report
(build.py) and the Code of Practice form (cop.py) both carry. The threshold check they carry is
compliance/check.py's ``check_traces``."""
from __future__ import annotations


def integrity_block(integrity) -> dict:
    """The report's ``integrity``: a check_integrity result (the check `flopcount verify` makes) as a dict."""
    return {**integrity.as_dict(), "parts_checked": integrity.parts_checked, "notes": list(integrity.notes)}


def integrity_fields(integrity: dict) -> list[tuple[str, str]]:
    """The integrity check's result (trace/integrity.py): "verified" only when it is."""
    return [
        ("verified", "yes" if integrity["verified"] else "NO"),
        ("parts checked", str(integrity["parts_checked"])),
        ("signed by", integrity["signed_by"] or "no signature checked against a key"),
        ("trace digest", integrity["digest"] or "-"),
        *[("note", n) for n in integrity.get("notes", [])],
        *[("problem", p) for p in integrity["problems"]],
    ]
