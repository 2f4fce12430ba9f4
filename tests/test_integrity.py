"""Evidence integrity (issue 14): the manifest commits to the whole run; truncation, rollback,
duplicates, killed segments, stale signatures and malformed manifests are caught.

Every case runs on real traces written by a real meter (tracegen.train: Linear(8, 6, bias=False)
on [4, 8] inputs, 2·m·k·n FLOP per product), calls ``check_integrity`` directly, and calls the real
CLI in a subprocess (``python -m flopcount.cli verify ...``).

AFTER MERGE: the lines guarded by ``if CLI_INTEGRITY:`` need h14c's `verify` (which calls
check_integrity and has --digest/--public-key/--ledger). Until it is merged, the CLI's verify is the
first version and only the unguarded CLI assertions hold; once merged, the guard is True and
every assertion runs (the lead may then remove the guard).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

import flopcount
from flopcount.trace import keys
from flopcount.trace import manifest as mf
from flopcount.trace.integrity import check_integrity
from flopcount.trace.reader import open_traces
from flopcount.trace.storage import TraceError
from tracegen import MATMUL_PER_STEP, train


def cli(*args, env=None, timeout=120):
    environ = {**os.environ, **(env or {})}
    environ.pop("FLOPCOUNT_RUN", None)
    return subprocess.run([sys.executable, "-m", "flopcount.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=environ)


CLI_INTEGRITY = "--digest" in cli("verify", "--help").stdout  # h14c's verify is merged


def integrity(location, **options):
    return check_integrity(open_traces(location), **options)


def manifest_file(run, name="r00000.jsonl"):
    return run / "manifest" / name


def read_entries(path):
    return mf.parse(path.read_bytes(), str(path))


def write_entries(path, entries):
    path.write_bytes(mf.dumps(entries))


def rechain(entries):
    """Recompute prev and hash of every entry, leaving any HMAC / Ed25519 signature as it was
    (stale): what someone without the keys can do."""
    prev = mf.GENESIS
    out = []
    for entry in entries:
        entry = dict(entry, prev=prev)
        entry["hash"] = mf.entry_hash(entry)
        prev = entry["hash"]
        out.append(entry)
    return out


def matmul(location):
    return flopcount.summarize(str(location))["by_category"]["matmul"]


# ---- signing setups -------------------------------------------------------------------------------

@pytest.fixture
def keypair(tmp_path):
    result = cli("keys", "new", tmp_path / "keys")
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "keys" / keys.PRIVATE_NAME, tmp_path / "keys" / keys.PUBLIC_NAME
    return private, public


SIGNING = ("unsigned", "hmac", "ed25519")


def signing_options(kind, keypair, monkeypatch):
    """(train options, check_integrity options, CLI args, CLI env) for one signing kind."""
    if kind == "hmac":
        monkeypatch.setenv(mf.HMAC_ENV, "operator-secret")
        return {}, {}, [], {mf.HMAC_ENV: "operator-secret"}
    if kind == "ed25519":
        private, public = keypair
        return {"signing_key": str(private)}, {"public_key": str(public)}, ["--public-key", public], {}
    return {}, {}, [], {}


# ---- truncation, rollback, resume ------------------------------------------------------------------

@pytest.mark.parametrize("kind", SIGNING)
def test_truncation_and_rollback_are_caught_with_the_digest(tmp_path, kind, keypair, monkeypatch):
    options, check, args, env = signing_options(kind, keypair, monkeypatch)
    run = tmp_path / "run"
    first = train(run, steps=3, flush_every=2, **options)
    digest_0 = first.writer.digest
    assert digest_0 == open_traces(run).digest and digest_0.startswith("fc1-")
    shutil.copytree(run, tmp_path / "older-copy")
    train(run, steps=2, flush_every=2, **options)
    digest_1 = open_traces(run).digest
    assert digest_1 != digest_0
    assert matmul(run) == 5 * MATMUL_PER_STEP
    now = integrity(run, digest=digest_1, **check)
    assert now.verified and now.problems == [] and now.digest == digest_1
    if kind == "ed25519":
        assert now.signed_by == keys.load_verifier(keypair[1]).key_id
    # The resumed run still holds the state of the first segment's digest: the chains extend it.
    resumed = integrity(run, digest=digest_0, **check)
    assert resumed.verified and any("extended by 3 entries" in n for n in resumed.notes)  # segment, part, close

    # Truncation: the last segment's entries and parts deleted. A valid prefix: only --digest sees it.
    entries = read_entries(manifest_file(run))
    cut = [i for i, e in enumerate(entries) if e["type"] == "segment"][1]
    for entry in entries[cut:]:
        for table in ("steps", "breakdown"):
            if entry["type"] == "part":
                (run / entry[table]["file"]).unlink()
    write_entries(manifest_file(run), entries[:cut])
    assert integrity(run, **check).verified  # nothing says what is missing without an anchor
    truncated = integrity(run, digest=digest_1, **check)
    assert not truncated.verified and "no longer hold the state of digest" in truncated.problems[0]
    assert integrity(run, digest=digest_0, **check).verified
    # Rollback: an older copy of the whole directory restored.
    shutil.rmtree(run)
    shutil.copytree(tmp_path / "older-copy", run)
    rolled_back = integrity(run, digest=digest_1, **check)
    assert not rolled_back.verified and len(rolled_back.problems) == 1
    result = cli("verify", run, *(args if CLI_INTEGRITY else []), env=env)
    assert result.returncode == 0, result.stdout + result.stderr  # without the anchor it is a valid trace
    if CLI_INTEGRITY:
        result = cli("verify", run, "--digest", digest_1, *args, env=env)
        assert result.returncode == 1 and "no longer hold the state" in result.stdout + result.stderr
        assert cli("verify", run, "--digest", digest_0, *args, env=env).returncode == 0


def test_a_malformed_digest_is_bad_input(tmp_path):
    train(tmp_path / "run", steps=1)
    with pytest.raises(TraceError, match="is not a flopcount trace digest"):
        integrity(tmp_path / "run", digest="deadbeef")


def test_the_ledger_records_each_closing_digest_and_catches_a_rollback(tmp_path):
    run, ledger = tmp_path / "run", tmp_path / "audit" / "ledger.jsonl"
    ledger.parent.mkdir()
    train(run, steps=2, ledger=str(ledger))
    shutil.copytree(run, tmp_path / "older-copy")
    last = train(run, steps=2, ledger=str(ledger))
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["digest"] for r in records][-1] == last.writer.digest == open_traces(run).digest
    assert len(records) == 2 and {r["dir"] for r in records} == {str(run)} and records[0]["run_id"] == "run"
    checked = integrity(run, ledger=str(ledger))
    assert checked.verified and any("ledger" in n for n in checked.notes)
    shutil.rmtree(run)
    shutil.copytree(tmp_path / "older-copy", run)
    rolled_back = integrity(run, ledger=str(ledger))
    assert not rolled_back.verified and "the ledger's last record" in rolled_back.problems[0]
    if CLI_INTEGRITY:
        assert cli("verify", run, "--ledger", ledger).returncode == 1
    with pytest.raises(ValueError, match="ledger=.* is not a writable directory"):
        flopcount.meter(out=tmp_path / "x", ledger=str(tmp_path / "no" / "such" / "dir" / "l.jsonl"),
                        backend="dispatch").__enter__()


# ---- duplicates -------------------------------------------------------------------------------------

def test_a_copied_manifest_file_is_reported_with_both_paths_and_summed_once(tmp_path):
    run = tmp_path / "run"
    train(run, steps=3, flush_every=2)
    shutil.copy(manifest_file(run), manifest_file(run, "r00000 (copy).jsonl"))
    assert matmul(run) == 3 * MATMUL_PER_STEP  # not 6
    found = integrity(run)
    assert not found.verified and len(found.problems) == 1
    assert "manifest/r00000 (copy).jsonl" in found.problems[0] and "manifest/r00000.jsonl" in found.problems[0]
    # A copy edited and re-hashed is still the same segment (its random id): counted once.
    edited = read_entries(manifest_file(run))
    edited[-1]["ended"] += 1
    write_entries(manifest_file(run, "r00000 (copy).jsonl"), rechain(edited))
    assert matmul(run) == 3 * MATMUL_PER_STEP and len(integrity(run).problems) == 1
    summary = cli("summarize", run, "--json")
    assert json.loads(summary.stdout)["by_category"]["matmul"] == 3 * MATMUL_PER_STEP
    if CLI_INTEGRITY:
        result = cli("verify", run)
        assert result.returncode == 1 and "r00000 (copy).jsonl" in result.stdout + result.stderr


def test_a_backup_copy_inside_a_project_dir_is_reported_and_summed_once(tmp_path):
    project = tmp_path / "proj"
    train(project / "ft-1", steps=2)
    train(project / "ft-2", steps=1)
    shutil.copytree(project / "ft-1", project / "ft-1-backup")
    assert matmul(project) == 3 * MATMUL_PER_STEP  # ft-1 once, ft-2 once
    found = integrity(project)
    assert not found.verified and len(found.problems) == 1
    assert f"{project}/ft-1/manifest/r00000.jsonl" in found.problems[0]
    assert f"{project}/ft-1-backup/manifest/r00000.jsonl" in found.problems[0]
    assert "run 'ft-1' rank 0 segment 0" in found.problems[0]
    if CLI_INTEGRITY:
        result = cli("verify", project)
        assert result.returncode == 1 and "ft-1-backup" in result.stdout + result.stderr


# ---- empty, killed, unwritten -------------------------------------------------------------------------

def test_an_emptied_trace_dir_is_bad_input(tmp_path):
    run = tmp_path / "run"
    train(run, steps=2)
    for directory in ("steps", "breakdown", "manifest"):
        for name in os.listdir(run / directory):
            (run / directory / name).unlink()
    with pytest.raises(TraceError, match="holds no manifest entries"):
        open_traces(run)
    for command in (["verify", run], ["summarize", run], ["check", run]):
        result = cli(*command)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "holds no manifest entries" in result.stderr and "Traceback" not in result.stderr


KILLED_WRITER = textwrap.dedent("""
    import sys, torch, flopcount
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=sys.argv[1], backend="dispatch", flush_every=2) as m:
        for step in range(1000):
            layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
            m.step()
            print(step, flush=True)
