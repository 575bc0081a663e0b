"""A turn streamed to an HTTP client, for every streamed route (``/v1/turn`` with
``"stream": true``, ``/v1/chat/completions`` with ``"stream": true``): the turn runs in a
worker thread, its reply pieces come back through a queue, and a client that goes away
cancels the turn (nothing of it is committed), which uvicorn would not tell us otherwise.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

T = TypeVar("T")

Work = Callable[[Callable[[str], None], threading.Event], T]
DISCONNECT_CHECK_S = 0.25  # how soon a client that went away cancels its turn


@dataclass(frozen=True)
class Finished(Generic[T]):
    """The end of a streamed turn: its result, or the exception it raised."""

    result: T | None = None
    error: BaseException | None = None


async def run_streamed(
    request: Request,
    work: Work[T],
    abandoned: Callable[[asyncio.Future[Any]], None],
) -> AsyncIterator[str | Finished[T]]:
    """Reply pieces of ``work(on_text, cancel)`` as they come, then one :class:`Finished`.
    When the client disconnects the iterator ends, the turn is cancelled and
    ``abandoned`` gets its future once it stops (to count it)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    cancel = threading.Event()

    def on_text(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job = asyncio.ensure_future(run_in_threadpool(work, on_text, cancel))
    job.add_done_callback(lambda _: pieces.put_nowait(None))
    checked = loop.time()
    try:
        ended = False
        while not ended:
            try:
                piece = await asyncio.wait_for(pieces.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                piece = ""  # nothing new: look at the connection all the same
            # what arrived meanwhile goes out as one event: a busy server sends fewer,
            # larger events instead of falling behind its own tokens
            batch = [piece]
            while piece is not None and not pieces.empty():
                piece = pieces.get_nowait()
                batch.append(piece)
            ended = batch[-1] is None
            text = "".join(p for p in batch if p)
            # uvicorn drops what is sent to a gone client without an error: ask, at most
            # every DISCONNECT_CHECK_S (asking costs a receive on every token otherwise)
            now = loop.time()
            if not ended and (now - checked >= DISCONNECT_CHECK_S or not text):
                checked = now
                if await request.is_disconnected():
                    return
            if text:
                yield text
        try:
            result = job.result()
        except Exception as e:
            yield Finished(error=e)
            return
        yield Finished(result=result)
    finally:
        if not job.done():  # the client went away: the turn is cancelled, not committed
            cancel.set()
            job.add_done_callback(abandoned)
