"""KV snapshot files beside session files: resume a conversation without re-reading its prompt.

``FILE.kv`` holds llama.cpp's state of one sequence (see ``Engine.kv_state``) plus a header:
format, bundle identity, context size, the tokens the state covers, the owning session and
an HMAC over all of it with the installation's secret (:mod:`npcchat.sessions.signing`):
whoever can write ``.kv`` files but not read that secret cannot forge one (another NPC's
cache spliced under this session's tokens would otherwise be adopted by prefix reuse and
change the replies). This module is the file format only; the engine takes the state out
of llama.cpp and puts it back. Restoring only declares those tokens cached; the next turn's
prefix reuse decides what is still valid, so a snapshot from another prompt is harmless
(cold prefill) and one from another bundle is not even loaded. A corrupt, unreadable or
unsigned snapshot is a warning, never an error. Snapshots are optional and bounded in
size by config.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat.files.atomic import atomic_write
from npcchat.sessions import signing

MAGIC = b"NPCKV\x01"
FORMAT = 3  # 3: an HMAC with the installation's key (2: an unkeyed sha256)
MAX_HEADER = 16 << 20  # bytes of the JSON header: a token list of a large context


@dataclass(frozen=True)
class KvState:
    """One sequence's KV cache: the tokens it holds and llama.cpp's bytes for them.
    ``bundle_id`` is the engine's identity: the bundle and any runtime LoRA and scale."""

    bundle_id: str
    n_ctx: int
    tokens: tuple[int, ...]
    payload: bytes


def _signed(
    bundle_id: str, n_ctx: int, tokens: list[int] | tuple[int, ...], owner: str, payload: bytes
) -> tuple[bytes, bytes]:
    """What one MAC covers, all that must belong together: a token list spliced onto
    another session's cache, another session's file under this name, or a file from
    another installation fails it."""
    return json.dumps([FORMAT, bundle_id, n_ctx, list(tokens), owner]).encode(), payload


_warned: set[Path] = set()  # key files already warned about: once per process, not per turn


def _key() -> tuple[bytes | None, str | None]:
    try:
        return signing.installation_key(), None
    except signing.KeyUnavailable as e:
        if signing.key_path() in _warned:
            return None, None
        _warned.add(signing.key_path())
        return None, f"{e}; KV snapshots are off, turns read their prompts in full"


def path_for(session_path: Path) -> Path:
    return session_path.with_name(session_path.name + ".kv")


def save(
    session_path: Path, state: KvState, max_mb: int, owner: str = "", key: bytes | None = None
) -> str | None:
    """Write the snapshot; returns a warning instead of raising when it cannot. ``key``:
    the signing key (default: this installation's)."""
    target = path_for(session_path)
    if key is None:
        key, warning = _key()
        if key is None:
            return warning
    payload = state.payload
    if len(payload) > max_mb * 1024 * 1024:
        target.unlink(missing_ok=True)
        size = len(payload) / 1e6
        return f"KV snapshot of {size:.0f} MB exceeds snapshot_max_mb={max_mb}; not saved"
    header = {
        "format": FORMAT,
        "bundle_id": state.bundle_id,
        "n_ctx": state.n_ctx,
        "tokens": list(state.tokens),
        "owner": owner,
        "hmac": signing.sign(
            key, *_signed(state.bundle_id, state.n_ctx, state.tokens, owner, payload)
        ),
        "size": len(payload),
    }
    blob = json.dumps(header).encode()
    try:
        atomic_write(target, MAGIC + struct.pack("<I", len(blob)) + blob + payload)
    except Exception as e:
        return f"{target}: KV snapshot not saved ({e})"
    return None


def _read(path: Path, key: bytes) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise ValueError("not an npcchat KV snapshot")
    (n,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(raw):
        raise ValueError("header size out of bounds")
    header = json.loads(raw[start : start + n])
    payload = raw[start + n :]
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("unknown snapshot format (written by another npcchat version)")
    tokens, owner = header.get("tokens"), header.get("owner")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise ValueError("bad token list")
    bundle_id, n_ctx = header.get("bundle_id"), header.get("n_ctx")
    if not isinstance(owner, str) or not isinstance(bundle_id, str) or type(n_ctx) is not int:
        raise ValueError("header without its owner, bundle or context size")
    if len(payload) != header.get("size"):
        raise ValueError("truncated or damaged")
    if not signing.verify(
        key, header.get("hmac"), *_signed(bundle_id, n_ctx, tokens, owner, payload)
    ):
        raise ValueError(
            "not signed by this installation: forged, spliced, damaged or written under "
            "another NPCCHAT_HOME"
        )
    return header, payload


def load(
    session_path: Path, bundle_id: str, n_ctx: int, owner: str = "", key: bytes | None = None
) -> tuple[KvState | None, str | None]:
    """(state, warning). Silently skips snapshots of another bundle, LoRA or context size:
    a cold prefill is the right answer there. One of another session, or one this
    installation did not sign, is a warning. ``key``: as for :func:`save`."""
    target = path_for(session_path)
    if not target.is_file():
        return None, None
    if key is None:
        key, warning = _key()
        if key is None:
            return None, warning
    try:
        header, payload = _read(target, key)
    except (OSError, ValueError) as e:
        return (
            None,
            f"{target}: ignoring the KV snapshot ({e}); the next turn reads the prompt in full",
        )
    if header["bundle_id"] != bundle_id or header.get("n_ctx") != n_ctx:
        return None, None
    if header["owner"] != owner:
        return None, f"{target}: ignoring a KV snapshot of another session"
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not tokens or len(tokens) > n_ctx:
        return None, f"{target}: ignoring the KV snapshot (bad token list)"
    return KvState(bundle_id, n_ctx, tuple(tokens), payload), None
