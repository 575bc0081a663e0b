"""Prometheus metrics of ``npcchat serve`` (``GET /metrics``, the text format).

A registry per server, not the process-global one, so tests and in-process servers do not
share counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from npcchat.errors import NpcchatError
from npcchat.runtime.scheduler import Load
from npcchat.serve.errors import OUTCOMES, api_error
from npcchat.types import Turn

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Metrics:
    def __init__(self, load: Callable[[], Load]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.turn_seconds = Histogram(
            "npcchat_turn_seconds",
            "Time from a turn's request to its answer (queue wait included).",
            ["endpoint"],
            buckets=_SECONDS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "npcchat_time_to_first_token_seconds",
            "Time from a turn's request to its first reply token (waiting, prefill, heads).",
            ["endpoint"],
            buckets=_SECONDS,
            registry=r,
        )
        self.stall_seconds = Histogram(
            "npcchat_reply_stall_seconds",
            "The longest wait between two tokens of a reply (other turns' prompt chunks).",
            ["endpoint"],
            buckets=_SECONDS,
            registry=r,
        )
        self.turns = Counter(
            "npcchat_turns",
            "Turns by outcome: ok, trigger, cancelled, busy, bad_request, error.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.generated = Counter("npcchat_generated_tokens", "Reply tokens generated.", registry=r)
        self.prefill = Counter(
            "npcchat_prefill_tokens", "Prompt tokens decoded (after prefix reuse).", registry=r
        )
        self.decode_rate = Gauge(
            "npcchat_decode_tokens_per_second",
            "Reply tokens per second of the last finished turn's generation.",
            registry=r,
        )
        waiting = Gauge("npcchat_queue_depth", "Turns waiting for a slot.", registry=r)
        waiting.set_function(lambda: load().waiting)
        running = Gauge("npcchat_slots_busy", "Turns generating in a slot.", registry=r)
        running.set_function(lambda: load().running)
        slots = Gauge("npcchat_slots", "Sequence slots of the llama.cpp context.", registry=r)
        slots.set_function(lambda: load().slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- one turn's figures, for every route that runs turns ------------------------------------
    def done(self, endpoint: str, turn: Turn, started: float) -> None:
        """A finished turn: its outcome, time, time to first token and token counts."""
        outcome = "trigger" if turn.stop_reason == "trigger" else "ok"
        self.turns.labels(endpoint, outcome).inc()
        took = time.perf_counter() - started
        self.turn_seconds.labels(endpoint).observe(took)
        # to the first token: waiting, prefill and heads (a first token may hold no text)
        self.ttft_seconds.labels(endpoint).observe(took - turn.timings.generate_ms / 1e3)
        if turn.generated_tokens:
            self.stall_seconds.labels(endpoint).observe(turn.timings.stall_ms / 1e3)
        self.generated.inc(turn.generated_tokens)
        self.prefill.inc(turn.prefill_tokens)
        if turn.timings.generate_ms > 0 and turn.generated_tokens:
            self.decode_rate.set(turn.generated_tokens / (turn.timings.generate_ms / 1e3))

    def failed(self, endpoint: str, e: BaseException) -> None:
        """A failed turn, counted by the class of its HTTP answer."""
        label = "error"
        if isinstance(e, NpcchatError):
            label = OUTCOMES.get(api_error(e).code, "error")
        self.turns.labels(endpoint, label).inc()

    def abandoned(self, endpoint: str) -> Callable[[asyncio.Future[Any]], None]:
        """The outcome of a turn whose client left: cancelled (or finished just before)."""

        def count(task: asyncio.Future[Any]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is None:
                self.turns.labels(endpoint, "ok").inc()
            elif isinstance(error, NpcchatError):
                self.failed(endpoint, error)

        return count
