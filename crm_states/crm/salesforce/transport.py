"""Salesforce auth and transport: one client-credentials token per process, bounded retries, error mapping.

Everything the client sends goes through ``Transport.api``: a 401 INVALID_SESSION_ID costs one new token
and one more try, malformed JSON is retried as transient, and every failed answer becomes the
``CrmError`` subclass its status and error code call for, with secrets redacted.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
import requests

from ... import metrics
from ..errors import (
    CrmAuthError,
    CrmError,
    CrmLimitExceeded,
    CrmNotFound,
    CrmRejected,
    CrmTransientError,
)
from ..http import RequestCounter, RetryPolicy, redact, send, short
from .answers import codes, payload

log = logging.getLogger("crm_states.crm")

_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")


@attrs.frozen
class _Token:
    access_token: str = attrs.field(repr=False)
    instance_url: str


class TokenCache:
    """Access tokens keyed by (base_url, client_id), shared by every manager in the process.

    One fetch at a time per key, and ``invalidate`` only drops the token that actually failed, so
    threads that all see the same expiry fetch one new token between them.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], fetch: Callable[[], _Token]) -> _Token:
        with self._lock:
            key_lock = self._locks.setdefault(key, threading.Lock())
        with key_lock:
            token = self._tokens.get(key)
            if token is None:
                token = self._tokens[key] = fetch()
            return token

    def peek(self, key: tuple[str, str]) -> _Token | None:
        return self._tokens.get(key)

    def invalidate(self, key: tuple[str, str], token: _Token) -> None:
        with self._lock:
            if self._tokens.get(key) is token:
                del self._tokens[key]


PROCESS_TOKENS = TokenCache()


class _SessionExpired(CrmAuthError):
    """401 INVALID_SESSION_ID: worth one new token, not more."""