""")


def test_a_killed_earlier_segment_is_reported_after_a_clean_resume(tmp_path):
    script, run = tmp_path / "writer.py", tmp_path / "run"
    script.write_text(KILLED_WRITER)
    child = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= 4:  # steps 0-3 flushed in two parts, step 4 in the buffer
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    entries = read_entries(manifest_file(run))
    last_flushed = max(e["last_step"] for e in entries if e["type"] == "part")
    assert last_flushed >= 3 and last_flushed % 2 == 1
    train(run, steps=2, flush_every=2)  # a clean resume: its own segment closes
    found = integrity(run)
    assert not found.verified and len(found.problems) == 1, found.problems
    assert (f"rank 0 of 1: segment 0 has no close (killed, then resumed): the steps after its last flush "
            f"(step {last_flushed}) were lost" in found.problems[0])
    assert matmul(run) == (last_flushed + 1 + 2) * MATMUL_PER_STEP  # the committed steps still count
    result = cli("verify", run)
    assert result.returncode == 1 and "segment 0 has no close" in result.stdout + result.stderr


def test_unwritten_steps_recorded_at_close_are_reported(tmp_path):
    run = tmp_path / "run"
    train(run, steps=2)
    entries = read_entries(manifest_file(run))
    entries[-1]["unwritten"] = [[5, 7]]  # what the writer records when storage faults kept steps out
    write_entries(manifest_file(run), rechain(entries))
    found = integrity(run)
    assert not found.verified and "steps 5-7 of segment 0 could not be written" in found.problems[0]


def test_re_hashed_step_ranges_that_disagree_with_the_parts_are_reported(tmp_path):
    run = tmp_path / "run"
    train(run, steps=4, flush_every=2)
    entries = read_entries(manifest_file(run))
    entries[2]["first_step"] = 1  # the second part now claims step 1 again
    entries[-1]["steps"] = 5  # the close claims a fifth step
    write_entries(manifest_file(run), rechain(entries))
    assert integrity(run).problems == [
        # verify checks every part's claimed range against its steps file's footer (0.02 ms a part)
        "manifest/r00000.jsonl segment 0 part 1: lists first_step 1, but its steps file "
        "steps/r00000-000001.parquet starts with step 2",
        "manifest/r00000.jsonl segment 0: part 1 repeats steps up to 1 (steps 1-3)",
        "manifest/r00000.jsonl segment 0: its close counts 5 steps, its parts 4"]


def test_a_segment_closed_twice_is_reported(tmp_path):
    """An honest writer closes its segment once (TraceWriter.close gives its lease back); a second
    close entry (a writer that wrote on without its lease) is a finding, even re-hashed."""
    run = tmp_path / "run"
    train(run, steps=2, flush_every=2)
    entries = read_entries(manifest_file(run))
    write_entries(manifest_file(run), rechain(entries + [dict(entries[-1])]))
    assert integrity(run).problems == ["manifest/r00000.jsonl segment 0: closed 2 times (a writer closes its "
                                       "segment once)"]
    assert cli("verify", run).returncode == 1


def test_strict_dark_module_at_exit_is_raised_once_the_trace_is_closed(tmp_path):
    """The dark module of the trailing work is found as the meter exits: the error reaches the
    program after the writer closed, with every row written and one close entry; closing the
    writer again (a caller's clean-up) writes nothing."""
    import torch

    class NumpyHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return torch.from_numpy(x.detach().numpy() @ self.weight.detach().numpy().T)

    run = tmp_path / "run"
    layer = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(flopcount.UncountedOpError, match=r"booked no FLOPs: 1 \("):
        with flopcount.meter(out=run, backend="dispatch", strict=True, warn=False) as m:
            for _ in range(2):
                layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
            with torch.no_grad():
                torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), NumpyHead())(torch.randn(4, 8))
    assert m.writer.closed
    m.writer.close(m.summary())
    entries = read_entries(manifest_file(run))
    # The close counts the 2 optimizer steps, and the 3 rows with the trailing one (steps counted rows before).
    assert [e["type"] for e in entries] == ["segment", "part", "close"] and entries[-1]["steps"] == 2
    assert entries[-1]["rows"] == 3
    summary = flopcount.summarize(run)
    assert summary["steps"] == 2 and summary["dark_modules"] == {"1": f"{__name__}.NumpyHead"}
    assert summary["by_phase_category"]["forward"]["matmul"] == 2 * 2 * 4 * 8 * 6
    assert summary["by_phase_category"]["eval"]["matmul"] == 2 * 4 * 8 * 6
    assert cli("verify", run).returncode == 0


