"""Fixtures of the drop-in tests: a Django project (``project.py``), Sefaria's settings pointed at the
test database and a FakeSalesforce over real HTTP, and the stand-in Sefaria (``sefaria_site.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from crm_states.sefaria.aftercare import AFTERCARE
from crm_states.testing import FakeSalesforce
from tests.sefaria.project import mongo_settings, salesforce_settings, setup_django

if TYPE_CHECKING:
    from tests.sefaria.sefaria_site import Sefaria

#: The aftercare's schedule in these tests: past the stand-in's gravatar import (0.2 s).
AFTERCARE_SECONDS = "0.3,0.8,1.5"


@pytest.fixture(scope="session")
def django_project(tmp_path_factory: pytest.TempPathFactory) -> None:
    setup_django(tmp_path_factory.mktemp("django"))


@pytest.fixture
def fake() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as server:
        yield server


@pytest.fixture
def settings_for(django_project: None, db, mongo_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """``settings_for(**overrides)``: a context with Sefaria's settings for this test's database."""
    from django.test import override_settings

    def make(**overrides: Any) -> Any:
        return override_settings(**{**mongo_settings(mongo_url, db.name),
                                    "CRM_STATES_JOURNAL": str(tmp_path / "journal.jsonl"),
                                    "CRM_STATES_AFTERCARE_SECONDS": AFTERCARE_SECONDS, **overrides})

    return make


@pytest.fixture
def sefaria(settings_for, db, fake: FakeSalesforce) -> Iterator[Sefaria]:  # type: ignore[no-untyped-def]
    """Sefaria on this test's database with ``CRM_TYPE=SALESFORCE`` at the fake; no users yet."""
    from django.contrib.auth.models import User

    from tests.sefaria.sefaria_site import Sefaria

    User.objects.all().delete()
    with settings_for(**salesforce_settings(fake)):
        yield Sefaria(db)
        assert AFTERCARE.wait_idle(30), "the aftercare did not finish"
