"""The OpenAI chat-completions protocol, as llama-server, Ollama and LM Studio speak it, so
that a game client or a mod written for it talks to an NPC unchanged: ``POST
/v1/chat/completions`` (streamed or not) and ``GET /v1/models``. One route group, one file.

How the protocol maps onto npcchat (docs/game/openai.md says the same for users):

* ``model`` names the NPC (its id or a unique prefix); ``GET /v1/models`` lists them.
* ``user`` (or the ``X-Npcchat-Player`` header) names the player: the turn continues
  that player's session with the NPC, saved as every served turn. The earlier messages
  of such a call must be the session's last turns (user = the player's line, assistant =
  the NPC's reply, compared after Unicode NFC and surrounding space), or absent: a client
  that sends only the new line and one that resends the whole chat both work, and one
  whose chat differs from the session gets 409 ``history_mismatch`` instead of an NPC
  that silently remembers something else.
* Without a player the call is stateless: the earlier messages become the context (as
  ``/api/predict_main`` does), the NPC starts from its file's state, nothing is stored.
* The last message is the player's line (role ``user``). ``system``/``developer``
  messages are ignored: the NPC file is the persona, and the prompt is the bundle's own.
* ``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``, ``seed`` and
  ``stop`` are honoured, and ``top_k`` (llama-server's extension); ``n`` must be 1. Every
  other field (penalties, ``logit_bias``, ``logprobs``, ``tools``, ``response_format``...)
  is accepted and ignored.
* Besides the standard fields, the answer carries ``npc``: deltas, flags (probability,
  threshold, fired, blocked), actions with their parameters, the new state. A stream
  carries it in its last chunk, which has an empty delta and the finish reason, so a
  client that ignores it still works.
* Errors are OpenAI's error object (``message``, ``type``, ``param``, ``code``); a
  request that breaks the schema is a 400 (``invalid_request``), as OpenAI answers, and so
  is a schema-valid one npcchat cannot serve: ``bad_messages`` (the last message is not
  the player's line, or it is empty or over ``--max-text``), ``unsupported`` (tool
  messages, non-text content) and ``context_length_exceeded`` (the prompt does not fit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from npcchat.conversation import Conversation
from npcchat.errors import BusyError, NpcchatError, PromptError
from npcchat.mind import npc as npc_mod
from npcchat.serve import contract, errors
from npcchat.serve import schemas as S
from npcchat.serve.errors import ApiError, HistoryMismatch, NotFound, api_error
from npcchat.serve.metrics import Metrics
from npcchat.serve.store import SessionStore
from npcchat.serve.streaming import run_streamed
from npcchat.sessions.session import Session
from npcchat.text import nfc
from npcchat.types import ContextTurn, SamplingParams, Turn, flags_json

log = logging.getLogger("npcchat.serve")

ENDPOINT = "chat"  # the metrics label of these turns
PLAYER_HEADER = "X-Npcchat-Player"
MAX_MESSAGES = 512
MAX_STOPS = 4
MAX_STOP = 64  # characters of one stop text


# -- requests ----------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """A part of a message's content; only ``{"type": "text", "text": ...}`` is read."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Annotated[str, StringConstraints(max_length=64)]
    text: Annotated[str, StringConstraints(max_length=S.MAX_TEXT * 16)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: (
        Annotated[str, StringConstraints(max_length=S.MAX_TEXT * 16)]
        | Annotated[list[ContentPart], Field(max_length=64)]
        | None
    ) = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class NpcOverrides(S.Strict):
    """npcchat's own request field: the game's tags and player state for this turn (as
    ``/v1/turn`` takes them), kept in the session."""

    tags: S.TagsIn | None = None
    player_state: S.PlayerStateIn | None = None


StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP)]