class Transport:
    """Token, requests and error classification for one (org, client id)."""

    def __init__(self, base_url: str, client_id: str, client_secret: str, *, api_version: str,
                 session: requests.Session, policy: RetryPolicy, sleep: Callable[[float], None],
                 verify: bool | str | None, token_cache: TokenCache | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret
        self.api_root = f"/services/data/v{api_version}"
        self.session = session
        self.policy = policy
        self.sleep = sleep
        self.verify = session.verify if verify is None else verify
        self._tokens = token_cache or PROCESS_TOKENS
        self._key = (self.base_url, client_id)
        self.usage: tuple[int, int] | None = None
        #: Every request sent under ``/services/data`` (each try; the token request is not one).
        self.sent = RequestCounter()

    # -- tokens --------------------------------------------------------------------------------------

    def token(self) -> _Token:
        return self._tokens.get(self._key, self._fetch_token)

    def _fetch_token(self) -> _Token:
        log.info("salesforce: fetching an access token for client %s", self.client_id)
        response = self._finish(lambda: send(
            self.session, "POST", f"{self.base_url}/services/oauth2/token",
            classify=self._classify_token, policy=self.policy, sleep=self.sleep, verify=self.verify,
            data={"grant_type": "client_credentials"}, auth=(self.client_id, self._client_secret)))
        body = response.json()
        return _Token(body["access_token"], body["instance_url"].rstrip("/"))

    # -- requests ------------------------------------------------------------------------------------

    def api(self, method: str, path: str, *, policy: RetryPolicy | None = None, **kwargs: Any) -> requests.Response:
        """One REST call: ``path`` is under ``/services/data/vNN.N/`` or absolute (``nextRecordsUrl``).

        A 401 INVALID_SESSION_ID costs one new token and one more try; a second one is ``CrmAuthError``.
        """
        token = self.token()
        try:
            return self._send(method, path, token, policy or self.policy, kwargs)
        except _SessionExpired:
            self._tokens.invalidate(self._key, token)
            log.info("salesforce: session expired; fetching a new token")
        token = self.token()
        try:
            return self._send(method, path, token, policy or self.policy, kwargs)
        except _SessionExpired as exc:
            self._tokens.invalidate(self._key, token)
            raise CrmAuthError(f"salesforce refused a freshly issued token: {exc}", status=401,
                               code=exc.code) from None

    def _send(self, method: str, path: str, token: _Token, policy: RetryPolicy,
              kwargs: Mapping[str, Any]) -> requests.Response:
        url = token.instance_url + (path if path.startswith("/") else f"{self.api_root}/{path}")
        extra = dict(kwargs)
        headers = {**self.headers(token), **extra.pop("headers", {})}  # a caller's Accept wins
        return self._finish(lambda: send(
            self.session, method, url, classify=self._classify, policy=policy, sleep=self.sleep,
            verify=self.verify, headers=headers, on_send=self.sent, **extra))

    @staticmethod
    def headers(token: _Token) -> dict[str, str]:
        return {"Authorization": f"Bearer {token.access_token}", "Accept": "application/json"}

    @staticmethod
    def _finish(call: Callable[[], requests.Response]) -> requests.Response:
        """Malformed JSON is retried as transient; once retries run out it is a plain ``CrmError``."""
        try:
            return call()
        except CrmTransientError as exc:
            if exc.code != "MALFORMED_JSON":
                raise
            raise CrmError(str(exc), status=exc.status, code=exc.code) from None

    def query_request_bytes(self, soql: str) -> int:
        """Request line plus headers of ``GET query?q=soql`` as this client sends it."""
        token = self.token()
        origin = urlsplit(token.instance_url)
        target = f"{origin.path}{self.api_root}/query?{urlencode({'q': soql})}"
        headers = {**self.session.headers, "Host": origin.netloc, **self.headers(token)}
        return len(f"GET {target} HTTP/1.1\r\n") + sum(len(k) + len(str(v)) + 4 for k, v in headers.items()) + 2

    # -- classification ------------------------------------------------------------------------------

    def _note_usage(self, response: requests.Response) -> None:
        m = _USAGE.search(response.headers.get("Sforce-Limit-Info", ""))
        if m:
            self.usage = (int(m.group(1)), int(m.group(2)))
            metrics.salesforce_api_usage(*self.usage)
        log.debug("salesforce %s %s -> %s (api usage %s)", response.request.method,
                  urlsplit(response.request.url or "").path, response.status_code, self.usage)

    def _classify(self, response: requests.Response) -> CrmError | None:
        self._note_usage(response)
        where = f"{response.request.method} {urlsplit(response.request.url or '').path}"
        status = response.status_code
        if 200 <= status < 300:
            content_type = response.headers.get("Content-Type", "")
            if response.content and status != 204 and ("json" in content_type or not content_type):
                try:
                    response.json()
                except ValueError:
                    return CrmTransientError(f"salesforce {where}: malformed JSON in a {status} answer",
                                             status=status, code="MALFORMED_JSON")
            return None
        return self.error(status, payload(response), where, retry_after=response.headers.get("Retry-After"))

    def _classify_token(self, response: requests.Response) -> CrmError | None:
        self._note_usage(response)
        status = response.status_code
        if 200 <= status < 300:
            try:
                body = response.json()
            except ValueError:
                return CrmTransientError(f"salesforce token: malformed JSON in a {status} answer", status=status,
                                         code="MALFORMED_JSON")
            if not (isinstance(body, dict) and isinstance(body.get("access_token"), str)
                    and re.match(r"https?://", str(body.get("instance_url")))):
                return CrmAuthError("salesforce token: answer lacks access_token or instance_url", status=status)
            return None
        if status >= 500 or status == 429:
            return self.error(status, payload(response), "token", retry_after=response.headers.get("Retry-After"))
        body = payload(response)
        code = body.get("error") if isinstance(body, dict) else None
        detail = body.get("error_description") if isinstance(body, dict) else body
        # Redact before shortening: a secret cut in half by the limit would no longer be recognised.
        message = f"salesforce refused the client credentials: HTTP {status} {code or ''}: " \
                  f"{short(self.redact(str(detail)), 200)}"
        return CrmAuthError(message, status=status, code=code)

    def error(self, status: int, body: Any, where: str, *, retry_after: str | None = None) -> CrmError:
        """The ``CrmError`` for a failed answer (also used for composite sub-responses)."""
        found, message = codes(body)
        code = found[0] if found else None
        text = self.redact(f"salesforce {where}: HTTP {status}{' ' + code if code else ''}"
                           f"{': ' + short(self.redact(message), 200) if message else ''}")
        if status == 401:
            cls = _SessionExpired if code == "INVALID_SESSION_ID" else CrmAuthError
            return cls(text, status=status, code=code)
        if status == 403 and "REQUEST_LIMIT_EXCEEDED" in found:
            return CrmLimitExceeded(text, status=status, code=code)
        if status == 404:
            return CrmNotFound(text, status=status, code=code)
        if status >= 500 or status == 429 or "UNABLE_TO_LOCK_ROW" in found:
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            return CrmTransientError(text, status=status, code=code, retry_after=wait)
        if 300 <= status < 500:
            return CrmRejected(text, status=status, code=code or ("MULTIPLE_CHOICES" if status == 300 else None))
        return CrmError(text, status=status, code=code)

    def redact(self, text: str) -> str:
        token = self._tokens.peek(self._key)
        return redact(text, self._client_secret, token.access_token if token else None)
