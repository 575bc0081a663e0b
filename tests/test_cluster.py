"""`npcchat eval --ray` and `npcchat heads fit --ray` on a real local Ray runtime (2 CPUs,
2 actors of 1 thread each, the tiny model): the report equals a local one except timings,
--resume and Ctrl-C work, a killed actor's scenarios run again, a worker that cannot give
the driver's results says so in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.model, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def scenarios(tmp_path: Path) -> Path:
    """Single- and multi-turn scenarios, one through an NPC file beside the scenario file
    (its trigger fires), so the workers must get the NPC file from the driver."""
    npc_dir = tmp_path / "npcs"
    npc_dir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "configs" / "npcs" / "village_blacksmith.toml", npc_dir / "borin.toml")
    lines: list[dict[str, Any]] = [
        {
            "id": f"s{i}",
            "npc_id": "mother",
            "tags": {"quest_stage": "in_progress", "trust": 0.1 * i},
            "player_utterance": f"Here is picture {i}.",
            "delta": [0.4, 0.2],
            "flag": ["give_item"] if i % 2 else [],
        }
        for i in range(7)
    ]
    lines.append(
        {
            "id": "npc",
            "npc_id": "village_blacksmith",
            "npc_file": "npcs/borin.toml",
            "player_utterance": "hello, smith",
            "delta": [0.1, 0.1],
        }
    )
    p = tmp_path / "s.jsonl"
    multi = (ROOT / "configs" / "scenarios" / "multi_turn.jsonl").read_text()
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + multi)
    return p


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A report without what may differ between two equal runs: timings, the date, the
    Ray part, and how many prompt tokens each turn decoded (what a shared prompt head finds
    in the cache depends on what ran before on that engine)."""
    r = json.loads(json.dumps(report))
    for key in ("created", "ray"):
        r.pop(key, None)
    for key in ("latency_ms", "tokens_per_s", "wall_s", "scenarios_per_s"):
        r["aggregates"].pop(key)
    for key in ("tokens_per_s", "scenarios_per_s", "latency_prefill_p95", "latency_generate_p95"):
        r["gates"].pop(key)
    for sc in r["scenarios"]:
        for t in sc["turns"]:
            t.pop("timings_ms")
            t["tokens"].pop("prefill")
    return r


def eval_report(tmp_path: Path, name: str, *args: str, **kw: Any) -> dict[str, Any]:
    from npcchat.cli import eval as eval_cli

    out = tmp_path / name
    eval_cli.eval_cmd([*args], report=out, max_tokens=6, threads=1, **kw)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_ray_report_equals_the_local_one(ray_local: None, bundle_q4: Path, tmp_path: Path) -> None:
    sc = str(scenarios(tmp_path))
    local = eval_report(tmp_path, "local.json", sc, bundle=bundle_q4, parallel=2)
    on_ray = eval_report(tmp_path, "ray.json", sc, bundle=bundle_q4, parallel=2, ray=True)
    assert len(local["scenarios"]) == 10 and local["complete"] and on_ray["complete"]
    assert comparable(on_ray) == comparable(local)
    jsonschema = pytest.importorskip("jsonschema")
    schema = resources.files("npcchat.eval.schemas").joinpath("eval-report.schema.json")
    jsonschema.validate(on_ray, json.loads(schema.read_text()))
    ray_part = on_ray["ray"]
    assert ray_part["actors"] == 2 and ray_part["threads_per_actor"] == 1
    assert len(ray_part["workers"]) == 2 and ray_part["deaths"] == []
    assert all(w["load_s"] > 0 and w["rss_mb"] > 0 for w in ray_part["workers"])
    assert ray_part["bytes_per_item"] > 0
    npc_turn = next(s for s in on_ray["scenarios"] if s["id"] == "npc")
    assert npc_turn["npc_file"].endswith("borin.toml") and npc_turn["error"] is None