class ChatIn(BaseModel):
    """An OpenAI chat-completions request. Fields not listed here are accepted and
    ignored (see the module's description of what is honoured)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="The NPC: its id or a unique prefix of it (GET /v1/models lists them)."
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    user: S.Id | None = Field(
        default=None,
        description="The player: the turn continues this player's session with the NPC "
        f"(or send the {PLAYER_HEADER} header). Absent: a stateless turn.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    max_tokens: Annotated[int, Field(strict=False, ge=1, le=1 << 20)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=False, ge=1, le=1 << 20)] | None = None
    seed: Annotated[int, Field(strict=False)] | None = Field(
        default=None, description="Any integer; the sampler uses it modulo 2^31."
    )
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    top_k: Annotated[int, Field(strict=False, ge=0, le=1 << 20)] | None = Field(
        default=None,
        description="Not OpenAI's (llama-server's extension): draw from the k most likely "
        "tokens (0: all; default: the server's).",
    )
    n: Annotated[int, Field(strict=False, ge=1, le=1)] | None = Field(
        default=None, description="Only 1 (one reply per turn)."
    )
    npc: NpcOverrides | None = None

    _ints = field_validator(
        "max_tokens", "max_completion_tokens", "seed", "n", "top_k", mode="before"
    )(S._no_text_or_bool)


# -- answers -----------------------------------------------------------------------------------
class FlagOut(BaseModel):
    prob: float
    threshold: float
    fired: bool
    blocked: str | None = None  # the NPC rule's condition that kept it from firing


class PlayerStateOut(BaseModel):
    items: list[str]
    actions: list[str]
    position: str


class NpcOut(BaseModel):
    """What the turn did to the game's state, beside the reply."""

    npc_id: str
    player_id: str | None  # None: a stateless call
    turn: int | None  # the session's number of turns after this one (None: stateless)
    deltas: S.Delta
    flags: dict[str, FlagOut]
    fired: list[str]
    actions: list[S.ActionOut]
    state: dict[str, Any]  # the NPC's tags after the turn
    player_state: PlayerStateOut
    npc_items: list[str]
    rules: S.RulesOut | None = None
    stop_reason: str
    bundle_id: str


class MessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChoiceOut(BaseModel):
    index: int = 0
    message: MessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChoiceOut]
    usage: UsageOut
    npc: NpcOut


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "npcchat"
    name: str  # the NPC's name


class ModelsOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


# One Server-Sent Event of a streamed completion: a chunk (``chat.completion.chunk``), an
# error object, or the ``[DONE]`` that ends the stream.
SSE_CHUNK: dict[str, Any] = {
    "type": "string",
    "description": "`data: {chat.completion.chunk}` lines: the first with the role, then "
    "content deltas, then one with an empty delta, the finish reason and `npc`; with "
    "stream_options.include_usage a chunk with `usage` and no choices; then `data: [DONE]`. "
    "A failure after the start is one `data: {error}` line.",
}


# -- the routes --------------------------------------------------------------------------------
def mount(
    app: FastAPI,
    store: SessionStore,
    metrics: Metrics,
    guarded: list[Any],
    auth: tuple[int, ...],
    max_text: int = S.MAX_TEXT,
) -> None:
    started_at = int(time.time())

    def model_of(npc: npc_mod.NpcDef) -> ModelOut:
        created = started_at
        if npc.source:
            with contextlib.suppress(OSError):
                created = int(Path(npc.source).stat().st_mtime)
        return ModelOut(id=npc.id, created=created, name=npc.name or npc.id)

    def resolve(model: str) -> npc_mod.NpcDef:
        try:
            return store.npc(model)
        except NotFound as e:
            raise ApiError(404, "model_not_found", e.message, param="model") from None

    @app.get(
        "/v1/models",
        response_model=ModelsOut,
        dependencies=guarded,
        responses=contract.errors(*auth),
        summary="The NPCs, as OpenAI clients list models",
    )
    async def models() -> ModelsOut:
        served = dict(store.npcs)  # a copy: the file watcher may add one meanwhile
        return ModelsOut(data=[model_of(n) for n in served.values()])

    @app.get(
        "/v1/models/{model}",
        response_model=ModelOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 400, 404),
        summary="One NPC, as OpenAI clients retrieve a model",
    )
    async def model(model: S.IdPath) -> ModelOut:
        return model_of(resolve(model))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatOut,
        dependencies=guarded,
        responses={
            200: {"content": {"text/event-stream": {"schema": SSE_CHUNK}}},
            **contract.errors(*auth, 400, 404, 409, 413, 503),
        },
        summary="OpenAI-compatible chat completion: the NPC's reply and its state change",
    )
    async def chat_completions(
        body: ChatIn,
        request: Request,
        player_header: Annotated[
            S.Id | None,
            Header(
                alias=PLAYER_HEADER,
                description="The player, when the body has no `user`.",
            ),
        ] = None,
    ) -> Any:
        """See the module documentation: ``model`` is the NPC, ``user`` the player (and so
        the session), the last message the player's line. The answer is OpenAI's, plus
        ``npc``: the deltas, flags, actions and state the turn produced."""
        npc = resolve(body.model)
        player = body.user or player_header
        text, earlier = _split(body.messages)
        if len(text) > max_text:
            raise ApiError(
                400,
                "bad_messages",
                f"messages: the player's line is over {max_text} characters",
                param="messages",
            )
        call = _Call(store, npc, player, text, earlier, body)
        if body.stream:
            if store.runtime.occupancy.full:  # refused before the 200 of a stream is sent
                busy = BusyError("all slots are busy and the waiting line is full")
                metrics.failed(ENDPOINT, busy)
                raise busy
            if player is not None and earlier:  # a chat that differs: 409, not a 200
                await run_in_threadpool(call.precheck)
            return StreamingResponse(
                _stream(call, request, metrics, body), media_type="text/event-stream"
            )
        started = time.perf_counter()
        try:
            result = await run_in_threadpool(call.run, None, None)
        except NpcchatError as e:
            metrics.failed(ENDPOINT, e)
            if isinstance(e, PromptError):  # OpenAI's name and status for it
                raise ApiError(
                    400, "context_length_exceeded", e.message, param="messages"
                ) from None
            raise
        metrics.done(ENDPOINT, result.turn, started)
        return _completion(result, body.model)


