"""8. The journal file never loses an acknowledged entry: torn lines at every byte offset of a real entry,
torn lines glued to the next entry (an older writer), short writes, a file-size quota that stops a write
half-way, and a process killed in the middle of an append. Every complete entry is read back."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.journal import MARKER, Journal, JournalEntry, ReadReport, read_file
from crm_states.records import START, ProfileWrite, Transition, utcnow
from machines import new_user_signup as signup
from tests.reliability.checks import record

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["שרה כהן", "D'Arcy", MARKER + '{"journal": 1}', '{"at": "', "}\n{", "\x00", "\u202e", "🙂" * 5])
_files = itertools.count()
GLUED: Counter[str] = Counter()


def entry(pid: int, text: str = "boom") -> JournalEntry:
    at = utcnow()
    transitions = (Transition(pid, signup.NAME, f"{pid}-1", 1, START, "UserCreated", "start", at),
                   Transition(pid, signup.NAME, f"{pid}-1", 2, "UserCreated", "RequestAddToSalesforce", "x", at,
                              {"error": text}))
    return JournalEntry(pid, signup.NAME, transitions, ProfileWrite(set={"sf_app_user_id": f"a0B{pid:015d}"},
                                                                    crm_log=f"X-{text}"), f"DbError: {text}", False)


def line_of(e: JournalEntry) -> bytes:
    """The bytes ``Journal.record`` appends for ``e``."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"crm-states-line-{os.getpid()}-{next(_files)}.jsonl"
    try:
        Journal(path).record(e)
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def read_back(path: Path) -> tuple[list[str], ReadReport]:
    report = ReadReport()
    return [e.entry_id for e in read_file(path, report)], report


def test_a_torn_entry_at_every_byte_offset_loses_no_complete_entry(tmp_path: Path) -> None:
    """A complete entry, the next one cut at byte k (a crash mid-append), then an append: for every k the
    first and the last come back, the cut one only when whole, and the cut is counted as one torn line."""
    first, cut, last = entry(1, "שרה"), entry(2, "D'Arcy {\"at\": 1}"), entry(3)
    head, torn_bytes = line_of(first), line_of(cut)
    written = recovered = torn = 0
    for k in range(len(torn_bytes) + 1):
        path = tmp_path / f"j{k}.jsonl"
        path.write_bytes(head + torn_bytes[:k])
        Journal(path).record(last)
        ids, report = read_back(path)
        whole = k >= len(torn_bytes) - 1  # all of it but, at most, its newline
        expected = [first.entry_id, *([cut.entry_id] if whole else []), last.entry_id]
        assert ids == expected, k
        assert report.torn_lines == (0 if whole or k == 0 else 1), k
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and json.loads(lines[-2])["entry_id"] == last.entry_id  # a line of its own
        assert b"" not in lines[:-1]  # the fresh line is added only after a torn one
        written += 2
        torn += report.torn_lines
        recovered += 2 if ids[0] == first.entry_id and ids[-1] == last.entry_id else 0
    record("8a torn entry at every byte offset", offsets=len(torn_bytes) + 1, acknowledged_written=written,
           acknowledged_recovered=recovered, torn_lines=torn)
    assert recovered == written


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(HOSTILE, min_size=3, max_size=3), cut=st.floats(0, 1), glued=st.booleans(),
       in_log=st.booleans())
