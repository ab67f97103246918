"""The reliability and security suite (issue 6): every test here is marked ``reliability``.

``pytest -m reliability`` runs only this suite, ``pytest -m "not reliability"`` skips it, and plain
``pytest`` runs it too. Each test records the numbers of its run (kills, profiles, requests...) in
``checks.RESULTS``; they are printed at the end of the session under "reliability figures", which is
where RELIABILITY.md takes its numbers from (``tests/conftest.py`` prints them, gathered from every worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crm_states.testing import FakeSalesforce

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server
