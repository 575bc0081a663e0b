"""Hot reload: a new or changed bundle next to the running one, and NPC files watched.

**Bundles** (``POST /v1/admin/reload``, SIGHUP): the new bundle is loaded and checked
(manifest and checksums, heads, template, scaffold tokens: everything ``npcchat.load``
checks) while the old one keeps serving; only then does the session store switch. New
turns start on the new bundle, turns already running finish on the old one, which is then
closed. Nothing of the old engine is reused (its KV caches die with it; served sessions
keep no snapshots). A bundle that does not load is refused with its one-line error and the
old one serves on. One reload at a time.

**NPC files** (``serve --npcs DIR``): watched with ``watchfiles`` (the file-watching
library uvicorn's reloader uses: inotify on Linux, no polling loop of ours). A changed file
is read again; a valid one replaces the NPC's definition for its next turns, one that no
longer validates keeps its last good version and its error is shown by ``/healthz`` (and
logged) until the file is fixed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from npcchat.errors import ConfigError, NpcchatError
from npcchat.mind import npc as npc_mod
from npcchat.serve import schemas as S
from npcchat.serve.errors import ReloadRefused
from npcchat.serve.store import SessionStore

log = logging.getLogger("npcchat.serve")


class Reloader:
    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self._one = threading.Lock()

    def reload(self, bundle: Path | None) -> S.ReloadOut:
        import npcchat

        if not self._one.acquire(blocking=False):
            raise ReloadRefused("a reload is already in progress; try again when it is done")
        try:
            started = time.perf_counter()
            old = self.store.runtime
            root = bundle or old.bundle.root
            try:
                new = npcchat.load(root, config=old.config, slots=old.slots)
            except (NpcchatError, OSError) as e:
                why = e.message if isinstance(e, NpcchatError) else (e.strerror or str(e))
                raise ReloadRefused(
                    f"reload refused, {old.bundle.name} keeps serving: {why}"[:1000]
                ) from None
            new.start_batching(old.occupancy.max_waiting)
            retired = self.store.swap(new)
            retired.stop_batching()  # no request uses it any more: nothing waits
            retired.close()
            took = time.perf_counter() - started
            log.warning(
                "npcchat serve: now serving %s (%s), was %s, after %.1f s",
                new.bundle.name,
                new.bundle.identity,
                old.bundle.identity,
                took,
            )
            return S.ReloadOut(
                bundle=new.bundle.name,
                bundle_id=new.bundle.identity,
                previous_id=old.bundle.identity,
                seconds=took,
            )
        finally:
            self._one.release()


def refresh(store: SessionStore, path: Path) -> None:
    """Read one changed NPC file again (deleted: its NPC stays as last loaded)."""
    key = str(path)
    if not path.is_file():
        return
    try:
        npc = npc_mod.load(path)
        if npc.id in store.npcs and store.npcs[npc.id].source not in ("", key):
            raise ConfigError(f"{path}: key 'id': {npc.id!r} is served from another file")
    except NpcchatError as e:
        store.npc_errors[key] = e.message
        log.warning("npcchat serve: %s (its last good version is served)", e.message)
        return
    store.npc_errors.pop(key, None)
    store.replace_npc(npc)
    log.warning("npcchat serve: reloaded %s", path)


async def watch_npcs(store: SessionStore, directory: Path) -> None:
    """Follow ``directory``'s NPC files until cancelled."""
    from watchfiles import awatch

    async for changes in awatch(directory, recursive=False):
        for _, name in sorted(changes):
            path = Path(name)
            if path.suffix == ".toml":
                refresh(store, path)
