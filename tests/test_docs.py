"""Every shell and Python example of the documentation (``docs/**/*.md`` and the README)
runs, as written, the way a reader would run it from a clone: against the demo bundle, a
served demo or a shipped sample file. An example that stops working fails CI.

How a page runs: its examples in order, in one fresh working directory that holds the
repository's files (links to them) and its own ``NPCCHAT_HOME``, so a later example may use
what an earlier one made. ``sh`` blocks run in bash with ``-e -u -o pipefail``, ``python``
blocks in a fresh interpreter; each must exit 0 and print no traceback. What the harness
changes, and only that: ``localhost:8000`` becomes a free loopback port (so tests never
collide with a real server), ``pip install`` lines resolve and check their requirements
with ``--dry-run`` (they would otherwise replace the development install), and a block
marked ``<!-- test: server -->`` (one that starts ``npcchat serve``) runs in the background
with ``--port`` added, until the page is done.

Other markers, an HTML comment on the line before the fence: ``<!-- test: skip REASON -->``
for the few examples this machine cannot run (a CUDA build, a Ray cluster, a multi-gigabyte
download); the reason is required and the list of them is printed by
:func:`test_examples_not_run_say_why`. Languages other than ``sh`` and ``python`` are data or
output (``toml``, ``json``, ``text``...) and are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.model

REPO = Path(__file__).resolve().parent.parent
PAGES = [*sorted((REPO / "docs").rglob("*.md")), REPO / "README.md"]
RUN = ("sh", "python")
DATA = ("toml", "json", "jsonl", "text", "jinja", "http", "")
# what a clone holds, linked into each page's working directory (not the local state)
UNLINKED = {".git", ".venv", "build", "models", ".mypy_cache", ".pytest_cache", ".ruff_cache",
            "__pycache__", "site"}  # fmt: skip
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARK = re.compile(r"^\s*<!--\s*test:\s*(\w+)\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    lang: str
    code: str
    mark: str = ""  # "", "server", "skip"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The fenced blocks of a page, with the marker of the line before each."""
    out: list[Example] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        before = lines[start - 1] if start else ""
        mark = _MARK.match(before)
        out.append(
            Example(
                page,
                start + 1,
                lang,
                "\n".join(body) + "\n",
                mark.group(1) if mark else "",
                mark.group(2) if mark else "",
            )
        )
    return out


def test_every_block_is_an_example_or_data() -> None:
    for page in PAGES:
        for ex in examples(page):
            assert ex.lang in RUN + DATA, f"{ex.where}: unknown block language {ex.lang!r}"
            assert ex.mark in ("", "server", "skip"), f"{ex.where}: unknown marker {ex.mark!r}"
            if ex.mark:
                assert ex.lang in RUN, f"{ex.where}: a marker on a block that never runs"


def test_examples_not_run_say_why() -> None:
    skipped = [ex for page in PAGES for ex in examples(page) if ex.mark == "skip"]
    for ex in skipped:
        assert len(ex.reason) > 10, f"{ex.where}: say why this example is not run"
    ran = sum(1 for page in PAGES for ex in examples(page) if ex.lang in RUN)
    print(f"{ran} examples, {len(skipped)} not run:")
    for ex in skipped:
        print(f"  {ex.where}: {ex.reason}")
    assert len(skipped) <= ran // 5, "most examples must run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PRELUDE = """
pip() {  # resolve and check, never replace the development install
  if [ "${1:-}" = install ]; then shift; command pip install --dry-run --quiet "$@";
  else command pip "$@"; fi
}
"""


class Page:
    """One page's working directory, environment and (when it starts one) server."""

    def __init__(self, page: Path, work: Path) -> None:
        self.page, self.work = page, work
        for entry in REPO.iterdir():
            if entry.name not in UNLINKED and not entry.name.endswith(".egg-info"):
                (work / entry.name).symlink_to(entry)
        self.port = _free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "NPCCHAT_HOME": str(work / ".npcchat"),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("NPCCHAT_DEBUG", None)
        self.server: subprocess.Popen[bytes] | None = None

    def adapt(self, code: str) -> str:
        code = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{self.port}", code)
        return code

    def run(self, ex: Example) -> None:
        code = self.adapt(ex.code)
        if ex.mark == "server":
            self.start(ex, code)
            return
        argv = (
            ["bash", "-euo", "pipefail", "-c", PRELUDE + code]
            if ex.lang == "sh"
            else [sys.executable, "-c", code]
        )
        proc = subprocess.run(
            argv,
            cwd=self.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{ex.where} exited {proc.returncode}:\n{code}\n{out[-3000:]}"
        assert "Traceback" not in out, f"{ex.where} printed a traceback:\n{out[-3000:]}"

    def start(self, ex: Example, code: str) -> None:
        assert self.server is None, f"{ex.where}: a second server on one page"
        code = re.sub(r"(npcchat serve\b[^\n]*)", rf"\1 --port {self.port}", code)
        self.log = (self.work / "server.log").open("wb")
        self.server = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", PRELUDE + code],
            cwd=self.work,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                text = (self.work / "server.log").read_text(errors="replace")
                raise AssertionError(f"{ex.where}: the server stopped:\n{text[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{ex.where}: the server did not answer /healthz in 180 s")

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):  # it may have stopped already
                os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
            self.log.close()
            text = (self.work / "server.log").read_text(errors="replace")
            assert "Traceback" not in text, f"{self.page}: the server logged:\n{text[-3000:]}"


RUNNABLE = [p for p in PAGES if any(ex.lang in RUN for ex in examples(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_the_examples_of_a_page_run_as_written(page: Path, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run the shell examples")
    runner = Page(page, tmp_path)
    try:
        for ex in examples(page):
            if ex.lang in RUN and ex.mark != "skip":
                runner.run(ex)
    finally:
        runner.close()
