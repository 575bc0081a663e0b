"""Model bundles: a directory with ``bundle.toml`` naming the GGUF, the ONNX heads, the flag
names in head order, the prompt template, the hidden size and sha256 checksums.

Loading checks the files and checksums here; the checks that need the model itself
(`<STATE>`/`<NPC>` are single control tokens, heads width == n_embd) run in the engine
once llama.cpp has the model. Any mismatch refuses the bundle with a one-line error.

Hashing a multi-GB GGUF on every start would be slow, so a verified checksum is cached
in the npcchat home keyed by (path, size, mtime); a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat import config
from npcchat.errors import BundleError, where
from npcchat.files.atomic import atomic_write, sha256_file
from npcchat.files.toml import read_toml
from npcchat.runtime.prompt import PromptTemplate

MANIFEST = "bundle.toml"
FORMAT = "npcchat-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Bundle:
    root: Path
    name: str
    gguf: Path
    gguf_sha256: str
    heads: Path | None  # None: a model-only bundle (replies, no state changes) until heads fit
    heads_sha256: str
    flags: tuple[str, ...]
    hidden_size: int
    template: PromptTemplate
    quant: str
    manifest: dict[str, Any]

    @property
    def identity(self) -> str:
        """Short id of exactly these weights, heads and template (stored in sessions)."""
        h = hashlib.sha256()
        for part in (self.gguf_sha256, self.heads_sha256, self.template.sha256):
            h.update(part.encode())
        return h.hexdigest()[:16]


def _cache_path() -> Path:
    return config.home() / "cache" / "checksums.json"


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    # ctime and inode too: `touch -r` can restore a tampered file's mtime, never its ctime
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    cache_file = _cache_path()
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text("utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), "utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a cache we cannot write only costs time
    return digest


def _get(data: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BundleError(f"{where(path, key)}: missing")
        node = node[part]
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        raise BundleError(f"{where(path, key)}: expected {kind.__name__}, got {node!r}")
    return node


def _checked_file(root: Path, manifest: Path, data: dict[str, Any], section: str) -> Path:
    rel = _get(data, f"{section}.file", str, manifest)
    want = _get(data, f"{section}.sha256", str, manifest)
    path = root / str(rel)
    inside = root.resolve()
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(inside):
        raise BundleError(
            f"{where(manifest, f'{section}.file')}: {rel!r} is outside the bundle directory",
            hint="a bundle names its files relative to its own directory",
        )
    if not path.is_file():
        raise BundleError(f"{where(manifest, f'{section}.file')}: {path} does not exist")
    got = _cached_sha256(path)
    if got != want:
        raise BundleError(
            f"{path}: sha256 is {got[:12]}…, the manifest says {want[:12]}…",
            hint="the file changed after the bundle was made; rebuild it with npcchat convert",
        )
    return path


def load(root: Path) -> Bundle:
    """Read and verify a bundle directory (or a path to its bundle.toml)."""
    try:
        if root.is_file() and root.name == MANIFEST:
            root = root.parent
        root.exists()
    except OSError as e:  # a name too long for the file system, a loop of links
        shown = str(root) if len(str(root)) <= 200 else str(root)[:200] + "..."
        raise BundleError(f"{shown}: cannot read ({e.strerror or e})") from None
    manifest = root / MANIFEST
    if not root.exists():
        raise BundleError(
            f"{root}: no such directory",
            hint="--bundle (or NPCCHAT_BUNDLE) names a bundle directory made by "
            "`npcchat convert`; leave it out to run the bundled demo",
        )
    if not root.is_dir():
        raise BundleError(
            f"{root}: not a directory (a bundle is a directory with a {MANIFEST})",
            hint="leave --bundle out to run the bundled demo",
        )
    if not manifest.is_file():
        raise BundleError(
            f"{root}: not a model bundle (no {MANIFEST})",
            hint="make one with `npcchat convert`, or pass --bundle DIR",
        )
    data = read_toml(manifest)
    fmt = data.get("format")
    if fmt != FORMAT:
        raise BundleError(f"{where(manifest, 'format')}: expected '{FORMAT}', got {fmt!r}")
    version = _get(data, "format_version", int, manifest)
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where(manifest, 'format_version')}: bundle format {version} is newer than this "
            f"npcchat reads ({FORMAT_VERSION})",
            hint="upgrade npcchat",
        )
    gguf = _checked_file(root, manifest, data, "model")
    tpl_path = _checked_file(root, manifest, data, "prompt")
    heads, flags = None, []
    if "heads" in data:
        heads = _checked_file(root, manifest, data, "heads")
        flags = _get(data, "heads.flags", list, manifest)
        if not flags or not all(isinstance(f, str) and f for f in flags):
            raise BundleError(f"{where(manifest, 'heads.flags')}: expected a list of flag names")
        if len(set(flags)) != len(flags):
            raise BundleError(f"{where(manifest, 'heads.flags')}: flag names repeat")
    hidden = _get(data, "model.hidden_size", int, manifest)
    template = PromptTemplate(
        name=str(data["prompt"].get("name", tpl_path.stem)), source=tpl_path.read_text("utf-8")
    )
    return Bundle(
        root=root,
        name=str(data.get("name", root.name)),
        gguf=gguf,
        gguf_sha256=_get(data, "model.sha256", str, manifest),
        heads=heads,
        heads_sha256=_get(data, "heads.sha256", str, manifest) if heads else "",
        flags=tuple(flags),
        hidden_size=hidden,
        template=template,
        quant=str(data["model"].get("quant", "unknown")),
        manifest=data,
    )


def write_manifest(
    root: Path,
    *,
    name: str,
    gguf: str,
    heads: str | None,
    template: PromptTemplate,
    flags: list[str],
    hidden_size: int,
    quant: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the template file and ``bundle.toml`` for files already in ``root``."""
    import tomli_w

    tpl_file = root / "prompt.jinja"
    atomic_write(tpl_file, template.source.encode("utf-8"))
    data: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": {
            "file": gguf,
            "sha256": sha256_file(root / gguf),
            "hidden_size": hidden_size,
            "quant": quant,
        },
        "prompt": {"name": template.name, "file": tpl_file.name, "sha256": template.sha256},
    }
    if heads is not None:
        data["heads"] = {"file": heads, "sha256": sha256_file(root / heads), "flags": list(flags)}
    data.update(extra or {})
    out = root / MANIFEST
    atomic_write(out, tomli_w.dumps(data).encode("utf-8"))
    return out
