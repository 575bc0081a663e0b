"""The OpenAPI contract tells the truth: schemathesis (a property-based API tester) against a
real ``npcchat serve`` on loopback with the demo bundle, once without an API key and once
with one, every check on, a fixed seed and a bounded number of examples; its stateful
phase follows the links from a turn to the session it created. Any failure it reports
fails the test. What the schema cannot say is in ``tests/contract/`` with its reasons."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]
CONTRACT = Path(__file__).parent / "contract"
SEED = 1
EXAMPLES = 10  # per operation and phase: ~450 requests, ~10 s on two cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(tmp_path: Path, *extra: str) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "config.toml"
    config.write_text("[sampling]\nmax_tokens = 8\n")  # the contract, not the replies
    cmd = [sys.executable, "-m", "npcchat", "serve", "--port", str(port), "--config", str(config)]
    cmd += ["--sessions", str(tmp_path / "sessions"), "--log-level", "error", *extra]
    env = {**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"npcchat serve did not start: {err}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert b"Traceback" not in err, err.decode()  # no server traceback, whatever was sent


@pytest.fixture()
def open_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve(tmp_path)


@pytest.fixture()
def keyed_server(tmp_path: Path) -> Iterator[str]:
    yield from _serve(tmp_path, "--api-key", "s3cret-key")


def _schemathesis(url: str, tmp_path: Path, *extra: str) -> str:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe is not None, "schemathesis is a development dependency (make dev)"
    cmd = [exe, "--config-file", str(CONTRACT / "schemathesis.toml"), "run"]
    cmd += [f"{url}/openapi.json", "--checks", "all", "--seed", str(SEED)]
    cmd += ["--max-examples", str(EXAMPLES), "--workers", "1", "--no-color", *extra]
    # a turn decodes up to max_tokens on a shared 2-core CPU: the default 10 s read timeout
    # failed a run while other work loaded the machine; slowness is not a contract breach
    cmd += ["--request-timeout", "60"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(CONTRACT), os.environ.get("PYTHONPATH")])),
    }
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    generated = re.search(r"(\d+) generated", out)
    took = time.monotonic() - started
    print(f"schemathesis: {generated.group(1) if generated else '?'} requests in {took:.1f} s")
    assert proc.returncode == 0, out
    assert generated is not None and int(generated.group(1)) > 100, out
    assert "Stateful" in out and "API Links" in out, out  # the stateful phase ran
    return out


def test_schemathesis_finds_nothing_without_a_key(open_server: str, tmp_path: Path) -> None:
    _schemathesis(open_server, tmp_path)


def test_schemathesis_finds_nothing_with_a_key(keyed_server: str, tmp_path: Path) -> None:
    _schemathesis(keyed_server, tmp_path, "--header", "Authorization: Bearer s3cret-key")


def test_the_contract_follows_the_servers_configuration(
    open_server: str, keyed_server: str
) -> None:
    """Security only with a key; every guarded route documents 401 only then; /metrics is
    text/plain; the prompt's shape is in the schema; limits given on the command line are
    the schema's limits."""
    plain = httpx.get(f"{open_server}/openapi.json").json()
    keyed = httpx.get(f"{keyed_server}/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    guarded = [
        (path, method, op)
        for path, methods in keyed["paths"].items()
        for method, op in methods.items()
        if path != "/healthz"
    ]
    assert guarded and all(op.get("security") for _, _, op in guarded)
    assert all("401" in op["responses"] for _, _, op in guarded)
    for _, methods in plain["paths"].items():
        for op in methods.values():
            assert "security" not in op and "401" not in op["responses"]
    metrics = keyed["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert list(metrics["401"]["content"]) == ["application/json"]
    turn = plain["paths"]["/v1/turn"]["post"]["responses"]
    assert {"404", "409", "413", "422", "503"} <= set(turn)
    assert "links" in turn["200"]
    prompt = plain["components"]["schemas"]["PredictIn"]["properties"]["prompt"]
    assert (
        prompt["pattern"].startswith("^<SYS>\\nNPC_ID=")
        and "served format" in prompt["description"]
    )
    # the server's own limit (--max-text) is the schema's
    text = plain["components"]["schemas"]["TurnIn"]["properties"]["text"]
    assert text["maxLength"] == 2000


def test_a_lower_max_text_is_the_schemas_limit(tmp_path: Path) -> None:
    for url in _serve(tmp_path, "--max-text", "120"):
        schema = httpx.get(f"{url}/openapi.json").json()
        assert schema["components"]["schemas"]["TurnIn"]["properties"]["text"]["maxLength"] == 120
        long = {"player_id": "p", "npc_id": "village_blacksmith", "text": "x" * 121}
        assert httpx.post(f"{url}/v1/turn", json=long).status_code == 422
