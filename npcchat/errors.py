"""One error hierarchy for everything a user can get wrong.

Every error carries a one-line message that names the file, line or key at fault and
what was expected, plus an optional hint saying what to do. The CLI prints
``error: <message>`` (and ``hint: <hint>``) and exits 1; tracebacks only with
``NPCCHAT_DEBUG=1``.
"""

from __future__ import annotations


class NpcchatError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(NpcchatError):
    """A config, NPC or scenario file is malformed or holds a wrong value."""


class BundleError(NpcchatError):
    """A model bundle is missing files, fails its checksums or is inconsistent."""


class PromptError(NpcchatError):
    """The prompt cannot be built or does not fit the context window."""


class SessionError(NpcchatError):
    """A session file is corrupt, from a newer npcchat, or cannot be written."""


class BackendError(NpcchatError):
    """llama.cpp failed to load a model or to decode."""


class BusyError(NpcchatError):
    """Every slot is taken and the waiting line is full: try again after ``retry_after``."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, hint="try again shortly, or start the server with more --slots")
        self.retry_after = retry_after


class WriteError(NpcchatError):
    """A file cannot be written (permissions, a full disk); the old file is left intact."""


class ConvertError(NpcchatError):
    """A checkpoint, adapter or head file cannot be converted."""


def where(path: object, key: str | None = None, line: int | None = None) -> str:
    """Format a location prefix such as ``npc.toml: key 'tags.trust'``."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if key is not None:
        out += f": key '{key}'"
    return out