def _split(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The player's line (the last message) and the earlier (role, text) pairs."""
    lines: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            continue  # the NPC file is the persona
        if m.role not in ("user", "assistant"):
            raise ApiError(
                400,
                "unsupported",
                f"messages[{i}]: role {m.role!r} is not supported (npcchat NPCs do not call "
                "tools); send user and assistant messages",
                param=f"messages[{i}].role",
            )
        lines.append((m.role, _text(m, i)))
    if messages[-1].role != "user":  # then ``lines`` ends with it
        raise ApiError(
            400,
            "bad_messages",
            "messages: the last message must be the player's line (role 'user')",
            param="messages",
        )
    text = lines[-1][1]
    if not text.strip():
        raise ApiError(
            400, "bad_messages", "messages: the player's line is empty", param="messages"
        )
    return text, lines[:-1]


def _text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                "unsupported",
                f"messages[{i}].content[{j}]: only text parts are supported, not {part.type!r}",
                param=f"messages[{i}].content",
            )
        parts.append(part.text)
    return "".join(parts)


class _Result:
    """A finished turn and the session it started from (taken under the session's lock,
    so a concurrent request's change never shows in this answer)."""

    def __init__(self, turn: Turn, before: Session, conv: Conversation, player: str | None) -> None:
        self.turn = turn
        self.player = player
        self.count = len(before.history) + 1
        rules = turn.rules
        state = before.player_state
        self.player_state = replace(state, items=rules.player_items) if rules else state
        self.npc_items = rules.npc_items if rules else before.npc_items
        self.npc_id = before.npc_id
        self.bundle_id = conv.engine.bundle.identity


class _Call:
    """One completion's turn, in a worker thread: on the player's session, or stateless."""

    def __init__(
        self,
        store: SessionStore,
        npc: npc_mod.NpcDef,
        player: str | None,
        text: str,
        earlier: list[tuple[str, str]],
        body: ChatIn,
    ) -> None:
        self.store, self.npc, self.player, self.text = store, npc, player, text
        self.earlier, self.body = earlier, body
        overrides = body.npc
        self.update = S.overrides(overrides.tags, overrides.player_state) if overrides else None

    def sampling(self, base: SamplingParams) -> SamplingParams:
        b = self.body
        s = base
        if b.temperature is not None:
            s = replace(s, temperature=b.temperature)
        if b.top_k is not None:
            s = replace(s, top_k=b.top_k)
        if b.top_p is not None:  # 0 keeps only the most likely token: greedy
            s = replace(s, top_p=b.top_p) if b.top_p > 0 else replace(s, temperature=0.0)
        asked = b.max_completion_tokens or b.max_tokens
        if asked is not None:
            s = replace(s, max_tokens=self.store.reply_room(asked))
        stop = (b.stop,) if isinstance(b.stop, str) else tuple(b.stop or ())
        seed = None if b.seed is None else b.seed % 2**31
        return replace(s, seed=seed if seed is not None else base.seed, stop=stop)

    def check(self, session: Session) -> Session:
        """The earlier messages against the session's turns (raises HistoryMismatch)."""
        said: list[tuple[str, str]] = []
        for t in session.history:
            said += [("user", t.player), ("assistant", t.reply)]
        given = self.earlier
        if len(given) > len(said):
            raise HistoryMismatch(
                f"messages: {len(given)} earlier messages, but the session of player "
                f"{self.player!r} with {self.npc.id!r} holds {len(said)} (its turns' lines "
                "and replies)",
                hint="send only the new line, or the session's turns as GET "
                f"/v1/sessions/{self.player}/{self.npc.id} shows them; omit `user` for a "
                "stateless call",
            )
        tail = said[len(said) - len(given) :]
        for k, ((role, text), (want_role, want)) in enumerate(zip(given, tail, strict=True)):
            if role != want_role or _same(text) != _same(want):
                turn = (len(said) - len(given) + k) // 2 + 1
                part = "line" if want_role == "user" else "reply"
                raise HistoryMismatch(
                    f"messages: earlier message {k + 1} ({role}) is not the session's turn "
                    f"{turn} {part} ({want[:60]!r})",
                    hint="send only the new line, or the session's turns as they are; omit "
                    "`user` for a stateless call",
                )
        return session

    def precheck(self) -> None:
        assert self.player is not None
        with self.store.lease(self.player, self.npc.id) as conv, conv.lock:
            self.check(conv.session)

    def run(self, on_text: Callable[[str], None] | None, cancel: threading.Event | None) -> _Result:
        if self.player is not None:
            with self.store.lease(self.player, self.npc.id) as conv:
                update = self.update
                started: list[Session] = []

                def checked(session: Session) -> Session:
                    session = self.check(session)  # under the session's lock, with the turn
                    session = update(session) if update is not None else session
                    started.append(session)
                    return session

                sampling = self.sampling(conv.sampling)
                turn = conv.say(self.text, on_text, sampling, update=checked, cancel=cancel)
                return _Result(turn, started[-1], conv, self.player)
        with self.store.using() as rt:  # a reload closes this runtime only after the turn
            conv = rt.open(self.npc, on_warning=_ignore)
            conv.context = tuple(
                ContextTurn("player" if role == "user" else "npc", text)
                for role, text in self.earlier
            )
            sampling = self.sampling(conv.sampling)
            if sampling.seed is None:  # the config's seed, else the session's fresh one
                sampling = replace(sampling, seed=conv.session.seed)
            before = self.update(conv.session) if self.update else conv.session
            turn = conv.say(self.text, on_text, sampling, update=self.update, cancel=cancel)
            return _Result(turn, before, conv, None)


