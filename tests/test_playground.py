"""The designer's playground (``/ui``) in a real browser: Debian's Chromium driven by
Playwright (the system browser, no browser download), against a real server on loopback.
Screenshots land in the test's temporary directory."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]
RULES = Path(__file__).parent / "fixtures" / "rules"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    yield from _server(tmp_path, None)


@pytest.fixture()
def keyed_server(tmp_path: Path) -> Iterator[str]:
    yield from _server(tmp_path, "s3cret")


def _server(tmp_path: Path, key: str | None) -> Iterator[str]:
    import socket

    import uvicorn

    import npcchat
    from npcchat.serve.app import Settings, create_app
    from npcchat.serve.store import SessionStore, npc_registry

    npcs = tmp_path / "npcs"
    npcs.mkdir()
    shutil.copy(RULES / "smith.toml", npcs / "smith.toml")
    shutil.copy(RULES / "mother_guard.toml", npcs / "mother.toml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rt = npcchat.load(slots=2)
    store = SessionStore(rt, npc_registry(npcs, False), tmp_path / "sessions")
    rt.start_batching(4)
    app = create_app(rt, store, Settings(api_key=key), npcs_dir=npcs)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    store.runtime.close()


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield page
        browser.close()


def test_a_conversation_in_the_browser(server: str, page: Any, tmp_path: Path) -> None:
    """Three streamed turns, a state change in the panel, a fired flag, /set through the
    page, a session reopened, a Korean line typed and rendered."""
    page.goto(f"{server}/ui")
    page.wait_for_selector("#npc option[value='village_blacksmith']", state="attached")
    page.select_option("#npc", "village_blacksmith")
    page.fill("#player", "web1")
    for i, line in enumerate(["Hello there.", "Here is the ore you wanted.", "Anything else?"]):
        page.fill("#line", line)
        page.press("#line", "Enter")
        # the streamed turn's last event has arrived: the page counts them
        page.wait_for_function(f"document.body.dataset.turns === '{i + 1}'")
        if i == 0:  # quest_stage_change fires (its file's threshold is 0) and moves the stage
            assert "FIRED" in page.inner_text("#flags")
            assert "in_progress" in page.inner_text("#state")
            assert "action advance_quest()" in page.inner_text("#rules")
    log = page.inner_text("#log")
    assert "you>Hello there." in log and "We are done here, friend." in log  # a guarded reply
    flags = page.inner_text("#flags")
    assert "BLOCKED" in flags  # the third turn: both flags blocked by the rules
    assert page.inner_text("#state").count("complete") == 1  # the effects: the quest advanced
    page.screenshot(path=str(tmp_path / "playground-conversation.png"), full_page=True)
    # /set through the page
    page.select_option("#setkey", "trust")
    page.fill("#setvalue", "0.9")
    page.click("#set button")
    page.wait_for_function("document.querySelector('#state').innerText.includes('0.90')")
    # a fired flag on the next turn (quest_stage_change fires at threshold 0 until complete)
    page.select_option("#npc", "mother_abandoned_factory")
    page.fill("#player", "web2")
    page.fill("#line", "")
    page.focus("#line")
    page.keyboard.insert_text("베틀 방이 어디예요?")  # what an IME commits
    page.press("#line", "Enter")
    page.wait_for_function("document.body.dataset.turns === '4'")
    assert "아직 당신을" in page.inner_text("#log")
    assert "베틀 방이 어디예요?" in page.inner_text("#log")
    assert "BLOCKED" in page.inner_text("#flags")
    page.screenshot(path=str(tmp_path / "playground-korean.png"), full_page=True)
    # the session browser reopens the first conversation, turn by turn
    page.click("#refresh")
    page.wait_for_selector("#sessions li:has-text('web1')")
    page.click("#sessions li:has-text('web1')")
    page.wait_for_function("document.querySelector('#log').innerText.includes('Hello there.')")
    assert page.inner_text("#log").count("you>") == 3
    assert "0.90" in page.inner_text("#state")
    assert (tmp_path / "playground-conversation.png").stat().st_size > 20_000


def test_an_eval_report_opened_in_the_page(server: str, page: Any, tmp_path: Path) -> None:
    """A report file opened in the browser (nothing uploaded): the summary, a row per
    scenario turn, filters, and the rows that differ from another report marked."""
    import json
    import subprocess
    import sys

    report = tmp_path / "a.json"
    demo_npcs = Path(__file__).resolve().parents[1] / "npcchat" / "demo" / "npcs"
    subprocess.run(
        [
            *(sys.executable, "-m", "npcchat", "eval", "--npcs", str(demo_npcs), "--examples"),
            *("--max-tokens", "8", "--report", str(report)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    data = json.loads(report.read_text())
    data["scenarios"][0]["turns"][0]["reply"] = "A reply from another model."
    data["scenarios"][1]["turns"][0]["expected"]["flags"] = {"give_item": True}  # now failing
    other = tmp_path / "b.json"
    other.write_text(json.dumps(data, ensure_ascii=False))
    page.goto(f"{server}/ui")
    page.wait_for_selector("#npc option", state="attached")
    page.set_input_files("#report", str(other))
    page.wait_for_function("document.querySelectorAll('#evalrows tr').length > 1")
    rows = page.locator("#evalrows tr").count() - 1
    assert rows == sum(len(s["turns"]) for s in data["scenarios"])
    assert "scenarios" in page.inner_text("#summary")
    page.check("#onlyfailed")
    assert page.locator("#evalrows tr").count() - 1 == 1  # the one turn made to fail
    page.uncheck("#onlyfailed")
    page.select_option("#evalnpc", "mother_abandoned_factory")
    assert 0 < page.locator("#evalrows tr").count() - 1 < rows
    page.select_option("#evalnpc", "")
    page.set_input_files("#baseline", str(report))
    page.wait_for_selector("#evalrows tr.changed")
    assert page.locator("#evalrows tr.changed").count() == 1
    assert "was: " in page.inner_text("#evalrows tr.changed")
    page.screenshot(path=str(tmp_path / "playground-eval.png"), full_page=True)


def test_the_page_asks_for_the_api_key_and_sends_it(keyed_server: str, page: Any) -> None:
    """With --api-key the page is a client like any other: it asks once, then sends it."""
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept("s3cret")

    page.on("dialog", answer)
    page.goto(f"{keyed_server}/ui")
    page.wait_for_selector("#npc option[value='village_blacksmith']", state="attached")
    assert len(asked) == 1 and "API key" in asked[0]
    page.select_option("#npc", "village_blacksmith")
    page.fill("#line", "Hello there.")
    page.press("#line", "Enter")
    page.wait_for_function("document.body.dataset.turns === '1'")
    assert page.inner_text("#error") == ""
