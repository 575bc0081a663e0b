"""The routes of ``npcchat serve`` over the public API (:class:`npcchat.Runtime`).

Every answer of a turn is sent only after the session file holding that turn is on disk
(the conversation saves it with fsync before ``say`` returns). Every error is a JSON body
``{"error": {"code", "message"}}`` with its status; a traceback never leaves the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from npcchat import __version__
from npcchat.api import Runtime, sampling_of
from npcchat.errors import (
    BusyError,
    NpcchatError,
    PromptError,
)
from npcchat.runtime import served_format
from npcchat.serve import contract, designer, docs, errors, events, openai_compat, playground
from npcchat.serve import schemas as S
from npcchat.serve.errors import ApiError, api_error
from npcchat.serve.metrics import CONTENT_TYPE, Metrics
from npcchat.serve.reload import Reloader, watch_npcs
from npcchat.serve.store import SessionStore
from npcchat.serve.streaming import run_streamed
from npcchat.sessions.session import Session
from npcchat.types import Turn

log = logging.getLogger("npcchat.serve")


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None  # Bearer token every route but /healthz requires
    max_body: int = 256 * 1024  # bytes of one request body
    max_text: int = S.MAX_TEXT  # characters of one player line


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, before the body is parsed (pure
    ASGI, so nothing reads a huge body into memory first). A declared Content-Length is
    judged at once; a chunked body (no length) is read here, up to the limit and no
    further, then handed on whole: counting it while the route parses it instead would let
    the framework turn the refusal into its own 400."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnects, as the server sends them

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body over {self.max_bytes} bytes"
        await errors.response(413, "too_large", message)(scope, receive, send)


def create_app(
    runtime: Runtime,
    store: SessionStore,
    settings: Settings,
    npcs_dir: Path | None = None,
) -> FastAPI:
    """The server's routes. ``runtime`` should be batching (``start_batching``); it is the
    store's until a reload swaps it (every route reads ``store.runtime``). ``npcs_dir``:
    NPC files watched for changes (None: none)."""
    reloader = Reloader(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # each turn waits in a worker thread: room for every turn the scheduler may hold
        load = store.runtime.occupancy
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, 2 * (load.slots + load.max_waiting) + 16)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(  # SIGHUP: reload the bundle from where it is
                signal.SIGHUP, lambda: loop.create_task(reload_in_background(None))
            )
        watcher = asyncio.ensure_future(watch_npcs(store, npcs_dir)) if npcs_dir else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher

    async def reload_in_background(bundle: Path | None) -> None:
        try:
            await run_in_threadpool(reloader.reload, bundle)
        except NpcchatError as e:
            log.warning("npcchat serve: reload refused: %s", e.message)

    app = FastAPI(
        title="npcchat",
        version=__version__,
        description="NPC replies and game-state changes from one llama.cpp prefill.",
        lifespan=lifespan,
        docs_url=None,  # served from the package below: the default page needs a CDN
        redoc_url=None,
    )
    docs.mount(app)
    playground.mount(app)
    metrics = Metrics(lambda: store.runtime.occupancy)
    bearer = HTTPBearer(auto_error=False)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body)

    async def authorized(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(
                401, "unauthorized", "missing or wrong API key", {"WWW-Authenticate": "Bearer"}
            )

    # no key: no security in the contract either (a client generated from it must not
    # demand a token this server never checks)
    guarded = [Depends(authorized)] if settings.api_key is not None else []
    auth = (401,) if settings.api_key is not None else ()
    contract.install(app, settings.max_text)
    designer.mount(app, store, guarded, auth)
    events.mount(app, store, guarded, auth)
    openai_compat.mount(app, store, metrics, guarded, auth, settings.max_text)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, e: ApiError) -> Response:
        return errors.response(e.status, e.code, e.message, e.headers, e.param)

    @app.exception_handler(NpcchatError)
    async def _on_user_error(request: Request, e: NpcchatError) -> Response:
        err = api_error(e)
        return errors.response(err.status, err.code, err.message, err.headers, err.param)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc)
        if _openai(request):  # OpenAI answers a request that breaks the schema with 400
            param = ".".join(loc[1:]) if loc[:1] == ["body"] else ".".join(loc) or None
            message = f"{where}: {first.get('msg')}"
            return errors.response(400, "invalid_request", message, param=param)
        if where == "body.prompt" and first.get("type") == "string_pattern_mismatch":
            try:  # the line at fault, not the whole pattern
                served_format.parse(str(first.get("input", "")))
            except PromptError as bad:
                return errors.response(422, "bad_prompt", bad.message)
            message = "not in the served format (see the schema's description)"
            return errors.response(422, "bad_prompt", f"prompt: {message}")
        return errors.response(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, e: HTTPException) -> Response:
        headers = getattr(e, "headers", None)
        if e.status_code == 400:  # FastAPI's answer to a body that is not JSON text at all
            status = 400 if _openai(request) else 422
            return errors.response(
                status, "invalid_request", "body: not valid JSON (UTF-8 text expected)"
            )
        if e.status_code == 405:  # every method of the path, not only the first route's
            headers = {"Allow": contract.allowed_methods(app, dict(request.scope))}
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return errors.response(e.status_code, code, str(e.detail), headers)

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, e: Exception) -> Response:
        log.exception("npcchat serve: %s %s failed", request.method, request.url.path)
        return errors.response(500, "server_error", "internal error (see the server log)")

    # -- the game's turn ------------------------------------------------------------------
    def turn_job(
        body: S.TurnIn, on_text: Callable[[str], None] | None, cancel: threading.Event | None
    ) -> tuple[Turn, int, str]:
        with store.lease(body.player_id, body.npc_id) as conv:
            sampling = conv.sampling
            if body.max_tokens is not None:
                sampling = replace(sampling, max_tokens=store.reply_room(body.max_tokens))
            sampling = replace(sampling, seed=body.seed)
            if body.top_k is not None:
                sampling = replace(sampling, top_k=body.top_k)
            turn = conv.say(
                body.text,
                on_text,
                sampling,
                update=S.overrides(body.tags, body.player_state),
                cancel=cancel,
            )
            return turn, len(conv.session.history), conv.engine.bundle.identity

    def check(body: S.TurnIn) -> None:
        if len(body.text) > settings.max_text:
            raise ApiError(
                422, "invalid_request", f"body.text: at most {settings.max_text} characters"
            )
        store.npc(body.npc_id)  # 404 before any work

    @app.post(
        "/v1/turn",
        response_model=S.TurnOut,
        dependencies=guarded,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": contract.SSE_EVENT}},
                "links": contract.turn_links(),
            },
            **contract.errors(*auth, 404, 409, 413, 422, 503),
        },
        summary="A player's line to an NPC: its reply and the state change",
    )
    async def turn(body: S.TurnIn, request: Request) -> Any:
        """The original AI server's contract. With ``"stream": true`` the answer is
        Server-Sent Events: ``text`` events with reply pieces, then one ``turn`` event with
        this same JSON (or an ``error`` event). A client that disconnects cancels its turn."""
        check(body)
        if body.stream:
            if store.runtime.occupancy.full:  # refused before the 200 of a stream is sent
                busy = BusyError("all slots are busy and the waiting line is full")
                metrics.failed("turn", busy)
                raise busy
            return StreamingResponse(stream_turn(body, request), media_type="text/event-stream")
        started = time.perf_counter()
        try:
            result, count, bundle_id = await run_in_threadpool(turn_job, body, None, None)
        except NpcchatError as e:
            metrics.failed("turn", e)
            raise
        metrics.done("turn", result, started)
        return _turn_out(result, body, count, bundle_id)

    async def stream_turn(body: S.TurnIn, request: Request) -> AsyncIterator[str]:
        started = time.perf_counter()

        def work(on_text: Callable[[str], None], cancel: threading.Event) -> tuple[Turn, int, str]:
            return turn_job(body, on_text, cancel)

        async for item in run_streamed(request, work, metrics.abandoned("turn")):
            if isinstance(item, str):
                yield _sse("text", {"text": item})
            elif item.result is not None:
                result, count, bundle_id = item.result
                metrics.done("turn", result, started)
                yield _sse("turn", _turn_out(result, body, count, bundle_id).model_dump())
            else:
                assert item.error is not None
                metrics.failed("turn", item.error)
                yield _sse("error", _stream_error(item.error))

    # -- the original model server --------------------------------------------------------
    @app.post(
        "/api/predict_main",
        response_model=S.PredictOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 413, 422, 503),
        summary="The original model server: a prompt in the served format, run as it says",
    )
    async def predict_main(body: S.PredictIn) -> S.PredictOut:
        """``prompt`` is parsed into its fields and rendered again through the bundle's own
        template: the player's line stays plain text. Nothing is stored."""
        started = time.perf_counter()
        inp = served_format.parse(body.prompt)
        if inp.npc_id != body.npc_id:
            raise ApiError(
                422,
                "bad_prompt",
                f"npc_id {body.npc_id!r} differs from the prompt's NPC_ID {inp.npc_id!r}",
            )
        session = Session(
            npc_id=inp.npc_id,
            tags=inp.tags,
            player_state=inp.player_state,
            lore=inp.lore,
            description=inp.description,
        )
        cfg = store.runtime.config
        seed = cfg.sampling.seed if cfg.sampling.seed >= 0 else None
        sampling = replace(sampling_of(cfg, seed), max_tokens=store.reply_room(body.max_tokens))

        def run() -> Turn:
            with store.using() as rt:  # a reload closes this runtime only after the turn
                return rt.turn(
                    session, inp.player_utterance, context=inp.context, sampling=sampling
                )

        try:
            result = await run_in_threadpool(run)
        except NpcchatError as e:
            metrics.failed("predict_main", e)
            raise
        metrics.done("predict_main", result, started)
        flags = result.heads.flags
        return S.PredictOut(
            session_id=body.session_id,
            npc_id=body.npc_id,
            npc_response=result.reply,
            deltas=S.Delta(**S.deltas_of(result)),
            flags={n: f.prob for n, f in flags.items()},
            thresholds={n: f.threshold for n, f in flags.items()},
        )

    # -- sessions, NPCs, health, metrics --------------------------------------------------
    @app.get(
        "/v1/sessions/{player_id}/{npc_id}",
        response_model=S.SessionOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 404, 409, 422),
    )
    async def get_session(player_id: S.IdPath, npc_id: S.IdPath) -> dict[str, Any]:
        """The session file's content: state, player state, memories, every turn."""

        return await run_in_threadpool(store.session_after, player_id, npc_id)

    @app.post(
        "/v1/sessions/{player_id}/{npc_id}/reset",
        response_model=S.SessionOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 404, 409, 422),
    )
    async def reset_session(player_id: S.IdPath, npc_id: S.IdPath) -> dict[str, Any]:
        """Back to the NPC's initial state: no history, no memories (saved)."""

        return await run_in_threadpool(store.reset, player_id, npc_id)

    @app.delete(
        "/v1/sessions/{player_id}/{npc_id}",
        status_code=204,
        dependencies=guarded,
        responses=contract.errors(*auth, 404, 422),
    )
    async def delete_session(player_id: S.IdPath, npc_id: S.IdPath) -> Response:
        """Remove the session (a file that cannot be read as a session is moved aside as
        ``*.corrupt-<time>`` beside it, so it never needs shell access to clear)."""
        moved = await run_in_threadpool(store.delete, player_id, npc_id)
        if moved is not None:
            log.warning("npcchat serve: unreadable session moved aside as %s", moved)
        return Response(status_code=204)

    @app.get(
        "/v1/npcs",
        response_model=list[S.NpcOut],
        dependencies=guarded,
        responses=contract.errors(*auth),
    )
    async def npcs() -> list[S.NpcOut]:
        return [
            S.NpcOut(
                id=n.id,
                name=n.name,
                location=n.tags.location,
                lore_entries=len(n.knowledge.lore),
                triggers=len(n.knowledge.triggers),
            )
            for n in store.npcs.values()
        ]

    @app.get("/healthz", response_model=S.Health)
    async def healthz() -> S.Health:
        rt = store.runtime
        load = rt.occupancy
        return S.Health(
            status="ok",
            bundle=rt.bundle.name,
            bundle_id=rt.bundle.identity,
            slots=load.slots,
            running=load.running,
            waiting=load.waiting,
            npc_errors=dict(store.npc_errors),
        )

    @app.post(
        "/v1/admin/reload",
        response_model=S.ReloadOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 409, 413, 422),
        summary="Load a new or changed bundle next to the running one and switch to it",
    )
    async def reload(body: S.ReloadIn | None = None) -> S.ReloadOut:
        """The bundle (``bundle``: its directory; default: the one served, re-read) is
        checked and loaded next to the running one; new turns start on it, turns already
        running finish on the old one, which is then closed. A bundle that does not load
        is refused with one line and the old one keeps serving (409). SIGHUP does the
        same with the served directory."""
        target = Path(body.bundle) if body is not None and body.bundle else None
        return await run_in_threadpool(reloader.reload, target)

    @app.get(
        "/metrics",
        dependencies=guarded,
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition format (version 0.0.4)",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **contract.errors(*auth, beside_text=True),
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.metrics = metrics
    return app


def _turn_out(turn: Turn, body: S.TurnIn, count: int, bundle_id: str = "") -> S.TurnOut:
    flags = turn.heads.flags
    rules = turn.rules.to_json() if turn.rules is not None else None
    return S.TurnOut(
        text=turn.reply,
        delta=S.Delta(**S.deltas_of(turn)),
        flags={n: f.fired for n, f in flags.items()},
        actions=[S.ActionOut.model_validate(a.to_json()) for a in turn.actions],
        meta=S.TurnMeta(
            npc_id=turn.npc_id or body.npc_id,
            player_id=body.player_id,
            bundle_id=bundle_id,
            turn=count,
            flags={
                n: S.FlagMeta(prob=f.prob, threshold=f.threshold, blocked=f.blocked or None)
                for n, f in flags.items()
            },
            rules=S.RulesOut.model_validate(rules) if rules is not None else None,
            state=dict(vars(turn.tags_after)),
            stop_reason=turn.stop_reason,
            tokens={
                "prompt": turn.prompt_tokens,
                "prefill": turn.prefill_tokens,
                "generated": turn.generated_tokens,
            },
            timings_ms=turn.timings.to_ms(),
        ),
    )


def _openai(request: Request) -> bool:
    """A route of the OpenAI-compatible protocol (its clients expect its statuses)."""
    return request.url.path.startswith(("/v1/chat/", "/v1/models"))


def _stream_error(e: BaseException) -> dict[str, Any]:
    """The error event's body of a streamed turn that failed after its 200 was sent."""
    if isinstance(e, NpcchatError):
        err = api_error(e)
        return errors.body(err.status, err.code, err.message, err.param)
    log.error("npcchat serve: a streamed turn failed", exc_info=e)
    return errors.body(500, "server_error", "internal error (see the server log)")


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