def test_interrupt_and_resume_on_ray(
    ray_local: None, bundle_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from npcchat.cluster import eval as cluster_eval

    sc = str(scenarios(tmp_path))
    local = eval_report(tmp_path, "local.json", sc, bundle=bundle_q4)
    real = cluster_eval.RayRun.evaluate

    def interrupted(self: Any, found: Any, **kw: Any) -> None:
        seen = [0]
        on_result = kw.pop("on_result")

        def once(r: dict[str, Any]) -> None:
            on_result(r)
            seen[0] += 1
            if seen[0] == 3:
                raise KeyboardInterrupt  # what Ctrl-C raises in the driver

        real(self, found, on_result=once, **kw)

    monkeypatch.setattr(cluster_eval.RayRun, "evaluate", interrupted)
    with pytest.raises(typer.Exit) as info:
        eval_report(tmp_path, "partial.json", sc, bundle=bundle_q4, ray=True)
    assert info.value.exit_code == 130
    partial = json.loads((tmp_path / "partial.json").read_text())
    assert partial["complete"] is False and len(partial["scenarios"]) == 3
    monkeypatch.setattr(cluster_eval.RayRun, "evaluate", real)
    sent: list[int] = []
    monkeypatch.setattr(
        cluster_eval.RayRun,
        "evaluate",
        lambda self, found, **kw: (sent.append(len(found)), real(self, found, **kw))[1],
    )
    resumed = eval_report(
        tmp_path, "partial.json", sc, bundle=bundle_q4, ray=True, resume=tmp_path / "partial.json"
    )
    assert sent == [7]  # the finished three are not sent again
    assert resumed["complete"] is True
    by_id = {s["id"]: s for s in comparable(resumed)["scenarios"]}
    assert by_id == {s["id"]: s for s in comparable(local)["scenarios"]}


def test_a_killed_actor_has_its_scenarios_run_again(
    ray_local: None, bundle_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from npcchat.cluster import pool as pool_mod

    sc = str(scenarios(tmp_path))
    local = eval_report(tmp_path, "local.json", sc, bundle=bundle_q4)
    real_map = pool_mod.Pool.map

    def map_and_kill(self: Any, method: str, items: Any, chunk: int, on_item: Any) -> None:
        killed = [False]

        def item(i: int, value: Any) -> None:
            on_item(i, value)
            if not killed[0]:  # a real actor process dies while it holds a chunk
                killed[0] = True
                ray.kill(self.actors[0], no_restart=True)

        real_map(self, method, items, chunk, item)

    monkeypatch.setattr(pool_mod.Pool, "map", map_and_kill)
    on_ray = eval_report(tmp_path, "ray.json", sc, bundle=bundle_q4, ray=True)
    assert comparable(on_ray) == comparable(local)
    (death,) = on_ray["ray"]["deaths"]
    assert death["actor"] == 0 and death["rerun"] >= 1 and death["node"]
    assert len(on_ray["ray"]["workers"]) == 2  # the replacement took its place


def test_workers_that_cannot_match_the_driver_say_why(
    ray_local: None, bundle_q4: Path, tmp_path: Path
) -> None:
    from npcchat.cluster.pool import Pool
    from npcchat.cluster.worker import WorkerSpec
    from npcchat.config import Config
    from npcchat.errors import ConfigError
    from npcchat.runtime import backend
    from npcchat.runtime import bundle as bundle_mod

    b = bundle_mod.load(bundle_q4)
    good = WorkerSpec(
        bundle=str(bundle_q4),
        identity=b.identity,
        llama_version=str(backend.build_info()["version"]),
        config=Config(),
        slots=1,
    )
    cases = [
        (WorkerSpec(**{**good.__dict__, "bundle": str(tmp_path / "nowhere")}), "no bundle at"),
        (WorkerSpec(**{**good.__dict__, "identity": "0" * 16}), "the driver's is 0000"),
        (WorkerSpec(**{**good.__dict__, "llama_version": "0.0.1"}), "the driver runs 0.0.1"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            Pool(spec, actors=1, threads=1)
        assert info.value.hint
    with pytest.raises(ConfigError, match="need 6 CPUs; the Ray cluster has 2"):
        Pool(good, actors=3, threads=2)
    with Pool(good, actors=1, threads=1) as pool:  # the good spec starts
        assert pool.workers[0]["node"]


def test_heads_fit_on_ray_equals_the_local_fit(
    ray_local: None, bundle_q4: Path, tmp_path: Path
) -> None:
    from npcchat.cluster.eval import RayRun
    from npcchat.config import Config
    from npcchat_heads.refit import fit_bundle

    data = tmp_path / "fit.jsonl"
    rows = [
        {
            "npc_id": "n",
            "tags": {"trust": round(0.05 * i, 2)},
            "player_utterance": f"line {i} " + ("give" if i % 3 == 0 else "talk"),
            "delta": [0.1 * (i % 3 - 1), 0.05],
            "flag": ["give_item"] if i % 3 == 0 else [],
        }
        for i in range(30)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    local = fit_bundle(bundle_q4, [data], tmp_path / "local", Config())
    ray_run = RayRun(bundle_q4, Config(), None, 2, 1)
    try:
        remote = fit_bundle(bundle_q4, [data], tmp_path / "ray", Config(), vectors=ray_run.states)
    finally:
        ray_run.close()
    assert remote["held_out"] == local["held_out"]
    onnx = sorted((tmp_path / "local").glob("heads-*.onnx"))
    assert [p.name for p in onnx] == [p.name for p in (tmp_path / "ray").glob("heads-*.onnx")]
    assert ray_run.summary["actors"] == 2


def test_ray_options_are_checked() -> None:
    from npcchat.cli import eval as eval_cli
    from npcchat.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--ray-actors 0: expected 1\.\.4096, with --ray"):
        eval_cli.eval_cmd(["x.jsonl"], ray=True, ray_actors=0)
    with pytest.raises(ConfigError, match=r"--ray-actors 2: expected 1\.\.4096, with --ray"):
        eval_cli.eval_cmd(["x.jsonl"], ray_actors=2)


class _FakeHead:
    """A loopback port that speaks just enough HTTP/2 to pass the probe (a SETTINGS frame),
    then never answers: what Ray retries for ever."""

    def __init__(self) -> None:
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    @staticmethod
    def _hold(conn: Any) -> None:
        try:
            conn.recv(100)
            conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            while conn.recv(4096):
                pass
        except OSError:
            pass


def _eval_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    import os
    import signal
    import subprocess
    import sys

    sc = tmp_path / "one.jsonl"
    sc.write_text('{"id": "a", "npc_id": "village_blacksmith", "player_utterance": "Hi."}\n')
    return subprocess.Popen(
        [sys.executable, "-m", "npcchat", "eval", str(sc), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NPCCHAT_HOME": str(tmp_path / "home"), **(env or {})},
        # a test runner may ignore SIGINT for its children: give this one Python's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_a_head_that_never_answers_ends_in_one_line_and_ctrl_c_always_works(
    tmp_path: Path,
) -> None:
    import signal
    import time

    head = _FakeHead()
    with head.server:
        started = time.monotonic()
        proc = _eval_process(tmp_path, "--ray-address", f"127.0.0.1:{head.port}")
        out = proc.communicate(timeout=90)[0].decode()
        took = time.monotonic() - started
        assert proc.returncode == 1, out
        assert f"--ray-address 127.0.0.1:{head.port}: Ray did not connect within 20 s" in out
        assert "Traceback" not in out and took < 60
        proc = _eval_process(tmp_path, "--ray-address", f"127.0.0.1:{head.port}")
        time.sleep(5)  # well inside ray.init
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 130, out
        assert "interrupted" in out and "Traceback" not in out
        proc = _eval_process(tmp_path, "--ray-address", f"127.0.0.1:{head.port}")
        time.sleep(5)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)


def test_ray_address_from_the_environment_goes_through_the_same_check(tmp_path: Path) -> None:
    import socket

    with socket.socket() as silent:  # accepts TCP, says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        proc = _eval_process(tmp_path, "--ray", env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 1, out
    assert f"RAY_ADDRESS 127.0.0.1:{port}: not a Ray head" in out and "Traceback" not in out
    proc = _eval_process(tmp_path, "--ray", env={"RAY_ADDRESS": "127.0.0.1:\u0661\u0668"})
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 1 and "expected HOST:PORT" in out and "RAY_ADDRESS" in out


def test_eval_ray_starts_a_local_runtime_from_the_command_line(tmp_path: Path) -> None:
    """No cluster and no address: `npcchat eval --ray` starts Ray on this machine, runs the
    scenario on an actor and writes the report (a Ray started by a helper thread used to
    die with that thread, and the run hung)."""
    import json

    report = tmp_path / "r.json"
    proc = _eval_process(tmp_path, "--ray", "--ray-actors", "1", "--report", str(report))
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Failed to connect to GCS" not in out
    data = json.loads(report.read_text())
    assert data["complete"] and len(data["scenarios"]) == 1
    assert len(data["ray"]["workers"]) == 1
