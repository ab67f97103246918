"""The fake's ``POST /composite``: sub-requests dispatched to the other routes, one API call in all."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ..server import Reply, Request, json_reply
from .common import MAX_COMPOSITE, json_body, sf_errors


class CompositeRoutes:
    """``FakeSalesforce`` mixes this in; sub-requests run through ``call`` (no counting, no faults)."""

    if TYPE_CHECKING:
        def call(self, request: Request) -> Reply: ...

    def _composite(self, request: Request, m: re.Match[str]) -> Reply:
        body = json_body(request)
        if isinstance(body, Reply):
            return body
        subrequests = body.get("compositeRequest")
        if not isinstance(subrequests, list) or not subrequests:
            return json_reply(400, sf_errors("JSON_PARSER_ERROR", "compositeRequest must be a non-empty list"))
        if len(subrequests) > MAX_COMPOSITE:
            return json_reply(400, sf_errors("LIMIT_EXCEEDED", f"Limit of {MAX_COMPOSITE} subrequests exceeded"))
        results, halted = [], False
        for sub in subrequests:
            ref = sub.get("referenceId")
            if halted:
                results.append({"body": sf_errors("PROCESSING_HALTED", "The transaction was rolled back since "
                                                  "another operation in the same transaction failed."),
                                "httpHeaders": {}, "httpStatusCode": 400, "referenceId": ref})
                continue
            url, payload = str(sub.get("url", "")), sub.get("body")
            if url.startswith("/services/data/"):
                reply = self.call(Request(str(sub.get("method", "GET")).upper(), url, request.headers,
                                          b"" if payload is None else json.dumps(payload).encode()))
            else:
                reply = json_reply(400, sf_errors("INVALID_URL", "composite sub-requests stay under /services/data"))
            results.append({"body": json.loads(reply.body) if reply.body else None,
                            "httpHeaders": {k: v for k, v in reply.headers.items() if k.lower() == "location"},
                            "httpStatusCode": reply.status, "referenceId": ref})
            halted = bool(body.get("allOrNone")) and reply.status >= 400
        return json_reply(200, {"compositeResponse": results})
