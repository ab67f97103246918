"""Small frozen answers of batched CRM calls: what a lookup found for each key, nothing merged away."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

import attrs

K = TypeVar("K", bound=Hashable)


def normalise_email(email: str) -> str:
    """The key an email is looked up and reported under: trimmed, lower-case."""
    return email.strip().lower()


@attrs.frozen
class Matches:
    """Every app user a lookup found for one key, instead of "the last one wins".

    ``key`` is the NationBuilder id or the normalised email; ``ids`` the valid record ids found for it,
    sorted and distinct; ``rejected`` a short detail for each record refused (a bad id format, an
    oversized value): never the value itself.
    """

    key: int | str
    ids: tuple[str, ...]
    rejected: tuple[str, ...] = ()

    @property
    def single(self) -> str | None:
        """The app user id when exactly one valid record and nothing rejected was found, else None:
        an ambiguous or partly refused answer never passes as one clean id."""
        return self.ids[0] if len(self.ids) == 1 and not self.rejected else None


class MatchesBuilder(Generic[K]):
    """Collects records key by key while pages arrive, then gives the ``Matches`` of each key."""

    def __init__(self) -> None:
        self._ids: dict[K, set[str]] = {}
        self._rejected: dict[K, list[str]] = {}

    def add(self, key: K, record_id: str) -> None:
        self._ids.setdefault(key, set()).add(record_id)

    def reject(self, key: K, detail: str) -> None:
        self._rejected.setdefault(key, []).append(detail)

    def build(self, keys: Iterable[K] | None = None) -> dict[K, Matches]:
        """``{key: Matches}`` for each key with at least one record (only ``keys``, when given)."""
        found = dict.fromkeys([*self._ids, *self._rejected])
        wanted = found if keys is None else [k for k in keys if k in found]
        return {k: Matches(k, tuple(sorted(self._ids.get(k, ()))), tuple(self._rejected.get(k, ())))  # type: ignore[arg-type]
                for k in wanted}


@attrs.frozen
class NewAppUser:
    """One app user to create in a batch (the arguments of ``add_user_to_crm``)."""

    email: str
    first_name: str
    last_name: str
    lang: str = "en"
    educator: bool = False
    external_id: str | int | None = None


@attrs.frozen
class RecordError:
    """Why the CRM refused one record of a batch: its status code (``REQUIRED_FIELD_MISSING``,
    ``DUPLICATE_VALUE``...), message and the fields concerned."""

    status_code: str
    message: str
    fields: tuple[str, ...] = ()


@attrs.frozen
class RecordResult:
    """What a batch did with the record at ``index`` of its input: made (``created``) or updated it,
    with its id, or refused it (``error``)."""

    index: int
    id: str | None = None
    created: bool = False
    error: RecordError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
