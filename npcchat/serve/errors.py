"""Error answers of ``npcchat serve``: one JSON shape for every route, a superset of the
OpenAI error object so that OpenAI clients read ours as their own::

    {"error": {"code": "not_found", "message": "unknown NPC 'x'", "type": "...", "param": null}}

``code`` is npcchat's short code (what a game branches on), ``message`` one line saying
what to do, ``type`` the OpenAI error class of the status, ``param`` the request field at
fault when one is (else null). A traceback never leaves the server.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from npcchat.errors import BusyError, ConfigError, NpcchatError, PromptError, SessionError
from npcchat.runtime.batch import TurnCancelled


class NotFound(NpcchatError):
    """An NPC or a session the server does not have (HTTP 404)."""


class ReloadRefused(NpcchatError):
    """A reload that could not happen (HTTP 409): the old bundle keeps serving."""


class HistoryMismatch(NpcchatError):
    """A chat completion's earlier messages are not the session's turns (HTTP 409)."""


class ApiError(Exception):
    """An error answer: status, a short code and a one-line message (``param``: the
    request field at fault)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.param = param


def error_type(status: int) -> str:
    """The OpenAI error ``type`` of a status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status in (429, 503):
        return "overloaded_error" if status == 503 else "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": error_type(status), "param": param}}


def response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(body(status, code, message, param), status_code=status, headers=headers)


# the turns-by-outcome label of each error code (the rest count as "error")
OUTCOMES = {
    "busy": "busy",
    "cancelled": "cancelled",
    "not_found": "bad_request",
    "model_not_found": "bad_request",
    "bad_prompt": "bad_request",
    "bad_request": "bad_request",
    "history_mismatch": "bad_request",
}


def api_error(e: NpcchatError) -> ApiError:
    """The HTTP face of a user error."""
    if isinstance(e, BusyError):
        retry = str(max(1, round(e.retry_after)))
        return ApiError(503, "busy", e.message, {"Retry-After": retry})
    if isinstance(e, NotFound):
        return ApiError(404, "not_found", e.message)
    if isinstance(e, PromptError):
        return ApiError(422, "bad_prompt", e.message)
    if isinstance(e, TurnCancelled):
        return ApiError(499, "cancelled", e.message)
    if isinstance(e, SessionError):
        return ApiError(409, "session_unreadable", e.message)
    if isinstance(e, HistoryMismatch):
        return ApiError(409, "history_mismatch", e.message, param="messages")
    if isinstance(e, ReloadRefused):
        return ApiError(409, "reload_refused", e.message)
    if isinstance(e, ConfigError):
        return ApiError(400, "bad_request", e.message)
    return ApiError(500, "server_error", e.message)