# ---- signatures without and with keys ------------------------------------------------------------------

def test_stale_hmac_without_the_key_is_never_called_signed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(mf.HMAC_ENV, "operator-secret")
    train(run, steps=2)
    monkeypatch.delenv(mf.HMAC_ENV)
    entries = read_entries(manifest_file(run))
    entries[-1]["training_flops"] = 1  # edited, hashes recomputed, HMACs now stale
    write_entries(manifest_file(run), rechain(entries))
    without = integrity(run)
    assert without.notes == ["HMAC present, not checked: set FLOPCOUNT_HMAC_KEY to check it"]
    assert without.signed_by is None and not without.hmac_checked
    with_key = integrity(run, hmac_key="operator-secret")
    assert not with_key.verified and any("HMAC signature does not match" in p for p in with_key.problems)
    keyed = cli("verify", run, env={mf.HMAC_ENV: "operator-secret"})
    assert keyed.returncode == 1 and "HMAC signature does not match" in keyed.stdout
    if CLI_INTEGRITY:
        plain = cli("verify", run)
        assert "HMAC-signed, ok" not in plain.stdout and "signed, ok" not in plain.stdout
        assert "not checked" in plain.stdout + plain.stderr


def test_stale_ed25519_signatures_fail_with_the_key_and_are_not_checked_without(tmp_path, keypair):
    private, public = keypair
    run = tmp_path / "run"
    train(run, steps=2, signing_key=str(private))
    key_id = keys.load_verifier(public).key_id
    entries = read_entries(manifest_file(run))
    assert all(e["key_id"] == key_id and e["sig"] for e in entries)
    good = integrity(run, public_key=str(public))
    assert good.verified and good.signed_by == key_id
    entries[-1]["training_flops"] = 1
    write_entries(manifest_file(run), rechain(entries))
    without = integrity(run)
    assert without.signed_by is None
    assert without.notes == [f"Ed25519 signatures present (key {key_id}), not checked: pass --public-key to check them"]
    with_key = integrity(run, public_key=str(public))
    assert not with_key.verified and with_key.signed_by is None
    assert with_key.problems == [f"manifest/r00000.jsonl entry {len(entries)}: Ed25519 signature does not match "
                                 "(entry altered or re-signed)"]
    # Another key pair's public key: every entry is "signed by another key".
    other = cli("keys", "new", tmp_path / "other")
    assert other.returncode == 0
    wrong = integrity(run, public_key=str(tmp_path / "other" / keys.PUBLIC_NAME))
    assert not wrong.verified and len(wrong.problems) == len(entries)
    unsigned = tmp_path / "unsigned"
    train(unsigned, steps=1)
    missing = integrity(unsigned, public_key=str(public))
    assert not missing.verified and all("not signed" in p for p in missing.problems)
    if CLI_INTEGRITY:
        plain = cli("verify", run)
        assert "signed, ok" not in plain.stdout and "not checked" in plain.stdout + plain.stderr
        assert cli("verify", run, "--public-key", public).returncode == 1


