"""A Ray cluster address, checked before Ray sees it. No ray import here.

Ray retries a head it cannot talk to for minutes, or for ever, and meanwhile neither Ctrl-C
nor SIGTERM ends the process; the user needs one line now. So every address, from
``--ray-address`` or from ``$RAY_ADDRESS``, goes through :func:`probe`: its form (ASCII
digits only in the port: ``isdigit()`` takes Arabic-Indic ones), a TCP connection, and then
whether the port speaks HTTP/2 at all, as every Ray entry point does (the GCS port and the
Ray Client port are gRPC servers): a port that accepts TCP but is a web server, a database
or nothing that answers is refused here instead of hanging ``ray.init``.
"""

from __future__ import annotations

import os
import re
import socket

from npcchat.errors import ConfigError

PROBE_TIMEOUT_S = 10.0
MAX_ADDRESS = 300  # characters; a DNS name has at most 253
_PORT = re.compile(r"[0-9]{1,5}")
# the client's connection preface and an empty SETTINGS frame (RFC 9113, section 3.4)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x04


def from_environment(address: str | None) -> tuple[str | None, str]:
    """The address to join and where it came from: the flag, else ``$RAY_ADDRESS`` (which
    ``ray.init`` would read by itself, unchecked), else None (a Ray runtime on this machine)."""
    if address:
        return address, "--ray-address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env else (None, "--ray-address")


def parse(address: str, source: str = "--ray-address") -> tuple[str, int]:
    """``HOST:PORT`` or ``ray://HOST:PORT`` (an IPv6 host in brackets) -> (host, port)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        len(address) > MAX_ADDRESS
        or not host
        or not _PORT.fullmatch(port)
        or not 0 < int(port) < 65536
    ):
        raise ConfigError(
            f"{source} {address[:80]!r}: expected HOST:PORT or ray://HOST:PORT",
            hint="the head node's GCS port (6379) or Ray Client port (10001)",
        )
    return host, int(port)


def probe(address: str, source: str = "--ray-address", timeout: float = PROBE_TIMEOUT_S) -> None:
    """A well-formed address whose port accepts a TCP connection and answers HTTP/2,
    else a one-line ConfigError (within about ``timeout`` seconds)."""
    host, port = parse(address, source)
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except (OSError, UnicodeError) as e:  # UnicodeError: a host name IDNA cannot encode
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise ConfigError(
            f"{source} {address}: cannot connect ({reason})",
            hint="is the Ray head running there (ray start --head) and reachable from here?",
        ) from None
    with conn:
        try:
            conn.settimeout(timeout)
            conn.sendall(_PREFACE)
            answer = _read(conn, 9)
        except TimeoutError:
            answer = None
        except OSError:
            answer = b""
    if answer is None or len(answer) < 9 or answer[3] != _SETTINGS:
        said = "no answer" if answer is None else "an answer that is not HTTP/2"
        raise ConfigError(
            f"{source} {address}: not a Ray head ({said} within {timeout:g} s; Ray's GCS "
            "and Ray Client ports speak gRPC)",
            hint="give the head node's GCS port (6379) or Ray Client port (ray://HOST:10001)",
        )


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
