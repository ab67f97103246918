"""HTTP plumbing shared by the CRM clients: timeouts, bounded retries with full jitter, redaction.

Clients pass a ``requests.Session``; tests give them one pointed at a loopback fake, never a patched
``requests``. Nothing here knows a CRM: each client supplies ``classify`` to say what a response means.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import requests

from .. import metrics
from ..logs import fields
from .errors import CrmError, CrmReadTimeout, CrmTransientError

log = logging.getLogger("crm_states.crm")


@attrs.frozen
class RetryPolicy:
    """How hard to try. ``attempts`` counts the first try; delays are full-jitter exponential."""

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    connect_timeout: float = 5.0
    read_timeout: float = 20.0

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2**n)]."""
        cap = min(self.max_delay, self.base_delay * (2**retry_number))
        return (rng or random).uniform(0.0, cap)


class RequestCounter:
    """A thread-safe count of the requests a client sent (each try of a retried request counts)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def value(self) -> int:
        with self._lock:
            return self._count


#: A classifier maps a response to None (success: return it) or to the ``CrmError`` to raise/retry.
Classifier = Callable[[requests.Response], CrmError | None]


def send(
    session: requests.Session,
    method: str,
    url: str,
    *,
    classify: Classifier,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    on_send: Callable[[], None] | None = None,
    **kwargs: Any,
) -> requests.Response:
    """Send one request with a timeout, retrying transient failures a bounded number of times.

    Retries connection errors, timeouts and whatever ``classify`` calls ``CrmTransientError`` (waiting
    its ``retry_after`` when the server gave one, e.g. a 429's Retry-After); any other ``CrmError`` is
    raised at once. The last transient error is raised when attempts run out.

    A read timeout (``requests.ReadTimeout``: the request was sent, no answer came in time) is raised as
    ``CrmReadTimeout``, a ``CrmTransientError`` subclass, because the server may still be processing it;
    a connect timeout or a failed connection stays a plain ``CrmTransientError``. Both are retried
    here alike: callers that must not resend (``attempts=1``) tell them apart by class.

    ``on_send`` is called before each try goes out (a ``RequestCounter``, say): a try that got no
    answer counts too, since the server may have received and counted it.
    """
    kwargs.setdefault("timeout", policy.timeout)
    last: CrmError | None = None
    for attempt in range(policy.attempts):
        if attempt:
            wait = getattr(last, "retry_after", None)
            if wait is None:
                wait = policy.delay(attempt - 1, rng)
            log.info("crm retry %s %s in %.2fs after: %s", method, redact_url(url), wait, last,
                     extra=fields(kind=metrics.request_kind(method, url), outcome="retried",
                                  error_class=type(last).__name__, attempt=attempt, wait_seconds=round(wait, 3)))
            metrics.crm_retry(method, url)
            sleep(wait)
        if on_send is not None:
            on_send()
        started, response = time.monotonic(), None
        try:
            response = session.request(method, url, **kwargs)
        except requests.ReadTimeout as exc:
            # The request reached the server, which may still act on it: a distinct (transient) class,
            # so that callers sending a non-idempotent request can refuse to send it again.
            last = CrmReadTimeout(f"timeout on {method} {redact_url(url)}: {type(exc).__name__}",
                                  method=method, url=redact_url(url))
        except requests.Timeout as exc:  # ConnectTimeout: the request never reached the server
            last = CrmTransientError(f"timeout on {method} {redact_url(url)}: {type(exc).__name__}")
        except requests.ConnectionError as exc:
            last = CrmTransientError(f"connection failed on {method} {redact_url(url)}: {type(exc).__name__}")
        except requests.RequestException as exc:
            raise CrmError(f"request failed on {method} {redact_url(url)}: {type(exc).__name__}") from None
        error = last if response is None else classify(response)
        metrics.crm_request(method, url, time.monotonic() - started, error)
        if error is None:
            return response
        if not isinstance(error, CrmTransientError):
            raise error
        last = error
    assert last is not None
    raise last


_SECRET_QUERY = re.compile(r"(?i)(access_token|token|client_secret|password|sig|signature)=[^&#\s]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._!\-+/=]+")


def redact_url(url: str) -> str:
    """The URL with secret-bearing query parameters blanked, for logs and error messages."""
    return _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=***", url)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with bearer tokens, secret query parameters and each given secret replaced by ***."""
    text = _BEARER.sub(lambda m: f"{m.group(1)}***", redact_url(text))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def short(text: str, limit: int = 300) -> str:
    """Trim a response body or message to something fit for a log line or a Mongo detail."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