def test_keys_new_writes_a_private_key_only_its_owner_reads(tmp_path):
    result = cli("keys", "new", tmp_path / "k")
    assert result.returncode == 0, result.stderr
    private = tmp_path / "k" / keys.PRIVATE_NAME
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k" / keys.PUBLIC_NAME).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert keys.load_verifier(tmp_path / "k" / keys.PUBLIC_NAME).key_id in result.stdout
    again = cli("keys", "new", tmp_path / "k")
    assert again.returncode == 2 and "never overwritten" in again.stderr and "Traceback" not in again.stderr
    # FLOPCOUNT_SIGNING_KEY signs a run without any code change.
    run = tmp_path / "run"
    script = tmp_path / "t.py"
    script.write_text("import sys; sys.path.insert(0, sys.argv[2]); from tracegen import train; train(sys.argv[1], 2)")
    env = {**os.environ, keys.SIGNING_KEY_ENV: str(private)}
    subprocess.run([sys.executable, str(script), str(run), os.path.dirname(__file__)], check=True, env=env,
                   timeout=120)
    assert integrity(run, public_key=str(tmp_path / "k" / keys.PUBLIC_NAME)).signed_by is not None
    with pytest.raises(ValueError, match="is not an unencrypted PEM private key"):
        flopcount.meter(out=tmp_path / "x", signing_key=str(tmp_path / "k" / keys.PUBLIC_NAME),
                        backend="dispatch").__enter__()


