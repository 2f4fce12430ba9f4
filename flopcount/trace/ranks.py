"""Completeness of a multi-rank trace dir, from its manifests alone (no torch: the analysis side)."""
from __future__ import annotations


def rank_integrity(manifests: dict[str, list[dict]], label: str = "") -> dict:
    """Which ranks of a trace dir's world are missing or did not close their trace.

    ``manifests`` maps each rank's manifest file to its entries: "segment" entries carry the rank
    and world size, a "close" entry ends the segment it names. A rank of the recorded world with
    no manifest is missing (it never wrote: killed early, or its files are lost); a rank whose
    last segment has no "close" entry was killed (or is still running): its committed steps are
    intact and counted, the steps after its last flush are not. Either way the total undercounts
    the job, so both are integrity problems, never silent."""
    world_size = 0
    ranks: set[int] = set()
    unfinished: set[int] = set()
    for entries in manifests.values():  # one file per rank
        segments = [e for e in entries if e.get("type") == "segment"]
        if not segments:
            continue
        rank = int(segments[-1]["rank"])
        world_size = max([world_size] + [int(e.get("world_size", 1)) for e in segments])
        ranks.add(rank)
        last = segments[-1].get("segment")
        if not any(e.get("type") == "close" and e.get("segment") == last for e in entries):
            unfinished.add(rank)
    missing = sorted(set(range(world_size)) - ranks)
    where = f"{label}: " if label else ""
    problems = [f"{where}rank {r} of {world_size} is missing (no trace written)" for r in missing]
    problems += [f"{where}rank {r} of {world_size} did not close its trace (killed or still running): "
                 f"steps after its last flush are not counted" for r in sorted(unfinished)]
    return {"missing_ranks": missing, "unfinished_ranks": sorted(unfinished), "rank_problems": problems}
