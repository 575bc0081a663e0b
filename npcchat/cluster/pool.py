"""Work over Ray actors: each actor a :class:`~npcchat.cluster.worker.Worker` (the bundle
loaded once), fed small chunks from one queue, its results streamed back one by one.

Why a queue of small chunks rather than one shard per actor: scenarios differ in length
(one turn or ten), so fixed shards finish at different times and the run waits for the
slowest; with chunks an idle actor takes the next one. Each chunk holds a few times an
actor's ``slots`` scenarios, so its batch stays full. Results stream back as each scenario
finishes (Ray generators), which feeds the progress bar and keeps everything finished when
an actor dies or the user presses Ctrl-C.

An actor that dies (its process killed, its node lost) is replaced by a new one and the
scenarios of its chunk that had not come back are queued again; every death is recorded
(:attr:`Pool.deaths`) for the report. Results do not depend on which actor ran a scenario
or beside which others (eval's aligned KV reuse), so the gathered report equals a local one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from npcchat.config import Config
from npcchat.errors import ConfigError, NpcchatError
from npcchat.eval.scenarios import Scenario

from .address import from_environment, probe
from .worker import Worker, WorkerSpec

T = TypeVar("T")
START_TIMEOUT_S = 300.0  # a worker loads a multi-GB model: minutes, not hours
CONNECT_TIMEOUT_S = 20.0  # joining a running cluster: seconds, or something is wrong
MAX_REPLACEMENTS = 8  # actors started to replace dead ones, per pool


class _Actor:
    """The Ray-side shell of a :class:`Worker`: a failed start is kept as a value (message
    and hint), not raised from ``__init__``, so the driver gets the worker's own one-line
    error instead of Ray's wrapped traceback."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker: Worker | None = None
        self.error: tuple[str, str | None] | None = None
        try:
            self.worker = Worker(spec)
        except NpcchatError as e:
            self.error = (e.message, e.hint)

    def ready(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error[0], "hint": self.error[1]}
        assert self.worker is not None
        return self.worker.describe()

    def evaluate(self, chunk: list[Scenario]) -> Any:
        assert self.worker is not None
        position = {sc.id: i for i, sc in enumerate(chunk)}
        for result in self.worker.evaluate(chunk):
            yield position[result["id"]], result

    def states(self, chunk: list[Scenario]) -> Any:
        assert self.worker is not None
        # not `yield from enumerate(...)`: Ray drives the generator with send(), which an
        # enumerate object lacks
        for i, row in enumerate(self.worker.states(chunk)):  # noqa: UP028
            yield i, row


@dataclass
class Death:
    """An actor that died while it ran a chunk; its unfinished scenarios ran elsewhere."""

    actor: int
    node: str
    error: str
    rerun: int  # scenarios of its chunk that had not come back


@dataclass
class _Running:
    actor: int
    chunk: list[int]  # indices into the items
    back: set[int] = field(default_factory=set)  # positions in the chunk already returned


