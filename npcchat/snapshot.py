"""KV snapshots beside session files: resume a conversation without re-reading its prompt.

``FILE.kv`` holds llama.cpp's state of sequence 0 (``llama_state_seq_get_data``) plus a
header: format, bundle identity, context size, the tokens the state covers and a sha256
of the payload. Restoring only declares those tokens cached; the next turn's prefix reuse
decides what is still valid, so a snapshot from another prompt is harmless (cold prefill)
and one from another bundle is not even loaded. A corrupt or unreadable snapshot is a
warning, never an error. Snapshots are optional and bounded in size by config.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from npcchat.engine import Engine
from npcchat.session import atomic_write

MAGIC = b"NPCKV\x01"
FORMAT = 1


def path_for(session_path: Path) -> Path:
    return session_path.with_name(session_path.name + ".kv")


def save(engine: Engine, session_path: Path, max_mb: int, seq: int = 0) -> str | None:
    """Write the snapshot; returns a warning instead of raising when it cannot."""
    from npcchat.backend import Model

    model = engine.model
    tokens = engine.kv_tokens(seq)
    target = path_for(session_path)
    if not isinstance(model, Model) or not tokens:
        return None
    payload = model.state_get(seq)
    if len(payload) > max_mb * 1024 * 1024:
        target.unlink(missing_ok=True)
        return f"KV snapshot of {len(payload) / 1e6:.0f} MB exceeds snapshot_max_mb={max_mb}; not saved"
    header = {"format": FORMAT, "bundle_id": engine.bundle.identity, "n_ctx": model.n_ctx,
              "tokens": tokens, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}  # fmt: skip
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
    if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get(
        "sha256"
    ):
        raise ValueError("checksum mismatch (truncated or damaged)")
    return header, payload


def restore(engine: Engine, session_path: Path, seq: int = 0) -> tuple[bool, str | None]:
    """(restored, warning). Silently skips snapshots of another bundle or context size."""
    from npcchat.backend import Model

    target = path_for(session_path)
    model = engine.model
    if not target.is_file() or not isinstance(model, Model):
        return False, None
    try:
        header, payload = _read(target)
    except (OSError, ValueError) as e:
        return (
            False,
            f"{target}: ignoring the KV snapshot ({e}); the next turn reads the prompt in full",
        )
    if header["bundle_id"] != engine.bundle.identity or header.get("n_ctx") != model.n_ctx:
        return False, None  # another model or context: a cold prefill is the right answer
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not tokens or len(tokens) > model.n_ctx:
        return False, f"{target}: ignoring the KV snapshot (bad token list)"
    if not model.state_set(seq, payload):
        engine.forget(seq)
        model.keep_prefix(0, seq)
        return (
            False,
            f"{target}: llama.cpp refused the KV snapshot; the next turn reads the prompt in full",
        )
    engine.adopt(tokens, seq)
    return True, None