# ---- malformed manifests ---------------------------------------------------------------------------

def _edit_part(entries, **fields):
    part = next(e for e in entries if e["type"] == "part")
    part["steps"] = dict(part["steps"], **fields)


MALFORMED = {
    "dotdot_part_path": (lambda e: _edit_part(e, file="steps/../../../etc/passwd.parquet"), "part path"),
    "absolute_part_path": (lambda e: _edit_part(e, file="/etc/passwd"), "part path"),
    "non_string_hash": (lambda e: e[1].update(hash=12345), "'hash' of the part entry"),
    "missing_key": (lambda e: e[0].pop("run_id"), "has no 'run_id'"),
    "wrong_type": (lambda e: e[1].update(rows="three"), "'rows' of the part entry"),
    "unknown_manifest_schema": (lambda e: e[0].update(manifest="flopcount.manifest/9"), "manifest schema"),
    "unknown_trace_schema": (lambda e: e[0].update(schema="flopcount.trace/7"), "trace schema"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifests_are_bad_input_in_one_line(tmp_path, case):
    run = tmp_path / "run"
    train(run, steps=2, flush_every=1)
    entries = read_entries(manifest_file(run))
    edit, phrase = MALFORMED[case]
    edit(entries)
    write_entries(manifest_file(run), entries)
    with pytest.raises(TraceError, match="r00000.jsonl line") as error:
        open_traces(run)
    assert phrase in str(error.value) and "\n" not in str(error.value)
    result = cli("verify", run)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "r00000.jsonl line" in result.stderr and phrase in result.stderr


@pytest.mark.parametrize("line", ["[" * 10000 + "]" * 10000, '{"type": "part", "rows": NaN}',
                                  '{"type": "close", "ended": 1e400}', '{"type": "segment", "a": ' + "[" * 40
                                  + "]" * 40 + "}"])
def test_deep_nesting_and_non_finite_numbers_are_bad_input(tmp_path, line):
    run = tmp_path / "run"
    train(run, steps=1)
    with open(manifest_file(run), "a") as f:
        f.write(line + "\n")
    with pytest.raises(TraceError, match=r"r00000.jsonl line 4"):
        open_traces(run)
    result = cli("verify", run)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_fifo_in_place_of_a_part_does_not_hang_verify(tmp_path):
    run = tmp_path / "run"
    train(run, steps=2, flush_every=1)
    part = run / "steps" / "r00000-000000.parquet"
    part.unlink()
    os.mkfifo(part)
    with pytest.raises(TraceError, match="is not a regular file"):
        integrity(run)
    for command in ("verify", "summarize"):
        result = cli(command, run, timeout=60)  # a FIFO would block open() forever
        assert result.returncode == 2 and "is not a regular file (a FIFO)" in result.stderr
        assert result.stderr.count("\n") == 1


def test_an_old_trace_without_the_new_fields_still_verifies(tmp_path):
    """flopcount 0.1 manifests have no manifest schema, segment id, process or entry time."""
    run = tmp_path / "run"
    train(run, steps=3, flush_every=2)
    new_fields = ("manifest", "segment_id", "process", "t", "host", "pid", "takeover")
    old = [{k: v for k, v in e.items() if k not in new_fields} for e in read_entries(manifest_file(run))]
    write_entries(manifest_file(run), rechain(old))
    found = integrity(run)
    assert found.verified and found.parts_checked == 4 and found.digest.startswith("fc1-")
    assert integrity(run, digest=found.digest).verified
    assert cli("verify", run).returncode == 0


NO_TORCH = textwrap.dedent("""
    import sys, types
    sys.modules["torch"] = None  # any `import torch` now fails
    package = types.ModuleType("flopcount")  # the trace package alone, without flopcount/__init__.py
    package.__path__, package.__version__ = [sys.argv[1]], "test"
    sys.modules["flopcount"] = package
    from flopcount.trace.integrity import check_integrity
    from flopcount.trace.reader import open_traces
    result = check_integrity(open_traces(sys.argv[2]), public_key=sys.argv[3], digest=sys.argv[4])
    print(result.verified, result.signed_by)
""")


def test_the_integrity_check_runs_without_torch(tmp_path, keypair):
    private, public = keypair
    train(tmp_path / "run", steps=2, signing_key=str(private))
    digest = open_traces(tmp_path / "run").digest
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flopcount")
    result = subprocess.run([sys.executable, "-c", NO_TORCH, package, tmp_path / "run", public, digest],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", keys.load_verifier(public).key_id]


def test_a_run_in_progress_is_not_verified_and_says_so(tmp_path):
    run = tmp_path / "run"
    with flopcount.meter(out=run, backend="dispatch", flush_every=1) as m:
        m.step()
        found = integrity(run)
    assert not found.verified and "did not close its trace (killed or still running)" in found.problems[0]
    assert any("lease/r00000.lease is held by a live writer" in n for n in found.notes)
    assert integrity(run).verified and integrity(run).notes == []


# ---- flopcount run: a Python child that also trains ---------------------------------------------------

CHILD_TRAINS = textwrap.dedent("""
    import os, subprocess, sys, torch
    def train(steps):
        layer = torch.nn.Linear(8, 6, bias=False)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(steps):
            layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
    if sys.argv[1:] == ["child"]:
        train(2)
    else:
        train(3)
        subprocess.run([sys.executable, __file__, "child"], check=True)  # inherits FLOPCOUNT_RUN
        train(1)
""")


def test_a_python_child_under_flopcount_run_writes_as_its_own_process(tmp_path):
    script, run = tmp_path / "train.py", tmp_path / "run"
    script.write_text(CHILD_TRAINS)
    environ = {k: v for k, v in os.environ.items() if k != "FLOPCOUNT_RUN"}
    result = subprocess.run([sys.executable, "-m", "flopcount.cli", "run", "--backend", "dispatch", "--out", str(run),
                             "--", sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(run / "manifest")) == ["r00000-p1.jsonl", "r00000.jsonl"]
    child = read_entries(manifest_file(run, "r00000-p1.jsonl"))
    assert child[0]["process"] == 1 and child[0]["rank"] == 0 and child[-1]["type"] == "close"
    # Both processes counted, neither erased: 3 + 1 parent steps, 2 child steps, 2·(2·m·k·n) each.
    assert matmul(run) == 6 * MATMUL_PER_STEP
    found = integrity(run)
    assert found.verified, found.problems
    assert f"verified; digest {found.digest}" in result.stdout  # the digest to keep, printed at the end
    # A second `flopcount run` is refused while a writer holds the dir... and allowed after.
    again = subprocess.run([sys.executable, "-m", "flopcount.cli", "run", "--out", str(run), "--", "true"],
                           capture_output=True, text=True, timeout=120, env=environ)
    assert again.returncode == 0


def test_flopcount_run_refuses_an_out_that_a_live_meter_writes(tmp_path):
    run = tmp_path / "run"
    environ = {k: v for k, v in os.environ.items() if k != "FLOPCOUNT_RUN"}
    with flopcount.meter(out=run, backend="dispatch"):
        result = subprocess.run([sys.executable, "-m", "flopcount.cli", "run", "--out", str(run), "--", "true"],
                                capture_output=True, text=True, timeout=120, env=environ)
    assert result.returncode == 2 and "is being written by another meter" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr and result.stderr.count("\n") == 1


# ---- next_step against the rows it covers ----------------------------------------------------------

def train_with_final_eval(out, steps: int, flush_every: int = 2):
    """``steps`` real training steps closed by ``m.step()``, then a final evaluation: trailing work,
    written at exit in one row that carries the number of the step after the last one."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=out, backend="dispatch", flush_every=flush_every) as m:
        for _ in range(steps):
            layer(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            m.step()
        with torch.no_grad(), m.evaluating():
            layer(torch.randn(4, 8))


def parts_of(entries):
    return [e for e in entries if e["type"] == "part"]


def test_a_re_hashed_next_step_that_disagrees_with_the_rows_is_reported(tmp_path):
    """A part's next_step (what resume and the step-order check read) must be what its steps file's
    last row says: its own number after a trailing row, else the one after it. Flipping it, with
    the chain re-hashed so that only this check can see it, fails verify in one line."""
    run = tmp_path / "run"
    train(run, steps=4, flush_every=2)  # parts: steps 0-1 and 2-3, no trailing row
    path = manifest_file(run)
    honest = read_entries(path)
    assert [p["next_step"] for p in parts_of(honest)] == [2, 4]
    assert integrity(run).verified and cli("verify", run).returncode == 0
    entries = read_entries(path)
    parts_of(entries)[1]["next_step"] = 3  # claims a trailing last row: a resume could reuse step 3
    write_entries(path, rechain(entries))
    assert integrity(run).problems == [
        "manifest/r00000.jsonl segment 0 part 1: records next_step 3, but its steps file "
        "steps/r00000-000001.parquet ends with a step numbered 3, so the next step is 4"]
    result = cli("verify", run)
    assert result.returncode == 1 and "records next_step 3, but its steps file" in result.stdout + result.stderr
    entries = read_entries(path)
    parts_of(entries)[1]["next_step"] = 4  # restored
    parts_of(entries)[0]["next_step"] = 1  # a part inside the segment claiming a trailing row
    write_entries(path, rechain(entries))
    assert integrity(run).problems == [
        "manifest/r00000.jsonl segment 0 part 0: records next_step 1, but its steps file "
        "steps/r00000-000000.parquet ends with a step numbered 1, so the next step is 2"]
    entries = read_entries(path)
    parts_of(entries)[0]["next_step"] = 2
    parts_of(entries)[1].update(last_step=4, next_step=5)  # a range past the rows, consistent in itself
    write_entries(path, rechain(entries))
    assert integrity(run).problems == [
        "manifest/r00000.jsonl segment 0 part 1: lists last_step 4, but its steps file "
        "steps/r00000-000001.parquet ends with step 3",
        "manifest/r00000.jsonl segment 0 part 1: records next_step 5, but its steps file "
        "steps/r00000-000001.parquet ends with a step numbered 3, so the next step is 4"]


def test_next_step_after_a_trailing_row_is_checked_before_and_after_a_resume(tmp_path):
    run = tmp_path / "run"
    train_with_final_eval(run, steps=3)  # steps 0-2, trailing row 3 (parts 0-1, then 2 and the trailing row)
    train_with_final_eval(run, steps=2)  # resumed: steps 3-4, trailing row 5
    path = manifest_file(run)
    entries = read_entries(path)
    parts = parts_of(entries)
    assert [(p["segment"], p["first_step"], p["last_step"], p["next_step"]) for p in parts] == [
        (0, 0, 1, 2), (0, 2, 3, 3), (1, 3, 4, 5), (1, 5, 5, 5)]
    assert integrity(run).verified and cli("verify", run).returncode == 0
    assert flopcount.summarize(str(run))["steps"] == 5
    parts[1]["next_step"] = 4  # segment 0 now claims its trailing row 3 was a step
    write_entries(path, rechain(entries))
    problems = integrity(run).problems
    assert problems[0] == ("manifest/r00000.jsonl segment 0 part 1: records next_step 4, but its steps file "
                           "steps/r00000-000001.parquet ends with a trailing row numbered 3, so the next step is 3")
    # ... and the resumed segment, which honestly starts at step 3, is now out of order with it.
    assert problems[1:] == ["manifest/r00000.jsonl segment 1: part 2 repeats steps up to 3 (steps 3-4)"]
    result = cli("verify", run)
    assert result.returncode == 1 and "ends with a trailing row numbered 3" in result.stdout + result.stderr
    entries = read_entries(path)
    parts_of(entries)[1]["next_step"] = 3  # restored
    parts_of(entries)[3]["next_step"] = 6  # the last part: nothing follows it, only its rows can tell
    write_entries(path, rechain(entries))
    assert integrity(run).problems == [
        "manifest/r00000.jsonl segment 1 part 3: records next_step 6, but its steps file "
        "steps/r00000-000003.parquet ends with a trailing row numbered 5, so the next step is 5"]


# ---- every part's claimed rows and step range against its steps file ---------------------------------

def test_a_re_hashed_mid_segment_step_range_is_reported(tmp_path):
    """Every part's rows, first_step and last_step are checked against its steps file (its
    footer's statistics), not only each segment's last part: one line naming the part and file."""
    run = tmp_path / "run"
    train(run, steps=6, flush_every=2)  # parts: steps 0-1, 2-3, 4-5
    path = manifest_file(run)
    honest = path.read_bytes()
    assert [(p["first_step"], p["last_step"], p["next_step"]) for p in parts_of(read_entries(path))] == [
        (0, 1, 2), (2, 3, 4), (4, 5, 6)]
    assert integrity(run).verified
    cases = [
        ({"last_step": 2, "next_step": 3}, "lists last_step 2, but its steps file steps/r00000-000001.parquet "
                                           "ends with step 3"),
        ({"first_step": 3}, "lists first_step 3, but its steps file steps/r00000-000001.parquet starts with step 2"),
        ({"rows": 3, "steps": "rows=3"}, "lists 3 rows, but its steps file steps/r00000-000001.parquet holds 2"),
    ]
    for change, problem in cases:
        path.write_bytes(honest)
        entries = read_entries(path)
        part = parts_of(entries)[1]  # in the middle of the segment: its rows were not read before
        for key, value in change.items():
            if key == "steps":
                part["steps"]["rows"] = 3
            else:
                part[key] = value
        write_entries(path, rechain(entries))
        assert integrity(run).problems == [f"manifest/r00000.jsonl segment 0 part 1: {problem}"]
        result = cli("verify", run)
        assert result.returncode == 1 and "NOT verified: 1 problem(s)" in result.stdout
        assert f"segment 0 part 1: {problem}" in result.stdout + result.stderr
        check = cli("check", run, "--json")
        assert check.returncode == 1 and json.loads(check.stdout)["integrity"]["verified"] is False


def test_a_part_without_statistics_is_checked_from_its_rows(tmp_path):
    """A steps file whose footer has no statistics (written by another tool) is read instead."""
    import pyarrow.parquet as pq

    from tracegen import reseal

    run = tmp_path / "run"
    train(run, steps=6, flush_every=2)
    middle = run / "steps" / "r00000-000001.parquet"
    table = pq.read_table(middle)
    pq.write_table(table, middle, compression="zstd", write_statistics=False)
    assert pq.read_metadata(middle).row_group(0).column(4).statistics is None
    reseal(run)  # its SHA-256 recorded again: only the claims are in question
    assert integrity(run).verified and cli("verify", run).returncode == 0
    path = manifest_file(run)
    entries = read_entries(path)
    parts_of(entries)[1].update(last_step=2, next_step=3)
    write_entries(path, rechain(entries))
    assert integrity(run).problems == ["manifest/r00000.jsonl segment 0 part 1: lists last_step 2, but its steps "
                                       "file steps/r00000-000001.parquet ends with step 3"]
    assert cli("verify", run).returncode == 1


def test_footer_steps_reads_the_statistics_pyarrow_reads(tmp_path):
    """trace/footer.py against pyarrow's reading of the same footers: rows and step range of one
    or several row groups, int64 extremes; None where there are no statistics."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flopcount.trace.footer import footer_steps
    from flopcount.trace.integrity import StepsFile, steps_file

    run = tmp_path / "run"
    train(run, steps=5, flush_every=2)
    for path in sorted((run / "steps").glob("*.parquet")):
        rows = pq.read_table(path).column("step").to_pylist()
        assert footer_steps(path.read_bytes()) == (len(rows), rows[0], rows[-1])
    steps = [-(2**63), -5, 0, 7, 2**62, 2**63 - 1]
    table = pa.table({"run_id": ["r"] * 6, "step": pa.array(steps, pa.int64()), "trailing": [False] * 5 + [True]})
    for options in ({}, {"row_group_size": 2}, {"compression": "zstd", "row_group_size": 4}):
        sink = io.BytesIO()
        pq.write_table(table, sink, **options)
        assert footer_steps(sink.getvalue()) == (6, -(2**63), 2**63 - 1)
        assert steps_file(sink.getvalue(), last_row=True) == StepsFile(6, -(2**63), 2**63 - 1, True)
    sink = io.BytesIO()
    pq.write_table(table, sink, write_statistics=False)
    assert footer_steps(sink.getvalue()) is None
    assert steps_file(sink.getvalue()) == StepsFile(6, -(2**63), 2**63 - 1, None)
    assert footer_steps(b"not a parquet file") is None and steps_file(b"not a parquet file") is None
