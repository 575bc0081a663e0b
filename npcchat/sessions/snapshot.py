"""KV snapshot files beside session files: resume a conversation without re-reading its prompt.

``FILE.kv`` holds llama.cpp's state of one sequence (see ``Engine.kv_state``) plus a header:
format, bundle identity, context size, the tokens the state covers and a sha256 of the
payload. This module is the file format only; the engine takes the state out of llama.cpp
and puts it back. Restoring only declares those tokens cached; the next turn's prefix reuse
decides what is still valid, so a snapshot from another prompt is harmless (cold prefill)
and one from another bundle is not even loaded. A corrupt or unreadable snapshot is a
warning, never an error. Snapshots are optional and bounded in size by config.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat.files.atomic import atomic_write

MAGIC = b"NPCKV\x01"
FORMAT = 2  # 2: one checksum over tokens and payload, the owning session, the engine identity


@dataclass(frozen=True)
class KvState:
    """One sequence's KV cache: the tokens it holds and llama.cpp's bytes for them.
    ``bundle_id`` is the engine's identity: the bundle and any runtime LoRA and scale."""

    bundle_id: str
    n_ctx: int
    tokens: tuple[int, ...]
    payload: bytes


def _digest(tokens: list[int] | tuple[int, ...], owner: str, payload: bytes) -> str:
    """One checksum over what must belong together: a token list spliced onto another
    session's cache, or another session's file under this name, fails it."""
    h = hashlib.sha256(json.dumps([list(tokens), owner]).encode())
    h.update(payload)
    return h.hexdigest()


def path_for(session_path: Path) -> Path:
    return session_path.with_name(session_path.name + ".kv")


def save(session_path: Path, state: KvState, max_mb: int, owner: str = "") -> str | None:
    """Write the snapshot; returns a warning instead of raising when it cannot."""
    target = path_for(session_path)
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
        "sha256": _digest(state.tokens, owner, payload),
        "size": len(payload),
    }
    blob = json.dumps(header).encode()
    try:
        atomic_write(target, MAGIC + struct.pack("<I", len(blob)) + blob + payload)
    except Exception as e:
        return f"{target}: KV snapshot not saved ({e})"
    return None


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise ValueError("not an npcchat KV snapshot")
    (n,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(raw[start : start + n])
    payload = raw[start + n :]
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("unknown snapshot format")
    tokens, owner = header.get("tokens"), header.get("owner")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise ValueError("bad token list")
    if not isinstance(owner, str) or not isinstance(header.get("bundle_id"), str):
        raise ValueError("header without its owner or bundle")
    digest = _digest(tokens, owner, payload)
    if len(payload) != header.get("size") or digest != header.get("sha256"):
        raise ValueError("checksum mismatch (truncated, damaged or spliced)")
    return header, payload


def load(
    session_path: Path, bundle_id: str, n_ctx: int, owner: str = ""
) -> tuple[KvState | None, str | None]:
    """(state, warning). Silently skips snapshots of another bundle, LoRA or context size:
    a cold prefill is the right answer there. One of another session is a warning."""
    target = path_for(session_path)
    if not target.is_file():
        return None, None
    try:
        header, payload = _read(target)
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
