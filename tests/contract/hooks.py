"""Schemathesis hooks for npcchat's contract test (loaded through SCHEMATHESIS_HOOKS).

``/api/predict_main`` takes ``npc_id`` twice: in the body and on the prompt's ``NPC_ID``
line, and refuses a request where they differ (422 bad_prompt). JSON Schema cannot say
that two fields are equal, so generated positive cases would almost never agree; this hook
makes the body's ``npc_id`` the prompt's (only where both are schema-valid strings), which
is what a real client sends, so the success path is exercised instead of the refusal.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

_NPC_ID = re.compile(r"^NPC_ID=([^\n]*)$", re.MULTILINE)


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.operation.path != "/api/predict_main" or not isinstance(case.body, dict):
        return
    prompt, npc_id = case.body.get("prompt"), case.body.get("npc_id")
    if not isinstance(prompt, str) or not isinstance(npc_id, str):
        return
    found = _NPC_ID.search(prompt)
    if found is not None and len(found.group(1)) <= 200:
        case.body["npc_id"] = found.group(1)


_PROMPT_ROUTES = ("/v1/turn", "/api/predict_main")


@schemathesis.check
def only_context_overflow_is_refused(ctx: Any, response: Any, case: Any) -> None:
    """The one 4xx a schema-valid request to a turn route may get: its prompt does not fit
    the model's context (see schemathesis.toml)."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return
    if case.operation.path not in _PROMPT_ROUTES or response.status_code != 422:
        return
    error = (response.json() or {}).get("error", {})
    if error.get("code") != "bad_prompt" or "fit" not in error.get("message", ""):
        raise AssertionError(f"a schema-valid request was refused: {error}")


_CHAT_REFUSALS = {"bad_messages", "unsupported", "context_length_exceeded"}


@schemathesis.check
def only_semantic_refusals(ctx: Any, response: Any, case: Any) -> None:
    """The 400s a schema-valid chat completion may get: what the schema cannot say (see
    schemathesis.toml), never a validation error of a field the schema allows."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return
    if case.operation.path != "/v1/chat/completions" or response.status_code != 400:
        return
    error = (response.json() or {}).get("error", {})
    if error.get("code") not in _CHAT_REFUSALS:
        raise AssertionError(f"a schema-valid chat completion was refused: {error}")
