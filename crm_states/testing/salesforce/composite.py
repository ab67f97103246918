"""The fake's ``POST /composite``: sub-requests dispatched to the other routes, one API call in all.

Salesforce's limits, with its error shape (400 ``LIMIT_EXCEEDED`` for the whole request): at most 25
sub-requests, of which at most 5 queries, query-more calls or sObject Collections.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ..server import Reply, Request, json_reply
from .common import MAX_COMPOSITE, MAX_COMPOSITE_QUERIES, json_body, sf_errors

#: Sub-requests Salesforce counts against the five of a composite: query, queryAll, query-more
#: (``query/<locator>``) and sObject Collections.
_QUERY_OR_COLLECTION = re.compile(r"/services/data/v\d+\.\d/(?:query|queryAll|composite/sobjects)(?:[/?]|$)")


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
        if not all(isinstance(sub, dict) for sub in subrequests):
            return json_reply(400, sf_errors("JSON_PARSER_ERROR", "each subrequest must be a JSON object"))
        if len(subrequests) > MAX_COMPOSITE:
            return json_reply(400, sf_errors("LIMIT_EXCEEDED", f"Limit of {MAX_COMPOSITE} subrequests exceeded"))
        heavy = sum(1 for sub in subrequests if _QUERY_OR_COLLECTION.match(str(sub.get("url", ""))))
        if heavy > MAX_COMPOSITE_QUERIES:
            return json_reply(400, sf_errors("LIMIT_EXCEEDED", (
                f"Limit of {MAX_COMPOSITE_QUERIES} query, queryAll or sObject Collections subrequests exceeded: "
                f"{heavy} in one composite request")))
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
