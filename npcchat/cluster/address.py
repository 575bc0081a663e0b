"""A Ray cluster address, checked before Ray sees it: Ray retries an unreachable head for
minutes, printing warnings, where the user needs one line now. No ray import here."""

from __future__ import annotations

import socket

from npcchat.errors import ConfigError

PROBE_TIMEOUT_S = 10.0
MAX_ADDRESS = 300  # characters; a DNS name has at most 253


def probe(address: str) -> None:
    """``HOST:PORT`` or ``ray://HOST:PORT`` (an IPv6 host in brackets) that accepts a TCP
    connection, else a one-line ConfigError."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if len(address) > MAX_ADDRESS or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--ray-address {address[:80]!r}: expected HOST:PORT or ray://HOST:PORT",
            hint="the head node's GCS port (6379) or Ray Client port (10001)",
        )
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name IDNA cannot encode
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ConfigError(
            f"--ray-address {address}: cannot connect ({reason})",
            hint="is the Ray head running there (ray start --head) and reachable from here?",
        ) from None