def test_a_torn_entry_glued_to_the_next_does_not_swallow_it(tmp_path: Path, texts: list[str], cut: float,
                                                           glued: bool, in_log: bool) -> None:
    """An older writer (or an application log) may glue the next entry onto a torn line; the reader finds
    the glued entry at its own start, whatever the cut and whatever the entries' text holds."""
    a, b, c = (entry(i, t) for i, t in enumerate(texts, 1))
    la, lb, lc = line_of(a), line_of(b), line_of(c)
    if in_log:  # the same entries as application log lines
        la, lb, lc = (b"2026-11-24 12:00:00 ERROR crm_states.journal " + MARKER.encode() + x for x in (la, lb, lc))
    prefix = len(lb) - len(line_of(b)) if in_log else 1  # a log line cut before its marker is just text
    k = int(cut * (len(lb) - 1))
    path = tmp_path / f"g{next(_files)}.jsonl"
    path.write_bytes(la + lb[:k] + (b"" if glued else b"\n") + lc)
    ids, report = read_back(path)
    complete = k == len(lb) - 1
    assert ids == [a.entry_id, *([b.entry_id] if complete else []), c.entry_id]
    assert report.invalid_entries == 0
    assert report.torn_lines == (1 if prefix <= k < len(lb) - 1 else 0)
    GLUED.update(examples=1, acknowledged_written=2, acknowledged_recovered=ids.count(a.entry_id) + ids.count(c.entry_id),
                 torn_lines=report.torn_lines, glued=glued, log_lines=in_log)
    record("8b torn entry glued to the next (hypothesis)", **GLUED)


def test_short_writes_are_finished(tmp_path: Path) -> None:
    """A writer that takes 7 bytes per call (as a pipe or a signal can make ``os.write`` do)."""
    calls = []

    def short(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return os.write(fd, data[:7])

    path = tmp_path / "short.jsonl"
    journal = Journal(path, write=short)
    entries = [entry(i, "שרה כהן " * i) for i in range(1, 6)]
    for e in entries:
        journal.record(e)
    ids, report = read_back(path)
    assert ids == [e.entry_id for e in entries] and report.unreadable == 0
    assert len(calls) > 5 * 50  # every entry took many calls
    record("8c short writes (7 bytes per call)", acknowledged_written=len(entries), acknowledged_recovered=len(ids),
           write_calls=len(calls))


QUOTA_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.reliability.test_journal_file import entry
    from crm_states.journal import Journal
    path = Path(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the quota, write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, resource.RLIM_INFINITY))
    try:
        Journal(path).record(entry(2))
    except OSError as exc:
        print("refused", exc.errno)
    else:
        print("written")
""")


def test_a_quota_that_stops_an_append_half_way_leaves_no_torn_line(tmp_path: Path) -> None:
    """A real ``os.write`` under a file-size limit 100 bytes above the file: the first write is short, the
    next fails. The append raises (the entry was not journaled, so the machine does not count on it), its
    bytes are cut off again, and the appends before and after are read back."""
    path = tmp_path / "quota.jsonl"
    Journal(path).record(entry(1))
    size = path.stat().st_size
    child = subprocess.run([sys.executable, "-c", QUOTA_CHILD.format(root=str(ROOT)), str(path)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert child.stdout.split() == ["refused", "27"], child.stdout + child.stderr  # EFBIG
    assert path.stat().st_size == size
    Journal(path).record(entry(3))
    ids, report = read_back(path)
    assert len(ids) == 2 and report.unreadable == 0
    record("8d file-size quota mid-append", acknowledged_written=2, acknowledged_recovered=len(ids), refused=1)


CRASH_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.reliability.test_journal_file import entry
    from crm_states.journal import Journal

    def half_then_die(fd, data):
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)   # the process dies inside the append

    Journal(sys.argv[1]).record(entry(1))
    Journal(sys.argv[1], write=half_then_die).record(entry(2))
""")


def test_a_process_killed_mid_append_then_another_append_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD.format(root=str(ROOT)), str(path)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert child.returncode == -9, child.stderr
    assert not path.read_bytes().endswith(b"\n")  # the torn half is there
    after = entry(3)
    Journal(path).record(after)
    ids, report = read_back(path)
    assert len(ids) == 2 and ids[-1] == after.entry_id
    assert json.loads(path.read_bytes().splitlines()[-1])["entry_id"] == after.entry_id
    assert report.torn_lines == 1 and report.problems[0][0] == 2
    record("8e SIGKILL mid-append, then an append", acknowledged_written=2, acknowledged_recovered=len(ids),
           torn_lines=report.torn_lines)
