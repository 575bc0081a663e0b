"""Shared fixtures. Models are made by the project's own factory, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the `serve` fixture (a real server on a loopback port) for every test module
pytest_plugins = ["served"]


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never touch the user's ~/.npcchat from tests.
    monkeypatch.setenv("NPCCHAT_HOME", str(tmp_path_factory.getbasetemp() / "npcchat-home"))
    monkeypatch.delenv("NPCCHAT_BUNDLE", raising=False)
    monkeypatch.delenv("NPCCHAT_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Work directory of the tiny model: hf/ checkpoint, model-f32.gguf, bundles."""
    from npcchat_convert.tiny import build_bundle

    work = tmp_path_factory.mktemp("tiny")
    os.environ.setdefault("NPCCHAT_HOME", str(work / "home"))
    build_bundle(work, quant="f32")
    build_bundle(work, quant="q4_k_m")
    return work


@pytest.fixture(scope="session")
def bundle_f32(tiny_work: Path) -> Path:
    return tiny_work / "bundle-f32"


@pytest.fixture(scope="session")
def bundle_q4(tiny_work: Path) -> Path:
    return tiny_work / "bundle-q4_k_m"


@pytest.fixture()
def engine_f32(bundle_f32: Path):  # type: ignore[no-untyped-def]
    from npcchat.config import Config
    from npcchat.runtime.engine import load_engine

    with load_engine(bundle_f32, Config()) as engine:
        yield engine


@pytest.fixture()
def engine_q4(bundle_q4: Path):  # type: ignore[no-untyped-def]
    from npcchat.config import Config
    from npcchat.runtime.engine import load_engine

    with load_engine(bundle_q4, Config()) as engine:
        yield engine


@pytest.fixture(scope="session")
def bundle_reuse(tiny_work: Path) -> Path:
    """The tiny Q4_K_M model with the reuse-friendly template (issue 7)."""
    import shutil

    from npcchat.runtime import bundle as bundle_mod
    from npcchat.runtime.prompt import builtin_template

    src = bundle_mod.load(tiny_work / "bundle-q4_k_m")
    root = tiny_work / "bundle-reuse"
    if not root.exists():
        shutil.copytree(src.root, root)
        keep = {
            k: v
            for k, v in src.manifest.items()
            if k not in ("format", "format_version", "name", "model", "heads", "prompt")
        }
        bundle_mod.write_manifest(
            root,
            name="tiny-reuse",
            gguf="model.gguf",
            heads="heads.onnx",
            template=builtin_template("reuse-v1"),
            flags=list(src.flags),
            hidden_size=src.hidden_size,
            quant=src.quant,
            extra=keep,
        )
    return root
