"""``FakeNationbuilder``: NationBuilder API v1 on 127.0.0.1, for testing the client over real HTTP.

Speaks the v1 shapes of docs/reference (people, push, match, taggings, tag pages), checks what the
real API checks (token, ``Accept``, rate limit) and is strict where clients go wrong: a tag page's
``next`` link is signed, and any request that is not exactly a ``next`` the fake gave out (a cursor
rebuilt, reordered or with a parameter added) is a 400. Faults come from ``LoopbackServer``.

    with FakeNationbuilder(token="t", rate_limit=5, rate_window=10.0) as nb:
        pid = nb.seed_person("a@example.org", tags=["sustainer_current_engineering"])
        client = NationbuilderConnectionManager(token="t", base_url=nb.api_url, session=nb.client_session())
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

import attrs

from .server import Faults, LoopbackServer, Reply, Request, json_reply

API = "/api/v1"
_PERSON_FIELDS = ("email", "first_name", "last_name", "external_id", "phone", "mobile")


class _Reject(Exception):
    """Raised inside a handler to answer with ``reply`` instead."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def _error(status: int, code: str, message: str, **extra: Any) -> _Reject:
    return _Reject(json_reply(status, {"code": code, "message": message, **extra}))


@attrs.frozen
class _Cursor:
    """A ``next`` link given out: the exact request target it must come back as, and where it resumes."""

    tag: str
    after_id: int
    limit: int
    target: str


