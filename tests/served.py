"""A real ``npcchat serve`` for tests: uvicorn on a loopback port over the demo bundle (or
another), started by the ``serve`` fixture and stopped at the test's end. Shared by the
serve, OpenAI-protocol and docs tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import npcchat
from npcchat.serve.app import Settings, create_app
from npcchat.serve.store import SessionStore, npc_registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    runtime: npcchat.Runtime
    sessions: Path

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def _config(temperature: float = 0.7) -> npcchat.Config:
    cfg = npcchat.load_config()
    return replace(cfg, sampling=replace(cfg.sampling, temperature=temperature, max_tokens=32))


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start servers on the demo bundle (or another) for one test; all stop at its end."""
    started: list[tuple[uvicorn.Server, threading.Thread, SessionStore]] = []

    def start(
        *,
        slots: int = 4,
        waiting: int = 8,
        bundle: Path | None = None,
        npcs: Path | None = None,
        config: npcchat.Config | None = None,
        **settings: Any,
    ) -> Server:
        rt = npcchat.load(bundle, config=config or _config(), slots=slots)
        root = tmp_path / f"sessions{len(started)}"
        store = SessionStore(rt, npc_registry(npcs, bundle is None), root)
        rt.start_batching(waiting)
        app = create_app(rt, store, Settings(**settings), npcs_dir=npcs)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        started.append((server, thread, store))
        return Server(f"http://127.0.0.1:{port}", rt, root)

    yield start
    for server, thread, store in started:
        server.should_exit = True
        thread.join(10)
        store.runtime.close()  # the one serving now (a reload closed the first)