def _same(text: str) -> str:
    return nfc(text).strip()


def _ignore(message: str) -> None:
    """Warnings of a stateless conversation (flags the bundle lacks) were said at start."""


def _finish_reason(turn: Turn) -> Literal["stop", "length"]:
    return "length" if turn.stop_reason == "length" else "stop"


def _npc(result: _Result) -> NpcOut:
    turn = result.turn
    flags = flags_json(turn.heads.flags)
    rules = turn.rules.to_json() if turn.rules is not None else None
    return NpcOut(
        npc_id=turn.npc_id or result.npc_id,
        player_id=result.player,
        turn=result.count if result.player is not None else None,
        deltas=S.Delta(**S.deltas_of(turn)),
        flags={n: FlagOut.model_validate(f) for n, f in flags.items()},
        fired=list(turn.fired),
        actions=[S.ActionOut.model_validate(a.to_json()) for a in turn.actions],
        state=dict(vars(turn.tags_after)),
        player_state=PlayerStateOut(
            items=list(result.player_state.items),
            actions=list(result.player_state.actions),
            position=result.player_state.position,
        ),
        npc_items=list(result.npc_items),
        rules=S.RulesOut.model_validate(rules) if rules is not None else None,
        stop_reason=turn.stop_reason,
        bundle_id=result.bundle_id,
    )


def _usage(turn: Turn) -> UsageOut:
    return UsageOut(
        prompt_tokens=turn.prompt_tokens,
        completion_tokens=turn.generated_tokens,
        total_tokens=turn.prompt_tokens + turn.generated_tokens,
    )


def _completion(result: _Result, model: str) -> ChatOut:
    turn = result.turn
    return ChatOut(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=turn.npc_id or model,
        system_fingerprint=result.bundle_id,
        choices=[
            ChoiceOut(message=MessageOut(content=turn.reply), finish_reason=_finish_reason(turn))
        ],
        usage=_usage(turn),
        npc=_npc(result),
    )


async def _stream(
    call: _Call, request: Request, metrics: Metrics, body: ChatIn
) -> AsyncIterator[str]:
    started = time.perf_counter()
    ident = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = call.npc.id

    def chunk(choices: list[dict[str, Any]], **more: Any) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **more,
        }
        return _data(data)

    def delta(content: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    yield chunk(delta({"role": "assistant", "content": ""}))
    async for item in run_streamed(request, call.run, metrics.abandoned(ENDPOINT)):
        if isinstance(item, str):
            yield chunk(delta({"content": item}))
        elif item.result is not None:
            result = item.result
            turn = result.turn
            metrics.done(ENDPOINT, turn, started)
            npc = _npc(result).model_dump()
            yield chunk(
                delta({}, _finish_reason(turn)),
                system_fingerprint=result.bundle_id,
                npc=npc,
            )
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage=_usage(turn).model_dump())
            yield "data: [DONE]\n\n"
        else:
            error = item.error
            assert error is not None
            metrics.failed(ENDPOINT, error)
            if isinstance(error, PromptError):
                body_ = errors.body(400, "context_length_exceeded", error.message, "messages")
                yield _data(body_)
            elif isinstance(error, NpcchatError):
                err = api_error(error)
                yield _data(errors.body(err.status, err.code, err.message, err.param))
            else:
                log.error("npcchat serve: a streamed completion failed", exc_info=error)
                yield _data(errors.body(500, "server_error", "internal error (see the server log)"))


def _data(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