class FakeNationbuilder(LoopbackServer):
    """A NationBuilder nation in memory. ``rate_limit`` requests per ``rate_window`` seconds (fixed
    windows on ``clock``; None disables it); defaults are NationBuilder's 250 per 10 s."""

    def __init__(
        self,
        *,
        token: str = "fake-nationbuilder-token",
        tls: bool = False,
        faults: Faults | None = None,
        rate_limit: int | None = 250,
        rate_window: float = 10.0,
        legacy_rate_headers: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(tls=tls, faults=faults)
        self.token = token
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.legacy_rate_headers = legacy_rate_headers
        self.clock = clock
        self._data = threading.Lock()
        self._people: dict[int, dict[str, Any]] = {}
        self._next_id = 1
        self._cursors: dict[str, _Cursor] = {}
        self._window = (-1, 0)  # (window number, requests counted in it)
        for method, pattern, handler, kind in (
            ("PUT", r"/people/push", self._push, "push"),
            ("POST", r"/people", self._create, "create_person"),
            ("GET", r"/people/match", self._match, "match"),
            ("GET", r"/people/(?P<id>\d+)", self._get, "get_person"),
            ("PUT", r"/people/(?P<id>\d+)", self._update, "update_person"),
            ("DELETE", r"/people/(?P<id>\d+)", self._delete, "delete_person"),
            ("PUT", r"/people/(?P<id>\d+)/taggings", self._tag, "tag_person"),
            ("DELETE", r"/people/(?P<id>\d+)/taggings/(?P<tag>[^/]+)", self._untag, "untag_person"),
            ("GET", r"/tags/(?P<tag>[^/]+)/people", self._tag_page, "tag_people"),
        ):
            self.route(method, API + pattern, self._guarded(handler), kind=kind)

    @property
    def api_url(self) -> str:
        """The ``base_url`` for the client: ``<url>/api/v1``."""
        return self.url + API

    # -- Python API for tests ------------------------------------------------------------------------

    def seed_person(self, email: str | None = None, *, tags: Iterable[str] = (), **fields: Any) -> int:
        """Add a person directly (no request counted) and return their id."""
        with self._data:
            return self._insert({"email": email, **fields}, tags)["id"]

    def person(self, person_id: int) -> dict[str, Any] | None:
        """A copy of a person, or None when there is none (e.g. deleted)."""
        with self._data:
            found = self._people.get(int(person_id))
            return _view(found) if found else None

    def people(self) -> list[dict[str, Any]]:
        with self._data:
            return [_view(p) for p in self._people.values()]

    def find_email(self, email: str) -> dict[str, Any] | None:
        with self._data:
            found = self._by_email(email)
            return _view(found) if found else None

    def tagged(self, tag: str) -> list[int]:
        """Ids of the people carrying ``tag``, ascending."""
        with self._data:
            return sorted(pid for pid, p in self._people.items() if tag in p["tags"])

    # -- server hooks --------------------------------------------------------------------------------

    def fault_reply(self, request: Request, status: int) -> Reply:
        return json_reply(status, {"code": "server_error", "message": f"injected {status}"})

    def finish_reply(self, request: Request, reply: Reply) -> Reply:
        """Every answer carries the rate-limit headers, as NationBuilder's do."""
        if self.rate_limit is None:
            return reply
        with self._data:
            number, used = self._window
            now_number = self._window_number(self.clock())
            used = used if number == now_number else 0
        prefix = "Nation-Ratelimit-" if self.legacy_rate_headers else "X-RateLimit-"
        limits = {
            prefix + "Limit": str(self.rate_limit),
            prefix + "Remaining": str(max(0, self.rate_limit - used)),
            prefix + "Reset": str(int((now_number + 1) * self.rate_window)),
        }
        return attrs.evolve(reply, headers={**reply.headers, **limits})

    # -- checks every request passes -----------------------------------------------------------------

    def _guarded(self, handler: Callable[[Request, Any], Reply]) -> Callable[[Request, Any], Reply]:
        def guarded(request: Request, match: Any) -> Reply:
            try:
                self._check_auth(request)
                self._check_content_types(request)
                self._count_against_rate_limit()
                return handler(request, match)
            except _Reject as rejected:
                return rejected.reply

        return guarded

    def _check_auth(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        token = self.token.encode()
        bearer_ok = scheme.lower() == "bearer" and secrets.compare_digest(credential.strip().encode(), token)
        query_ok = secrets.compare_digest((request.param("access_token") or "").encode(), token)
        if not (bearer_ok or query_ok):
            raise _error(401, "unauthorized", "You are not authorized to access this content. "
                                              "Your access token may be missing or invalid.")

    @staticmethod
    def _check_content_types(request: Request) -> None:
        if "application/json" not in request.headers.get("accept", ""):
            raise _error(406, "not_acceptable", "Accept must be application/json")
        if request.body and "application/json" not in request.headers.get("content-type", ""):
            raise _error(406, "not_acceptable", "Content-Type must be application/json")

    def _window_number(self, now: float) -> int:
        return math.floor(now / self.rate_window)

    def _count_against_rate_limit(self) -> None:
        if self.rate_limit is None:
            return
        with self._data:
            now = self.clock()
            number = self._window_number(now)
            used = self._window[1] if self._window[0] == number else 0
            if used >= self.rate_limit:
                retry_after = max(1, math.ceil((number + 1) * self.rate_window - now))
                raise _Reject(json_reply(429, {"code": "rate_limited", "message": "Rate limit exceeded"},
                                         {"Retry-After": str(retry_after)}))
            self._window = (number, used + 1)

    # -- people --------------------------------------------------------------------------------------

    def _push(self, request: Request, match: Any) -> Reply:
        fields = _person_body(request)
        if not fields.get("email"):
            raise _error(400, "missing_parameters", "push needs an email to match on")
        with self._data:
            existing = self._by_email(fields["email"])
            if existing is None:
                return json_reply(201, {"person": _view(self._insert(fields, fields["tags"]))})
            _apply(existing, fields)
            return json_reply(200, {"person": _view(existing)})

    def _create(self, request: Request, match: Any) -> Reply:
        fields = _person_body(request)
        with self._data:
            self._check_email_free(fields.get("email"), None)
            return json_reply(201, {"person": _view(self._insert(fields, fields["tags"]))})

    def _match(self, request: Request, match: Any) -> Reply:
        email = request.param("email")
        if not email:
            raise _error(400, "missing_parameters", "match needs an email")
        with self._data:
            found = self._by_email(email)
            if found is None:
                raise _error(404, "no_matches", "No people matched the given criteria.")
            return json_reply(200, {"person": _view(found)})

    def _get(self, request: Request, match: Any) -> Reply:
        with self._data:
            return json_reply(200, {"person": _view(self._person_or_404(match["id"]))})

    def _update(self, request: Request, match: Any) -> Reply:
        fields = _person_body(request)
        with self._data:
            person = self._person_or_404(match["id"])
            self._check_email_free(fields.get("email"), person["id"])
            _apply(person, fields)
            return json_reply(200, {"person": _view(person)})

    def _delete(self, request: Request, match: Any) -> Reply:
        with self._data:
            self._person_or_404(match["id"])
            del self._people[int(match["id"])]
        return Reply(204)

    # -- tags ----------------------------------------------------------------------------------------

    def _tag(self, request: Request, match: Any) -> Reply:
        body = _json_body(request)
        tagging = body.get("tagging") if isinstance(body, dict) else None
        tags = tagging.get("tag") if isinstance(tagging, dict) else None
        tags = [tags] if isinstance(tags, str) else tags
        if not tags or not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise _error(400, "bad_request", 'expected {"tagging": {"tag": "x" | ["a", "b"]}}')
        with self._data:
            person = self._person_or_404(match["id"])
            _add_tags(person, tags)
            return json_reply(200, {"taggings": [{"person_id": person["id"], "tag": t} for t in person["tags"]]})

    def _untag(self, request: Request, match: Any) -> Reply:
        with self._data:
            person = self._person_or_404(match["id"])
            tag = unquote(match["tag"])
            person["tags"] = [t for t in person["tags"] if t != tag]
        return Reply(204)

    def _tag_page(self, request: Request, match: Any) -> Reply:
        tag = unquote(match["tag"])
        with self._data:
            nonce = request.param("__nonce")
            if nonce is None:
                cursor = _Cursor(tag, 0, _limit(request.param("limit")), "")
            else:
                cursor = self._cursors.get(nonce) or _Cursor("", 0, 0, "")
                if cursor.tag != tag or _without_access_token(request.target) != cursor.target:
                    raise _error(400, "bad_request", "Invalid pagination parameters: follow next as given")
            ids = sorted(pid for pid, p in self._people.items() if tag in p["tags"] and pid > cursor.after_id)
            page = ids[: cursor.limit]
            next_target = None
            if len(ids) > cursor.limit:
                nonce = secrets.token_urlsafe(9)
                next_target = (f"{API}/tags/{quote(tag, safe='')}/people"
                               f"?__nonce={nonce}&__token={secrets.token_hex(16)}&limit={cursor.limit}")
                self._cursors[nonce] = _Cursor(tag, page[-1], cursor.limit, next_target)
            results = [_view(self._people[pid]) for pid in page]
        return json_reply(200, {"results": results, "next": next_target, "prev": None})

    # -- storage (callers hold self._data) -----------------------------------------------------------

    def _insert(self, fields: dict[str, Any], tags: Iterable[str]) -> dict[str, Any]:
        person = {"id": self._next_id, **{f: fields.get(f) for f in _PERSON_FIELDS}, "tags": []}
        _add_tags(person, tags)
        self._people[self._next_id] = person
        self._next_id += 1
        return person

    def _by_email(self, email: str) -> dict[str, Any] | None:
        wanted = email.strip().lower()
        return next((p for p in self._people.values() if (p["email"] or "").lower() == wanted), None)

    def _check_email_free(self, email: str | None, owner: int | None) -> None:
        other = self._by_email(email) if email else None
        if other is not None and other["id"] != owner:
            raise _error(400, "validation_failed", "Validation Failed.",
                         validation_errors={"email": ["has already been taken"]})

    def _person_or_404(self, person_id: str) -> dict[str, Any]:
        person = self._people.get(int(person_id))
        if person is None:
            raise _error(404, "not_found", "Record not found")
        return person


def _json_body(request: Request) -> Any:
    try:
        return request.json()
    except ValueError:
        raise _error(400, "bad_request", "body is not JSON") from None


def _person_body(request: Request) -> dict[str, Any]:
    body = _json_body(request)
    person = body.get("person") if isinstance(body, dict) else None
    if not isinstance(person, dict):
        raise _error(400, "bad_request", 'expected {"person": {...}}')
    tags = person.get("tags", [])
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise _error(400, "bad_request", "person tags must be a tag or a list of tags")
    return {**person, "tags": tags}


def _apply(person: dict[str, Any], fields: dict[str, Any]) -> None:
    """Update the given fields; tags given are added (as NationBuilder does), never removed."""
    person.update({f: fields[f] for f in _PERSON_FIELDS if f in fields})
    _add_tags(person, fields["tags"])


def _add_tags(person: dict[str, Any], tags: Iterable[str]) -> None:
    person["tags"] = list(dict.fromkeys([*person["tags"], *tags]))


def _view(person: dict[str, Any]) -> dict[str, Any]:
    return {**person, "tags": list(person["tags"])}


def _limit(value: str | None) -> int:
    """The page size asked for: default 10, at most 100 (NationBuilder's bounds)."""
    if value is None:
        return 10
    if not value.isdigit() or int(value) < 1:
        raise _error(400, "bad_request", "limit must be a positive integer")
    return min(int(value), 100)


def _without_access_token(target: str) -> str:
    """The request target with an ``access_token`` parameter removed (it may ride along any URL)."""
    path, _, query = target.partition("?")
    kept = [part for part in query.split("&") if part and not part.startswith("access_token=")]
    return path + ("?" + "&".join(kept) if kept else "")