def connect(address: str | None, deadline_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Join the cluster at ``address`` (None: ``$RAY_ADDRESS``, else a Ray runtime on this
    machine, started for the run), unless this process already joined one. True when this
    call joined (the caller then leaves with ``ray.shutdown``).

    Every address is probed first (:mod:`npcchat.cluster.address`), the environment's too.
    Joining a cluster then runs ``ray.init`` in a helper thread: it has ``deadline_s`` to
    finish, and this thread keeps waiting in Python, where Ctrl-C and SIGTERM reach it
    (inside ``ray.init`` they do not: Ray retries a head it cannot talk to for ever). A
    runtime started here is started by this thread (see below)."""
    if ray.is_initialized():
        return False
    address, source = from_environment(address)
    if address and address != "auto":
        probe(address, source)
    if not address:
        # A Ray runtime started here belongs to the thread that starts it: Ray's processes
        # die with their parent *thread* (PR_SET_PDEATHSIG), so a helper thread that ends
        # after ray.init would take the cluster with it. Starting is local and quick.
        ray.init(
            logging_level=logging.ERROR,
            log_to_driver=False,
            include_dashboard=False,
        )
        return True
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            ray.init(
                address=address,
                logging_level=logging.ERROR,  # not the thread warning about SIGTERM
                log_to_driver=False,  # llama.cpp's load messages from every worker
                include_dashboard=False,
            )
            outcome.append(None)
        except BaseException as e:  # handed to the waiting thread
            outcome.append(e)

    worker = threading.Thread(target=join, name="npcchat-ray-init", daemon=True)
    worker.start()
    worker.join(deadline_s)  # joining a cluster must be quick
    if not outcome:
        raise ConfigError(
            f"{source} {address}: Ray did not connect within {deadline_s:g} s",
            hint="is that the head node's GCS port (6379) or Ray Client port (ray://HOST:10001), "
            "and does its Ray version match this one?",
        )
    error = outcome[0]
    if isinstance(error, ConnectionError | RuntimeError | ValueError):
        raise ConfigError(
            f"{source} {address or ''}: cannot reach a Ray cluster ({error})".replace("  ", " "),
            hint="give the head node's address (ray://HOST:10001 or HOST:6379), or "
            "leave it out to start Ray on this machine",
        ) from None
    if error is not None:
        raise error
    return True


class Pool:
    """``actors`` workers of ``threads`` CPUs each (None: as many as the cluster's CPUs
    allow). Closing the pool kills them."""

    def __init__(self, spec: WorkerSpec, actors: int | None, threads: int) -> None:
        self.spec = replace(spec, config=_threads(spec, threads))
        self.threads = threads
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        cpus = int(resources.get("CPU", 0))
        n = actors if actors is not None else max(1, cpus // threads)
        if n * threads > cpus:
            raise ConfigError(
                f"{n} actors of {threads} CPUs need {n * threads} CPUs; the Ray cluster has {cpus}",
                hint="lower --ray-actors or --threads, or add nodes",
            )
        self._remote = ray.remote(num_cpus=threads)(_Actor)
        self.actors: list[Any] = []
        self.workers: list[dict[str, Any]] = []
        self.deaths: list[Death] = []
        self._replaced = 0
        try:
            handles = [self._remote.remote(self.spec) for _ in range(n)]
            self.actors = handles
            self.workers = self._ready(handles)
        except BaseException:
            self.close()
            raise

    def _ready(self, handles: list[Any]) -> list[dict[str, Any]]:
        """Each actor's description once it has loaded the bundle; a worker that cannot
        (no bundle, other weights, other llama.cpp) stops the run with its own message."""
        try:
            found: list[dict[str, Any]] = ray.get(
                [h.ready.remote() for h in handles], timeout=START_TIMEOUT_S
            )
        except GetTimeoutError:
            raise ConfigError(
                f"no Ray worker was ready after {START_TIMEOUT_S:.0f} s",
                hint="check that the cluster has free CPUs and that the bundle path "
                "is readable on every node (ray status)",
            ) from None
        except RayActorError as e:
            raise ConfigError(f"a Ray worker died while it loaded the bundle: {e}") from None
        for info in found:
            if "error" in info:
                raise ConfigError(str(info["error"]), hint=info.get("hint"))
        return found

    def _replace(self, k: int) -> None:
        if self._replaced >= MAX_REPLACEMENTS:
            raise ConfigError(
                f"{len(self.deaths)} Ray actors died; not starting more",
                hint="see the Ray logs of the dead workers (ray logs)",
            )
        self._replaced += 1
        handle = self._remote.remote(self.spec)
        self.actors[k] = handle
        (self.workers[k],) = self._ready([handle])

    def map(
        self,
        method: str,
        items: Sequence[Scenario],
        chunk: int,
        on_item: Callable[[int, Any], None],
    ) -> None:
        """Run ``method`` of the workers over ``items`` in chunks of ``chunk``;
        ``on_item(index, value)`` for each item as it comes back (any order)."""
        queue = deque(
            list(range(i, min(i + chunk, len(items)))) for i in range(0, len(items), chunk)
        )
        running: dict[Any, _Running] = {}

        def submit(k: int) -> None:
            if queue:
                part = queue.popleft()
                call = getattr(self.actors[k], method)
                running[call.remote([items[i] for i in part])] = _Running(k, part)

        for k in range(len(self.actors)):
            submit(k)
        while running:
            ready: list[Any] = ray.wait(list(running), num_returns=1, timeout=0.5)[0]
            for gen in ready:
                run = running[gen]
                try:
                    position, value = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    submit(run.actor)
                    continue
                except RayTaskError as e:  # an npcchat error raised inside a worker
                    if isinstance(e.cause, NpcchatError):
                        raise e.cause from None
                    raise
                except RayActorError as e:
                    del running[gen]
                    lost = [i for p, i in enumerate(run.chunk) if p not in run.back]
                    node = str(self.workers[run.actor].get("node", "?"))
                    self.deaths.append(Death(run.actor, node, _first_line(e), len(lost)))
                    self._replace(run.actor)
                    if lost:
                        queue.appendleft(lost)
                    submit(run.actor)
                    continue
                run.back.add(position)
                on_item(run.chunk[position], value)

    def close(self) -> None:
        for h in self.actors:
            with contextlib.suppress(Exception):  # already dead: nothing to free
                ray.kill(h)
        self.actors = []

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _threads(spec: WorkerSpec, threads: int) -> Config:
    runtime = replace(spec.config.runtime, n_threads=threads)
    return replace(spec.config, runtime=runtime)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def chunk_size(n: int, actors: int, slots: int) -> int:
    """Chunks of a few batches each, but at least two chunks per actor when there is
    enough work, so no actor waits on another's long tail."""
    return max(1, min(4 * slots, -(-n // (2 * actors))))
