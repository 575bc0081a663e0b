"""The installation's secret: what proves a file beside a session was written by this
installation (a KV snapshot is the one such file today).

A checksum proves nothing against someone who can write the file: they recompute it. A KV
snapshot is llama.cpp's raw cache, and a cache spliced under another session's tokens is
accepted by prefix reuse and changes the replies and the deltas. So a snapshot carries an
HMAC keyed by a random secret that never leaves ``$NPCCHAT_HOME/secret.key`` (created on
first use, mode 0600): whoever can write snapshots but cannot read that key cannot make one
that verifies. A key that other users can read is no secret: it is refused, and snapshots
are then neither written nor trusted (a warning; a turn simply reads its prompt in full).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

from npcchat.config import home

KEY_FILE = "secret.key"
KEY_BYTES = 32

_cache: dict[Path, bytes] = {}
_guard = threading.Lock()


class KeyUnavailable(Exception):
    """The installation's key cannot be read or created; the message says why."""


def key_path() -> Path:
    return home() / KEY_FILE


def installation_key() -> bytes:
    """The key of this ``NPCCHAT_HOME``, created on first use (several processes starting
    at once agree on one: the file appears whole, by a hard link that only one wins)."""
    path = key_path()
    with _guard:
        cached = _cache.get(path)
        if cached is not None:
            return cached
        try:
            key = _read(path)
        except FileNotFoundError:
            key = _create(path)
        _cache[path] = key
        return key


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyUnavailable(f"{path}: cannot read the installation key ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnavailable(f"{path}: the installation key is not a regular file")
        if st.st_mode & 0o077:
            raise KeyUnavailable(
                f"{path}: the installation key is readable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):o}); delete it to make a new one"
            )
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise KeyUnavailable(
            f"{path}: the installation key is damaged; delete it to make a new one"
        )
    return data


def _create(path: Path) -> bytes:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails when another process made the key first: use theirs
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    except OSError as e:
        raise KeyUnavailable(
            f"{path}: cannot create the installation key ({e.strerror or e})"
        ) from None
    return _read(path)


def sign(key: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 over the parts, each length-prefixed (no two splits give one MAC)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def verify(key: bytes, signature: object, *parts: bytes) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(key, *parts), signature)
