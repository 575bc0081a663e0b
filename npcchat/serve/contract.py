"""The OpenAPI contract as the running server keeps it: game studios generate clients from
``/openapi.json``, so it must describe this server's configuration, not a generic one.

* Security is declared only when an API key is configured (a client generated from a
  contract that demands a token the server never checks would be wrong either way).
* Every status a route can answer is documented with the ``{"error": {"code", "message",
  "type", "param"}}`` body (OpenAI's error object, npcchat's code in it): :func:`errors`.
* Limits set on the command line (``--max-text``) are the limits in the schema.
* Links tell a stateful client (and schemathesis) that a turn creates the session the
  session routes then read, reset and delete.
* ``Allow`` on a 405 lists every method of the path, not only those of the first route.

``tests/test_contract.py`` runs schemathesis against a real server with and without a key.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match, Route

from npcchat.serve import schemas as S

_WHY = {
    400: "The request cannot be served as asked (`bad_request`, `unsupported`); on the "
    "OpenAI-compatible routes also a request that breaks the schema (`invalid_request`).",
    401: "Missing or wrong API key (`unauthorized`); the server was started with --api-key.",
    404: "No such NPC or session (`not_found`; `model_not_found` on the OpenAI routes).",
    409: "The session file changed or cannot be read as a session (`session_unreadable`); "
    "the message says how to recover (reset, or DELETE to move it aside). On chat "
    "completions: the earlier messages are not the session's turns (`history_mismatch`).",
    413: "The request body is over --max-body (`too_large`).",
    422: "The request breaks the schema (`invalid_request`), or its prompt does not fit the "
    "model's context or is malformed (`bad_prompt`).",
    503: "Every slot is busy and the waiting line is full (`busy`); retry after Retry-After.",
}


def errors(*codes: int, beside_text: bool = False) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route for the error statuses it can answer.
    ``beside_text``: the route answers text/plain (FastAPI would give its errors that
    media type too); the errors are JSON all the same."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": S.ErrorOut, "description": _WHY[code]}
        if beside_text:
            ref = {"$ref": "#/components/schemas/ErrorOut"}
            entry = {"description": _WHY[code], "content": {"application/json": {"schema": ref}}}
        if code == 503:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            }
        if code == 401:
            entry["headers"] = {
                "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
            }
        out[code] = entry
    return out


# One Server-Sent Event of a streamed turn (``"stream": true``): ``text`` events carry
# reply pieces, then one ``turn`` event carries the same JSON as the unstreamed answer, or
# one ``error`` event the error body.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["text", "turn", "error"]},
        "data": {
            "type": "string",
            "description": 'JSON: {"text": piece} (text), the TurnOut (turn) or the '
            "ErrorOut (error)",
        },
    },
}

SESSION_PATH = "/v1/sessions/{player_id}/{npc_id}"


def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def turn_links() -> dict[str, Any]:
    """A turn creates (or continues) the session of its player and NPC."""
    params = {"player_id": "$request.body#/player_id", "npc_id": "$request.body#/npc_id"}
    return {
        "GetSession": {"operationRef": _ref(SESSION_PATH, "get"), "parameters": params},
        "ResetSession": {
            "operationRef": _ref(SESSION_PATH + "/reset", "post"),
            "parameters": params,
        },
        "DeleteSession": {"operationRef": _ref(SESSION_PATH, "delete"), "parameters": params},
    }


def install(app: FastAPI, max_text: int) -> None:
    """Generate the schema once, with this server's limits in it."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            text = schema["components"]["schemas"]["TurnIn"]["properties"]["text"]
            text["maxLength"] = max_text
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def allowed_methods(app: FastAPI, scope: dict[str, Any]) -> str:
    """Every method some route of this path answers (HEAD with GET, as Starlette does)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**scope, "method": next(iter(route.methods))})
            if match == Match.FULL:
                methods |= route.methods
    return ", ".join(sorted(methods))
