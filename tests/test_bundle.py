"""Bundle loading refuses anything inconsistent, with a one-line reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from npcchat.config import Config
from npcchat.errors import BundleError
from npcchat.runtime import bundle
from npcchat.runtime.engine import load_engine

pytestmark = pytest.mark.model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(root: Path, old: str, new: str) -> None:
    m = root / "bundle.toml"
    text = m.read_text()
    assert old in text
    m.write_text(text.replace(old, new, 1))


def test_loads_and_has_identity(bundle_q4: Path) -> None:
    b = bundle.load(bundle_q4)
    assert b.flags[0] == "give_item" and b.hidden_size == 256 and b.quant == "q4_k_m"
    assert len(b.identity) == 16


def test_checksum_mismatch(bundle_q4: Path, tmp_path: Path) -> None:
    root = _copy(bundle_q4, tmp_path / "b")
    with (root / "heads.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"heads\.onnx: sha256 is .* the manifest says"):
        bundle.load(root)


def test_missing_file_and_manifest(bundle_q4: Path, tmp_path: Path) -> None:
    root = _copy(bundle_q4, tmp_path / "b")
    (root / "model.gguf").unlink()
    with pytest.raises(BundleError, match=r"key 'model\.file': .*model\.gguf does not exist"):
        bundle.load(root)
    with pytest.raises(BundleError, match="not a model bundle"):
        bundle.load(tmp_path)


def test_future_format(bundle_q4: Path, tmp_path: Path) -> None:
    root = _copy(bundle_q4, tmp_path / "b")
    _edit_manifest(root, "format_version = 1", "format_version = 7")
    with pytest.raises(BundleError, match="bundle format 7 is newer"):
        bundle.load(root)


def test_hidden_size_mismatch(bundle_q4: Path, tmp_path: Path) -> None:
    root = _copy(bundle_q4, tmp_path / "b")
    _edit_manifest(root, "hidden_size = 256", "hidden_size = 512")
    with pytest.raises(
        BundleError, match=r"manifest hidden_size is 512, but the GGUF.s n_embd is 256"
    ):
        load_engine(root, Config())


def test_flag_count_mismatch(bundle_q4: Path, tmp_path: Path) -> None:
    root = _copy(bundle_q4, tmp_path / "b")
    _edit_manifest(root, '    "change_npc_state",\n', "")
    with pytest.raises(BundleError, match="flag_prob has 9 outputs but the manifest names 8 flags"):
        load_engine(root, Config())


def test_state_tag_must_be_a_single_control_token(tmp_path: Path) -> None:
    """A model whose tokenizer lacks <STATE> is refused before any turn."""
    from npcchat_convert import tiny

    orig = tiny.SPECIAL_TOKENS
    try:
        tiny.SPECIAL_TOKENS = [t for t in orig if t != "<STATE>"]
        root = tiny.build_bundle(tmp_path, quant="f32")
    finally:
        tiny.SPECIAL_TOKENS = orig
    with pytest.raises(BundleError, match="<STATE> is not a single control token"):
        load_engine(root, Config())
