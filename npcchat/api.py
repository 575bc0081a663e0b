"""The public Python API, re-exported by :mod:`npcchat`.

Load a bundle once, open conversations on it, run scenarios through it::

    import npcchat

    with npcchat.load() as rt:                       # the demo bundle, or load("path/to/bundle")
        with rt.open("village_blacksmith", session="borin.toml") as chat:
            turn = chat.say("Hello, smith.")
            print(turn.reply, turn.deltas, turn.fired)
            for piece in (stream := chat.stream("Can you mend my sword?")):
                print(piece, end="", flush=True)
            print(stream.turn.to_json())             # the line `npcchat talk --json` prints

Threads: a :class:`Runtime` and its conversations may be used from any thread.

* Each conversation does one thing at a time: its turns (and undo, set, save...) never
  interleave, and its session changes in whole turns.
* The runtime owns one llama.cpp context. By default every call that decodes (a turn, a
  stream, a predecode, :meth:`Runtime.evaluate`) takes the runtime's lock: turns of
  different conversations run one after the other.
* After :meth:`Runtime.start_batching` (load with ``slots=N``), turns of different
  conversations run side by side, up to N at once in one batched decode per step, and a
  new turn joins while others generate; more than ``max_waiting`` waiting turns are
  refused with :class:`npcchat.errors.BusyError`. ``npcchat serve`` is this mode.

Two runtimes share nothing (two contexts, two copies of the weights).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from npcchat import demo
from npcchat.config import Config
from npcchat.config import load as load_config
from npcchat.conversation import Conversation, EngineAccess, new_session
from npcchat.errors import ConfigError
from npcchat.eval.scenarios import Scenario
from npcchat.eval.similarity import Similarity
from npcchat.mind import npc as npc_mod
from npcchat.mind.mind import NpcMind, knowledge_of
from npcchat.runtime import bundle as bundle_mod
from npcchat.runtime.batch import Driver, TurnRequest
from npcchat.runtime.bundle import Bundle
from npcchat.runtime.engine import Engine
from npcchat.runtime.scheduler import Load, Scheduler
from npcchat.sessions import session as session_mod
from npcchat.sessions.session import Session
from npcchat.types import ContextTurn, SamplingParams, Tags, Turn

log = logging.getLogger("npcchat")

NpcSpec = str | Path | npc_mod.NpcDef | None


def sampling_of(cfg: Config, seed: int | None = None) -> SamplingParams:
    """The sampling settings of a config (``seed``: None draws per session or turn)."""
    s = cfg.sampling
    return SamplingParams(
        s.temperature, s.top_p, s.repeat_penalty, s.max_tokens, seed, top_k=s.top_k
    )


class Runtime:
    """A bundle loaded once: the GGUF in llama.cpp, the ONNX heads, the prompt template and
    the settings. Open any number of conversations on it; :meth:`close` frees the model.

    Thread-safe as described in :mod:`npcchat.api`.
    """

    def __init__(self, engine: Engine, config: Config) -> None:
        self._engine = engine
        self.config = config
        self._access = EngineAccess(engine, threading.Lock())

    @property
    def bundle(self) -> Bundle:
        """The bundle's manifest: name, identity, flags (head order), quantization."""
        return self._engine.bundle

    @property
    def flags(self) -> tuple[str, ...]:
        return self._engine.bundle.flags

    @property
    def has_heads(self) -> bool:
        """False for a model-only bundle: replies, but no state changes."""
        return self._engine.heads is not None

    @property
    def slots(self) -> int:
        """Sequences of the llama.cpp context (``load(..., slots=N)``): turns at once."""
        return self._engine.model.n_seq

    @property
    def batching(self) -> bool:
        return self._access.scheduler is not None

    @property
    def occupancy(self) -> Load:
        """Turns running and waiting (all zero unless batching)."""
        scheduler = self._access.scheduler
        return scheduler.load if scheduler else Load(self.slots, 0, 0)

    def start_batching(self, max_waiting: int | None = None) -> None:
        """From now on turns of different conversations run side by side in the
        :attr:`slots` (continuous batching); beyond them at most ``max_waiting`` turns wait
        (default: as many as there are slots) and more are refused with BusyError. KV
        snapshots and idle-time predecode are off meanwhile (a slot is not a session's)."""
        if self._access.scheduler is None:
            waiting = self.slots if max_waiting is None else max_waiting
            self._access.scheduler = Scheduler(self._engine, self._access.lock, waiting)

    def stop_batching(self) -> None:
        """Let the running turns finish; then turns take the runtime's lock again."""
        scheduler, self._access.scheduler = self._access.scheduler, None
        if scheduler is not None:
            scheduler.close()

    def open(
        self,
        npc: NpcSpec = None,
        session: str | Path | None = None,
        *,
        seed: int | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> Conversation:
        """A conversation with an NPC.

        ``npc``: an NPC file, a demo NPC's id (or unique prefix), an ``NpcDef``, or None
        (the demo bundle's first NPC; a bare NPC on other bundles). ``session``: a session
        file (``.toml``/``.json``) that is resumed when it exists (its NPC wins over
        ``npc``), else created; saved after every turn. ``seed``: sampling seed of the
        session (default: the config's, else a fresh one). Warnings (a session made with
        another bundle, a damaged KV snapshot) go to ``on_warning``, else to the
        ``npcchat`` logger.
        """
        warn = on_warning or log.warning
        path = Path(session) if session is not None else None
        cfg, engine = self.config, self._engine
        if seed is None and cfg.sampling.seed >= 0:
            seed = cfg.sampling.seed
        version: session_mod.Stamp | None = None
        if path is not None and path.exists():
            sess, version = session_mod.load_stamped(path)
            same = isinstance(npc, npc_mod.NpcDef) and npc.id == sess.npc_id
            if npc is not None and not same:
                warn(f"resuming {path}; the NPC given ({npc}) is ignored")
            if sess.bundle_id and sess.bundle_id != engine.bundle.identity:
                warn(
                    f"{path} was made with bundle {sess.bundle_name} ({sess.bundle_id}), "
                    f"now {engine.bundle.identity}"
                )
            if seed is not None:
                sess = replace(sess, seed=seed)
            # an NpcDef of the session's own NPC (a server's current version of the file)
            # wins over reading the file again
            know = npc.knowledge if same and isinstance(npc, npc_mod.NpcDef) else knowledge_of(sess)
        else:
            npc_def = self._npc(npc)
            for warning in npc_mod.flag_warnings(npc_def, engine.bundle.flags):
                warn(warning)
            sess = new_session(npc_def, engine, seed if seed is not None else _fresh_seed())
            know = npc_def.knowledge
            if path is not None:
                version = session_mod.save(sess, path)
        mind = NpcMind(engine, know, cfg.knowledge)
        conv = Conversation(
            engine,
            sess,
            sampling_of(cfg),
            path,
            on_warning=warn,
            mind=mind,
            access=self._access,
            stamp=version,
        )
        if path is not None and sess.history:
            conv.restored_snapshot = conv.resume_snapshot()
        return conv

    def _npc(self, spec: NpcSpec) -> npc_mod.NpcDef:
        if isinstance(spec, npc_mod.NpcDef):
            return spec
        if spec is None:
            if demo.is_demo_bundle(self.bundle.root):
                return npc_mod.load(demo.root() / "npcs" / f"{demo.DEFAULT_NPC}.toml")
            return npc_mod.NpcDef(id="npc", name="npc", tags=Tags())
        path = Path(spec)
        if path.is_file():
            return npc_mod.load(path)
        if path.suffix == ".toml" or "/" in str(spec):
            raise ConfigError(f"NPC file {spec}: not found")
        return npc_mod.load(demo.find_npc(str(spec)))

    def evaluate(
        self,
        scenarios: Sequence[Scenario],
        *,
        sampling: SamplingParams | None = None,
        similarity: Similarity | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        share_prefix: bool = True,
        npcs: Mapping[str, npc_mod.NpcDef] | None = None,
    ) -> list[dict[str, Any]]:
        """Run scenarios (from :func:`npcchat.read_scenarios`) up to :attr:`slots` at a
        time; returns one result per scenario in completion order (``on_result`` gets each
        as it finishes). Default sampling: the config's, greedy, seed 0. Results equal a
        one-slot run bit for bit (see npcchat.eval.runner). A scenario's NPC file (its
        ``npc_file``, else ``npcs[npc_id]``) applies exactly as in a conversation."""
        from npcchat.eval import runner

        params = sampling or replace(sampling_of(self.config, 0), temperature=0.0)
        results: list[dict[str, Any]] = []

        def done(result: dict[str, Any]) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        sim = similarity or Similarity()
        scheduler = self._access.scheduler
        if scheduler is None:
            with self._access.lock:
                runner.run(self._engine, list(scenarios), params, sim, done, share_prefix, npcs)
            return results
        futures = [
            scheduler.submit(driver, queue=False)
            for driver in runner.drivers(
                self._engine, list(scenarios), params, sim, share_prefix, npcs
            )
        ]
        for future in as_completed(futures):
            done(future.result())
        return results

    def turn(
        self,
        session: Session,
        text: str,
        *,
        context: Sequence[ContextTurn] = (),
        sampling: SamplingParams | None = None,
    ) -> Turn:
        """One stateless turn on a session value (nothing is saved, no NPC file applies):
        what a caller that keeps its own history needs (``/api/predict_main``).
        ``context``: history lines placed before the session's own."""
        params = sampling or sampling_of(self.config, session.seed)
        scheduler = self._access.scheduler
        if scheduler is not None:
            future = scheduler.submit(_one_turn(session, text, tuple(context), params))
            turn: Turn = future.result()
            return turn
        with self._access.lock:
            return self._engine.turn(session, text, params, context=tuple(context))

    def close(self) -> None:
        """Free the model and context (native memory). Conversations on it end with it."""
        self.stop_batching()
        with self._access.lock:
            self._engine.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_turn(
    session: Session, text: str, context: tuple[ContextTurn, ...], sampling: SamplingParams
) -> Driver[Turn]:
    turn = yield TurnRequest(session, text, sampling, context=context)
    return turn


def _fresh_seed() -> int:
    return random.randrange(2**31)


def load(
    bundle: str | Path | None = None,
    *,
    config: Config | str | Path | None = None,
    slots: int = 1,
) -> Runtime:
    """Load a bundle once (None: ``$NPCCHAT_BUNDLE``, else the demo bundle).

    ``config``: a :class:`Config`, a config TOML, or None (``$NPCCHAT_HOME/config.toml``
    over the defaults). ``slots``: sequences of the llama.cpp context, i.e. how many
    scenarios :meth:`Runtime.evaluate` runs side by side.
    """
    if slots < 1:
        raise ConfigError(f"slots {slots}: expected at least 1")
    cfg = config if isinstance(config, Config) else load_config(_path(config))
    root = Path(bundle) if bundle is not None else demo.default_bundle()
    engine = Engine.load(bundle_mod.load(root), cfg, n_seq=slots)
    return Runtime(engine, cfg)


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


def info() -> dict[str, Any]:
    """Versions and build features: npcchat, llama.cpp (CPU features, GPU backends, threads),
    onnxruntime (providers), the installed extras and the demo bundle's path."""
    from npcchat import __version__, extras
    from npcchat.runtime import backend, heads

    demo_bundle = demo.bundle_dir()
    return {
        "npcchat": __version__,
        "llama_cpp": backend.build_info(),
        "onnxruntime": heads.runtime_info(),
        "extras": {name: not extras.missing(name) for name in extras.EXTRAS},
        "demo_bundle": str(demo_bundle) if demo_bundle else None,
    }
