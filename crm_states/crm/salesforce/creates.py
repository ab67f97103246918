"""Creating one app user so that no retry can make a second: upsert by external id, or create by email.

Create by email looks the email up before every try, and never re-sends a POST whose answer did not come
within the read timeout (Salesforce may still commit it): it waits for the record to show up instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from ..errors import (
    CrmError,
    CrmLimitExceeded,
    CrmOutcomeUnknown,
    CrmReadTimeout,
    CrmRejected,
    CrmTransientError,
)
from ..http import short
from .answers import json_object, record_id_of
from .transport import Transport

log = logging.getLogger("crm_states.crm")

#: Waits between email lookups while a timed-out create settles: the first, doubling up to the cap.
SETTLE_FIRST_WAIT = 0.25
SETTLE_MAX_WAIT = 4.0

FindByEmail = Callable[[str], "str | None"]


def upsert_user(http: Transport, sobject: str, field: str, external_id: str | int, fields: Mapping[str, Any]) -> str:
    """Upsert by external id: a retry just updates the record the first try made."""
    value = str(external_id)
    if isinstance(external_id, bool) or not value:
        raise CrmRejected(f"invalid external id for {field}")
    path = f"sobjects/{sobject}/{field}/{quote(value, safe='')}"
    response = http.api("PATCH", path, json=fields)
    body = json_object(response) if response.content else {}
    if isinstance(body.get("id"), str):
        return body["id"]
    return record_id_of(json_object(http.api("GET", path, params={"fields": "Id"})))


def create_user(http: Transport, sobject: str, email: str, fields: Mapping[str, Any], *, find: FindByEmail,
                settle_seconds: float) -> str:
    """Create unless the email already has an app user, re-checking before every retry.

    The POST itself is never resent blindly: after a dropped connection, a 5xx or a malformed
    answer the record may exist, and only the email lookup can tell. After a read timeout the
    lookup cannot tell yet (Salesforce may still be processing the request and commit it later),
    so that POST is never resent: ``settle_create`` waits for the record instead.
    """
    path = f"sobjects/{sobject}/"
    policy = http.policy
    once = attrs.evolve(policy, attempts=1)
    last: CrmError | None = None
    for attempt in range(policy.attempts):
        if attempt:
            http.sleep(policy.delay(attempt - 1))
        existing = find(email)
        if existing is not None:
            return existing
        try:
            response = http.api("POST", path, json=fields, policy=once)
        except CrmReadTimeout as exc:
            if exc.method == "POST" and urlsplit(exc.url or "").path.endswith(f"/{path}"):
                return settle_create(http, sobject, email, exc, find=find, window=settle_seconds)
            last = exc  # the token request timed out, not the create: nothing was created
            continue
        except CrmError as exc:
            if not isinstance(exc, CrmTransientError) and exc.code != "MALFORMED_JSON":
                raise
            log.info("salesforce create failed (%s); checking by email before retrying", exc)
            last = exc
            continue
        return record_id_of(json_object(response), key="id")
    assert last is not None
    raise last


def settle_create(http: Transport, sobject: str, email: str, timeout: CrmReadTimeout, *, find: FindByEmail,
                  window: float) -> str:
    """After a create POST timed out: look the email up, with backoff, for ``window`` seconds.

    The id as soon as the record shows up; ``CrmOutcomeUnknown`` if it does not (the POST is not
    re-sent). A lookup failing for good (auth, say) ends the wait with ``CrmOutcomeUnknown`` too;
    the daily API limit is raised as itself. Time counts on the wall clock or as the sum of the
    waits asked of ``sleep``, whichever is more, so an injected no-op ``sleep`` bounds the number
    of lookups instead of spinning.
    """
    log.warning("salesforce create timed out (%s); not re-sending it, looking the email up for up to "
                "%.1fs while Salesforce may still be making the record", timeout, window)
    started, slept, wait, lookups = time.monotonic(), 0.0, SETTLE_FIRST_WAIT, 0
    trouble = ""
    while True:
        lookups += 1
        try:
            found = find(email)
        except CrmLimitExceeded:
            raise
        except CrmError as exc:
            if not isinstance(exc, CrmTransientError) and exc.code != "MALFORMED_JSON":
                trouble = f"; the lookup failed: {exc}"
                break
            log.info("salesforce: lookup while a create settles failed (%s); trying again", exc)
            trouble, found = f"; the last lookup failed: {exc}", None
        else:
            trouble = ""
        if found is not None:
            log.info("salesforce: the timed-out create committed late; app user %s found by email", found)
            return found
        remaining = window - max(time.monotonic() - started, slept)
        if remaining <= 0:
            break
        pause = min(wait, remaining)
        http.sleep(pause)
        slept += pause
        wait = min(wait * 2, SETTLE_MAX_WAIT)
    raise CrmOutcomeUnknown(
        f"salesforce create (POST sobjects/{sobject}/): outcome unknown: no answer "
        f"within the {http.policy.read_timeout:g}s read timeout, not re-sent; no app user with this email "
        f"showed up in the {window:g}s settle window ({lookups} lookups); resuming looks the email up "
        f"before creating{short(trouble, 160) if trouble else ''}") from timeout
