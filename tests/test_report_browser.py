"""The HTML report in a real browser: headless Chromium (Debian's package) opens the page of a run with
known counts, and the DOM it rendered is read back (``--dump-dom``): every state's count is in its
machine's picture and in its table. A screenshot is saved under the test's tmp_path."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from crm_states.api import MACHINES
from crm_states import report
from crm_states.cli import build_parser
from crm_states.cli.report_command import run_report
from crm_states.diagram_svg import node_id
from crm_states.testing import FakeSalesforce
from tests.operator_seed import EXPECTED, PageFigures, seed

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no Chromium found on PATH (looked for {', '.join(BROWSERS)}); .ci/run installs Debian's chromium")


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile.mkdir()
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


def test_chromium_shows_every_count_in_each_picture_and_table(db, tmp_path: Path) -> None:
    browser = _chromium()
    with FakeSalesforce() as fake:
        seed(db, fake, tmp_path)
    page = tmp_path / "report.html"
    args = build_parser().parse_args(["report", "--html", str(page)])
    out = io.StringIO()
    assert run_report(db, args, out) == 0
    total = sum(n for states in EXPECTED.values() for n in states.values())
    assert out.getvalue() == f"report of {len(MACHINES)} machines ({total} profiles) written to {page}\n"
    data = report.collect(db)
    held = {m: {r.state: r.count for r in rows if r.count} for m, rows in data.items() if any(r.count for r in rows)}
    assert held == EXPECTED  # the run left what it was meant to: the page has something to show

    dumped = _headless(browser, tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = PageFigures(dumped.stdout)
    assert set(dom.table) == set(data) == set(dom.picture)
    for machine, rows in data.items():
        for row in rows:
            shown = f"{row.count:,}"
            assert dom.table[machine][row.state] == shown, (machine, row.state)
            texts = dom.picture[machine][node_id(machine, row.state)]
            assert texts[-1] == shown and texts[0], (machine, row.state, texts)
    assert not any(tag == "script" for tag, _ in dom.tags)

    shot = tmp_path / "report.png"
    taken = _headless(browser, tmp_path / "profile-shot", "--window-size=1280,2000", f"--screenshot={shot}",
                      "--hide-scrollbars", page.as_uri())
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
