"""Hostile and broken input, one suite that grows with the project.

Each case feeds one crafted or damaged input and asserts the clean outcome: a one-line
error naming the file (or key), no traceback, nothing of the process's memory in any
output, and bounded time and memory. Grouped by the classes of issue 14.
"""

from __future__ import annotations

import os
import pickle
import resource
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from npcchat_heads import pt_reader


# -- .pt files: crafted pickles and views (classes 1 and 2) -----------------------------------
def _pt(path: Path, pkl: bytes, storages: dict[str, bytes]) -> Path:
    """A zip-format .pt with a hand-made pickle and raw storages."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT: any signed 32-bit value


def _ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _view_pickle(
    offset: int, size: tuple[int, ...], stride: tuple[int, ...], numel: int, key: bytes = b"w"
) -> bytes:
    """``{key: _rebuild_tensor_v2(storage '0' of numel floats, offset, size, stride, ...)}``,
    opcode by opcode, as torch.save writes it."""
    pid = b"(" + b"X\x07\x00\x00\x00storage" + b"ctorch\nFloatStorage\n"
    pid += b"X\x01\x00\x00\x000" + b"X\x03\x00\x00\x00cpu" + _int(numel) + b"tQ"
    call = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _int(offset) + _ints(size)
    call += _ints(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
    return b"\x80\x02}" + b"X" + struct.pack("<I", len(key)) + key + call + b"s."


FLOATS = np.arange(16, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("offset", "size", "stride", "message"),
    [
        (15, (16,), (-1,), "negative"),  # walked memory before the storage (process memory)
        (0, (2,), (1_000_000,), "outside its storage"),  # SIGSEGV before
        (4, (4, 4), (4, 1), "outside its storage"),
        (0, (4, 4), (1, 1), "overlaps itself"),
        (0, (100_000_000,), (0,), "exceeds the bound"),  # 838 MB before refusal
        (0, (4, 4, 4, 4, 4, 4, 4, 4, 4), (1,) * 9, "at most 8 integers"),
    ],
)
def test_pt_tensor_views_are_checked_whole_before_any_read(
    tmp_path: Path, offset: int, size: tuple[int, ...], stride: tuple[int, ...], message: str
) -> None:
    path = _pt(tmp_path / "h.pt", _view_pickle(offset, size, stride, 16), {"0": FLOATS})
    with pytest.raises(pt_reader.PtError, match=message) as info:
        pt_reader.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_pt_plain_and_transposed_views_still_load(tmp_path: Path) -> None:
    path = _pt(tmp_path / "ok.pt", _view_pickle(0, (4, 4), (1, 4), 16), {"0": FLOATS})
    got = pt_reader.load(path)["w"]
    assert np.array_equal(got, np.arange(16, dtype=np.float32).reshape(4, 4).T)


def test_pt_a_key_nested_200000_deep_is_refused_before_unpickling(tmp_path: Path) -> None:
    pkl = b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"Ns."  # {((((...)))): None}
    path = _pt(tmp_path / "deep.pt", pkl, {})
    with pytest.raises(pt_reader.PtError, match="larger or deeper"):  # crashed the unpickler
        pt_reader.load(path)
    flat = b"\x80\x02}" + b"N0" * 200_000 + b"."  # 400,000 harmless operations
    with pytest.raises(pt_reader.PtError, match="over 100000 operations"):
        pt_reader.load(_pt(tmp_path / "long.pt", flat, {}))


@pytest.mark.parametrize("levels", [100, 40])
def test_pt_a_fanned_out_tuple_is_refused_not_hashed_for_ever(tmp_path: Path, levels: int) -> None:
    """t(i+1) = (t(i), t(i)) through the memo: 1 KB of pickle, 2**levels leaves; as a dict
    key its hash never ends."""
    body = b")q\x000"  # t0 = (), memo 0, off the stack
    for i in range(levels):
        body += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    pkl = b"\x80\x02}" + body + b"h" + bytes([levels]) + b"Ns."  # {t(levels): None}
    assert len(pkl) < 1300
    with pytest.raises(pt_reader.PtError, match="larger or deeper"):
        pt_reader.load(_pt(tmp_path / "fan.pt", pkl, {}))


def test_pt_a_deep_key_under_the_opcode_count_is_refused_by_depth(tmp_path: Path) -> None:
    pkl = b"\x80\x02}" + b")" + b"\x85" * 5_000 + b"Ns."
    with pytest.raises(pt_reader.PtError, match="larger or deeper"):
        pt_reader.load(_pt(tmp_path / "deep5k.pt", pkl, {}))


def test_pt_a_zip_bomb_stops_at_the_declared_size(tmp_path: Path) -> None:
    """A storage that declares 16 floats but inflates to 256 MB (a 250 KB file): refused
    after reading 65 bytes, whatever the zip header says."""
    bomb = bytes(256 * 1024 * 1024)
    path = _pt(tmp_path / "bomb.pt", _view_pickle(0, (16,), (1,), 16), {"0": bomb})
    assert path.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(pt_reader.PtError, match="larger than 64 bytes"):
        pt_reader.load(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64


def test_pt_a_huge_declared_storage_is_refused_before_reading(tmp_path: Path) -> None:
    path = _pt(tmp_path / "big.pt", _view_pickle(0, (16,), (1,), 2_000_000_000), {"0": FLOATS})
    with pytest.raises(pt_reader.PtError, match="exceeds the bound"):
        pt_reader.load(path)


def test_pt_short_storage_and_non_string_keys(tmp_path: Path) -> None:
    short = _pt(tmp_path / "short.pt", _view_pickle(0, (16,), (1,), 16), {"0": FLOATS[:32]})
    with pytest.raises(pt_reader.PtError, match="holds 32 bytes"):
        pt_reader.load(short)
    tuple_key = b"\x80\x02}" + b"(J\x01\x00\x00\x00t" + b"Ns."  # {(1,): None}
    with pytest.raises(pt_reader.PtError, match="not a short string"):
        pt_reader.load(_pt(tmp_path / "key.pt", tuple_key, {}))
    garbage = _pt(tmp_path / "garbage.pt", b"\x80\x02\xff\xfe", {})
    with pytest.raises(pt_reader.PtError, match="not a readable pickle"):
        pt_reader.load(garbage)


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


LEGACY_PICKLES = {
    # not zip archives: what torch.save wrote before 1.6, or any pickle named .pt
    "os-system": pickle.dumps(_RunsCode(), protocol=2),
    "plain-dict": pickle.dumps({"weight": [1.0, 2.0], "bias": [0.5]}, protocol=2),
    # {((((...)))): None}, 200,000 tuples deep: crashed torch's unpickler (SIGSEGV)
    "deep-key": b"\x80\x02})" + b"\x85" * 200_000 + b"Ns.",
}


def _legacy_heads(root: Path, pkl: bytes) -> Path:
    root.mkdir()
    for stem in ("delta_head", "flag_head", "threshold_head"):
        (root / f"{stem}.pt").write_bytes(pkl)
    (root / "flags.json").write_text('{"ALL_FLAGS": ["give_item"]}')
    return root


@pytest.mark.parametrize("torch_installed", [True, False], ids=["with-torch", "without-torch"])
@pytest.mark.parametrize("kind", sorted(LEGACY_PICKLES))
def test_a_legacy_pt_is_refused_by_the_bounded_reader_torch_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, torch_installed: bool
) -> None:
    """torch.load is never the fallback: the same one line whether torch is installed."""
    import importlib.util

    from npcchat.errors import ConvertError
    from npcchat_heads import loader

    if torch_installed:
        if importlib.util.find_spec("torch") is None:
            pytest.skip("torch is not installed here (CI's make dev installs it)")
        import torch

        def never(*args: object, **kw: object) -> None:
            raise AssertionError("torch.load must never read a head file")

        monkeypatch.setattr(torch, "load", never)
    else:
        monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails, as without it
    heads = _legacy_heads(tmp_path / "heads", LEGACY_PICKLES[kind])
    with pytest.raises(ConvertError) as info:
        loader.load(heads, hidden=16)
    message = str(info.value)
    assert "\n" not in message and "delta_head.pt" in message and "not a zip-format" in message
    assert info.value.hint is not None and "safetensors" in info.value.hint


@pytest.mark.model
@pytest.mark.parametrize("kind", sorted(LEGACY_PICKLES))
def test_npcchat_convert_refuses_a_legacy_pt_with_one_line(
    tiny_work: Path, tmp_path: Path, kind: str
) -> None:
    """Through the real command, with whatever torch this environment has: exit 1, one line,
    no traceback, no crash signal, nothing run, nothing written."""
    heads = _legacy_heads(tmp_path / "heads", LEGACY_PICKLES[kind])
    out = tmp_path / "bundle"
    args = [b"convert", b"--base", str(tiny_work / "hf").encode(), b"--out", str(out).encode()]
    code, text = _npcchat([*args, b"--heads", str(heads).encode()], home=tmp_path / "home")
    assert code == 1, text
    assert "not a zip-format" in text and "pwned" not in text
    assert text.strip().splitlines()[0].count("delta_head.pt") == 1
    assert not out.exists()


def test_pt_refusals_reach_convert_as_one_line_errors(tmp_path: Path) -> None:
    """Through the head loader: a ConvertError naming the file, nothing else."""
    from npcchat.errors import ConvertError
    from npcchat_heads import loader

    heads = tmp_path / "heads"
    heads.mkdir()
    for stem in ("delta_head", "flag_head", "threshold_head"):
        _pt(heads / f"{stem}.pt", _view_pickle(15, (16,), (-1,), 16, b"weight"), {"0": FLOATS})
    (heads / "flags.json").write_text('{"ALL_FLAGS": ["give_item"]}')
    with pytest.raises(ConvertError) as info:
        loader.load(heads, hidden=16)
    message = str(info.value)
    assert "\n" not in message and "delta_head.pt" in message and "negative" in message


def test_pickle_helpers_agree_with_the_pickle_module() -> None:
    """The hand-written opcodes mean what the tests say (checked with pickle itself)."""
    data = pickle.loads(b"\x80\x02}" + b"X\x01\x00\x00\x00a" + _ints((1, -2, 3)) + b"s.")
    assert data == {"a": (1, -2, 3)}
    body = b")q\x000" + b"h\x00h\x00\x86q\x010" + b"h\x01h\x01\x86q\x020"
    fan = pickle.loads(b"\x80\x02}" + body + b"h\x02Ns.")
    assert fan == {(((), ()), ((), ())): None}


# -- user text in the terminal (classes 3 and 4) ----------------------------------------------
def _npcchat(args: list[bytes], stdin: bytes = b"", home: Path | None = None) -> tuple[int, str]:
    env = {**os.environ, **({"NPCCHAT_HOME": str(home)} if home else {})}
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"npcchat", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert "Traceback" not in out, out
    return proc.returncode, out


@pytest.mark.model
def test_markup_in_player_text_and_state_is_printed_as_is(tmp_path: Path) -> None:
    code, out = _npcchat([b"talk", b"--say", b"[/bold] hello [red]x", b"--max-tokens", b"4"])
    assert code == 0 and "[/bold] hello [red]x" in out
    repl = b"/set position [/bold]\n/set npc_mood [bold red]grim\n/state\n/quit\n"
    code, out = _npcchat([b"talk", b"--session", str(tmp_path / "s.toml").encode()], repl)
    assert code == 0 and "player position [/bold]" in out and "[bold red]grim" in out
    # and again from the saved session: every /state of it works
    code, out = _npcchat([b"talk", b"--session", str(tmp_path / "s.toml").encode()], b"/state\n")
    assert code == 0 and "[bold red]grim" in out


@pytest.mark.model
def test_invalid_utf8_in_arguments_and_on_stdin_is_read_as_replacement(tmp_path: Path) -> None:
    bad = b"caf\xe9 \xff\xfe hello"
    code, out = _npcchat([b"talk", b"--say", bad, b"--json", b"--max-tokens", b"4"])
    assert code == 0 and '"reply"' in out
    code, out = _npcchat([b"talk", b"--max-tokens", b"4"], bad + b"\n/state\n")
    assert code == 0


def test_eval_compare_prints_scenario_ids_as_is(tmp_path: Path) -> None:
    import json

    def report(flag: bool) -> dict[str, object]:
        turn = {
            "player": "[/bold]",
            "flags": {"give_item": {"fired": flag}},
            "deltas": {"trust": 0.0},
        }
        return {
            "format": "npcchat-eval-report",
            "version": 1,
            "gates": {"flag_f1_macro": 0.5},
            "scenarios": [{"id": "[/bold] [red]id", "turns": [turn]}],
        }

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report(False)))
    b.write_text(json.dumps(report(True)))
    code, out = _npcchat([b"eval", b"compare", str(a).encode(), str(b).encode()])
    assert code == 0 and "[/bold] [red]id" in out


# -- numbers without bounds (class 9) ---------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[sampling]\ntemperature = nan\n", "sampling.temperature"),
        ("[sampling]\ntop_p = inf\n", "sampling.top_p"),
        ("[sampling]\nrepeat_penalty = -3.0\n", "sampling.repeat_penalty"),
        ("[state]\ndecimals = -1\n", "state.decimals"),
        ("[state]\ndelta_scale = nan\n", "state.delta_scale"),
        ("[runtime]\nn_ctx = 4294967360\n", "runtime.n_ctx"),  # aborted inside llama.cpp
        ("[runtime]\nprefill_chunk = 4\n", "runtime.prefill_chunk"),  # calls under 8 tokens
        ("[runtime]\nprefill_chunk = 1099511627776\n", "runtime.prefill_chunk"),
        ("[knowledge]\nmemories = -5\n", "knowledge.memories"),
    ],
)
def test_config_numbers_must_be_finite_and_in_range(tmp_path: Path, toml: str, key: str) -> None:
    from npcchat import config
    from npcchat.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=rf"c\.toml: key '{key}': expected"):
        config.load(path)


def test_nan_on_the_command_line_is_a_one_line_error() -> None:
    code, out = _npcchat([b"talk", b"--temperature", b"nan", b"--say", b"hi"])
    assert code == 1 and "key 'sampling.temperature': expected 0..100, got nan" in out


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("trust", 5.0, "tags.trust"),
        ("trust", -3.0, "tags.trust"),
        ("trust", float("nan"), "tags.trust"),
        ("relationship", float("inf"), "tags.relationship"),
        ("memorized", -1, "memorized"),
    ],
)
def test_session_numbers_out_of_range_are_refused_and_kept(
    tmp_path: Path, field: str, value: float, key: str
) -> None:
    import json

    from npcchat.errors import SessionError
    from npcchat.sessions import session as session_mod
    from npcchat.types import Tags

    path = tmp_path / "s.json"
    session_mod.save(session_mod.Session(npc_id="x", tags=Tags()), path)
    data = json.loads(path.read_text())
    if field == "memorized":
        data["memorized"] = value
    else:
        data["tags"][field] = value
    text = json.dumps(data)  # NaN and Infinity as Python writes them
    path.write_text(text)
    with pytest.raises(SessionError, match=rf"key '{key}': expected"):
        session_mod.load(path)
    assert path.read_text() == text  # nothing lost


def test_nan_from_the_heads_refuses_the_turn(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from npcchat.errors import BundleError
    from npcchat.runtime.heads import Heads
    from npcchat_heads import onnx_builder

    model = onnx.load_from_string(
        onnx_builder.build(onnx_builder.random_weights(16, 2), ["a", "b"])
    )
    for init in model.graph.initializer:  # a heads file damaged after it was built
        if init.name == "delta_b":
            init.CopyFrom(numpy_helper.from_array(np.array([np.nan, 0.0], np.float32), "delta_b"))
    path = tmp_path / "heads.onnx"
    path.write_bytes(model.SerializeToString())
    heads = Heads(path, ("a", "b"), 16)
    with pytest.raises(BundleError, match=r"NaN or infinity for this turn \(the heads"):
        heads.run(np.ones(16, dtype=np.float32))
    with pytest.raises(BundleError, match="<STATE> vector"):
        Heads(tmp_path / "heads.onnx", ("a", "b"), 16).run(np.full(16, np.inf, np.float32))


# -- paths and integrity (class 8) ------------------------------------------------------------
def _copy_bundle(tmp_path: Path) -> Path:
    import shutil

    from npcchat import demo

    src = demo.bundle_dir()
    assert src is not None
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/passwd", "../outside.gguf"])
def test_manifest_paths_stay_inside_the_bundle(tmp_path: Path, target: str) -> None:
    from npcchat.errors import BundleError
    from npcchat.runtime import bundle

    root = _copy_bundle(tmp_path)
    (tmp_path / "outside.gguf").write_bytes(b"x")
    manifest = root / "bundle.toml"
    manifest.write_text(manifest.read_text().replace('file = "model.gguf"', f'file = "{target}"'))
    with pytest.raises(BundleError, match=r"key 'model.file': .* is outside the bundle") as info:
        bundle.load(root)
    assert "sha256" not in str(info.value)  # no digest of a file outside the bundle


def test_a_tampered_gguf_with_its_mtime_restored_is_caught(tmp_path: Path) -> None:
    import os

    from npcchat.errors import BundleError
    from npcchat.runtime import bundle

    root = _copy_bundle(tmp_path)
    bundle.load(root)  # caches the verified checksum
    gguf = root / "model.gguf"
    st = gguf.stat()
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: size and mtime as before
    with pytest.raises(BundleError, match="sha256 is"):
        bundle.load(root)


# -- resource limits in templates (class 10) --------------------------------------------------
@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ 'a' * 200000000 }}", "repetition"),  # folded at compile time before
        ("{{ ('a' * 1000) * 1000000 }}", "repetition"),
        ("{{ 'a'.center(1000000000) }}", "center"),
        ("{{ 'a'.ljust(1000000000) }}", "ljust"),
        ("{% set s = 'ab' * 400000 %}{{ s.replace('a', 'aaaa') }}", "replace"),
        ("{{ ('ab' * 400000) | replace('a', 'aaaa') }}", "replace"),
        ("{{ 10 ** 100000000 }}", "power"),
        ("{{ ('a' * 600000) + ('b' * 600000) }}", "concatenation"),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "loops",
        ),
        ("{{ range(10**9) | list }}", "exceeds"),
        ("{{ 'a' | center(1000000000) }}", "(?i)no filter named 'center'"),
    ],
)
def test_bundle_templates_are_bounded(source: str, words: str) -> None:
    from npcchat.errors import ConfigError, PromptError
    from npcchat.runtime.prompt import PromptTemplate, render
    from npcchat.types import PromptInput, Tags

    template = PromptTemplate("hostile", source + "<STATE>\n<NPC>")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises((PromptError, ConfigError), match=words) as info:
        render(template, PromptInput(npc_id="x", tags=Tags(), player_utterance="hi"))
    assert "\n" not in str(info.value) and "hostile" in str(info.value)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


def test_a_dead_branch_is_not_computed_while_compiling() -> None:
    """Jinja folded `'a' * 200000000` at compile time even inside `{% if false %}`."""
    from npcchat.runtime.prompt import PromptTemplate, render
    from npcchat.types import PromptInput, Tags

    source = "{% if false %}{{ 'a' * 200000000 }}{% endif %}ok<STATE>\n<NPC>"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    text = render(PromptTemplate("dead", source), PromptInput("x", Tags(), "hi")).text
    assert text.startswith("ok")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100


def test_a_huge_template_source_is_refused_unread() -> None:
    from npcchat.errors import ConfigError
    from npcchat.runtime.prompt import PromptTemplate, render
    from npcchat.types import PromptInput, Tags

    template = PromptTemplate("big", "x" * 100_000 + "<STATE><NPC>")
    with pytest.raises(ConfigError, match="more than the 65536"):
        render(template, PromptInput(npc_id="x", tags=Tags(), player_utterance="hi"))


def test_the_shipped_templates_still_render_within_the_bounds() -> None:
    from npcchat.runtime.prompt import builtin_template, render
    from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

    turns = tuple(ContextTurn("player" if i % 2 else "npc", f"line {i}") for i in range(200))
    inp = PromptInput(
        "x", Tags(), "hi", "lore", "desc", PlayerState(("a", "b"), ("c",), "gate"), turns
    )
    for name in ("served-v1", "reuse-v1"):
        assert render(builtin_template(name), inp).text.endswith("<NPC>")


# -- concurrent writers (class 7) -------------------------------------------------------------
@pytest.mark.model
def test_a_second_writer_is_refused_not_silently_overwritten(tmp_path: Path) -> None:
    import npcchat
    from npcchat.errors import SessionError
    from npcchat.sessions import session as session_mod

    path = tmp_path / "s.json"
    with npcchat.load() as rt:
        a = rt.open("village_blacksmith", session=path)
        b = rt.open(session=path)  # the same file, opened a second time
        a.say("Hello from A.")
        before = b.session
        with pytest.raises(SessionError, match="changed by another program"):
            b.say("Hello from B.")
        assert b.session == before  # the refused turn is not half-applied
        assert [t.player for t in session_mod.load(path).history] == ["Hello from A."]
        c = rt.open(session=path)  # reopened: continues from what is on disk
        c.say("Hello again.")
    assert len(session_mod.load(path).history) == 2


@pytest.mark.model
def test_two_processes_on_one_session_lose_no_printed_turn(tmp_path: Path) -> None:
    """Two `talk` processes append to one session at once. Before: 26 of 61 turns of one
    writer vanished. Now each turn a process printed is on disk, exactly; a process whose
    save met the other's version stops with a one-line error instead."""
    import json
    import subprocess
    import sys

    import npcchat
    from npcchat.sessions import session as session_mod

    path = tmp_path / "shared.json"
    session_mod.save(npcchat.Session(npc_id="x", tags=npcchat.Tags()), path)

    def talk(name: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "npcchat", "talk", "--session", str(path), "--json"]
        for i in range(8):
            args += ["--say", f"{name} {i}"]
        return subprocess.Popen(
            [*args, "--max-tokens", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    procs = {name: talk(name) for name in ("A", "B")}
    printed: dict[str, int] = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err
        assert proc.returncode == 0 or "changed by another program" in err, err
        printed[name] = sum(1 for line in out.splitlines() if json.loads(line)["reply"] is not None)
    saved = [t.player for t in session_mod.load(path).history]
    for name, count in printed.items():
        assert sum(1 for p in saved if p.startswith(f"{name} ")) == count
    assert sum(printed.values()) > 0


# -- silent mix-ups (class 6) -----------------------------------------------------------------
SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios" / "multi_turn.jsonl"


@pytest.mark.model
def test_resume_refuses_another_bundle_other_settings_and_damaged_reports(tmp_path: Path) -> None:
    import json

    report = tmp_path / "r.json"
    code, out = _npcchat(
        [b"eval", str(SCENARIOS).encode(), b"--report", str(report).encode(), b"--max-tokens", b"8"]
    )
    assert code == 0, out
    good = json.loads(report.read_text())

    def resume(data: dict[str, object], *extra: bytes) -> str:
        damaged = tmp_path / "damaged.json"
        damaged.write_text(json.dumps(data))
        before = damaged.read_text()
        code, out = _npcchat(
            [b"eval", str(SCENARIOS).encode(), b"--resume", str(damaged).encode(), *extra]
        )
        assert code == 1 and damaged.read_text() == before  # refused before the run, kept
        return out

    assert "key 'bundle.id': the report was made with bundle 'other'" in resume(
        {**good, "bundle": {**good["bundle"], "id": "other"}}, b"--max-tokens", b"8"
    )
    assert "key 'settings.max_tokens': the report used 8, this run 16" in resume(
        good, b"--max-tokens", b"16"
    )
    assert "key 'version': expected an integer" in resume({**good, "version": "1"})
    assert "key 'scenarios': expected a list" in resume(
        {k: v for k, v in good.items() if k != "scenarios"}, b"--max-tokens", b"8"
    )
    broken = [{k: v for k, v in good["scenarios"][0].items() if k != "turns"}]
    assert "key 'scenarios[0]': expected an id and turns" in resume(
        {**good, "scenarios": broken}, b"--max-tokens", b"8"
    )


def test_fail_under_nan_is_refused() -> None:
    from npcchat.errors import ConfigError
    from npcchat.eval import report

    with pytest.raises(ConfigError, match="expected a finite number"):
        report.validate_gates(["flag_f1_macro=nan"], ("give_item",))


def test_the_kv_identity_covers_the_runtime_lora(tmp_path: Path) -> None:
    from dataclasses import replace

    from npcchat import demo
    from npcchat.config import Config, RuntimeConfig
    from npcchat.runtime import bundle as bundle_mod
    from npcchat.runtime.engine import _identity

    b = bundle_mod.load(demo.default_bundle())
    lora = tmp_path / "a.gguf"
    lora.write_bytes(b"adapter one")
    plain = _identity(b, Config())
    with_lora = _identity(b, Config(runtime=RuntimeConfig(lora_path=str(lora))))
    scaled = _identity(b, Config(runtime=RuntimeConfig(lora_path=str(lora), lora_scale=0.5)))
    lora.write_bytes(b"adapter two")
    other = _identity(b, Config(runtime=replace(RuntimeConfig(), lora_path=str(lora))))
    assert len({plain, with_lora, scaled, other}) == 4


def test_a_spliced_or_foreign_kv_snapshot_is_never_adopted(tmp_path: Path) -> None:
    import json

    from npcchat.sessions import snapshot

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    snapshot.save(a, snapshot.KvState("id", 512, (1, 2, 3), b"A" * 64), 16, owner="npc|t1")
    snapshot.save(b, snapshot.KvState("id", 512, (7, 8, 9, 10), b"B" * 64), 16, owner="npc|t2")
    raw_a, raw_b = snapshot.path_for(a).read_bytes(), snapshot.path_for(b).read_bytes()
    n = 6 + 4
    head_a = raw_a[n : n + int.from_bytes(raw_a[6:10], "little")]
    payload_b = raw_b[n + int.from_bytes(raw_b[6:10], "little") :]
    spliced = tmp_path / "s.json"
    snapshot.path_for(spliced).write_bytes(raw_a[:n] + head_a + payload_b)  # A's tokens, B's cache
    state, warning = snapshot.load(spliced, "id", 512, owner="npc|t1")
    assert state is None and warning is not None and "not signed by this installation" in warning
    state, warning = snapshot.load(b, "id", 512, owner="npc|t1")  # B's file under A's session
    assert state is None and warning is not None and "another session" in warning
    state, warning = snapshot.load(a, "id", 512, owner="npc|t1")
    assert state is not None and state.tokens == (1, 2, 3) and warning is None
    header = json.loads(head_a)
    assert header["owner"] == "npc|t1"


def test_a_forged_kv_snapshot_with_a_recomputed_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write .kv files can recompute any checksum; without the installation's
    key they cannot sign: another NPC's cache under this session's tokens is refused."""
    import hashlib
    import json
    import stat

    from npcchat.sessions import signing, snapshot

    monkeypatch.setenv("NPCCHAT_HOME", str(tmp_path / "home"))
    session = tmp_path / "s.json"
    assert (
        snapshot.save(session, snapshot.KvState("id", 512, (1, 2, 3), b"A" * 64), 16, "o") is None
    )
    key = signing.key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    raw = snapshot.path_for(session).read_bytes()
    n = int.from_bytes(raw[6:10], "little")
    header = json.loads(raw[10 : 10 + n])
    forged_payload = b"B" * 64  # another NPC's cache
    header["size"] = len(forged_payload)
    for field in ("hmac", "sha256"):  # an attacker recomputes what they can
        header[field] = hashlib.sha256(
            json.dumps([[1, 2, 3], "o"]).encode() + forged_payload
        ).hexdigest()
    blob = json.dumps(header).encode()
    snapshot.path_for(session).write_bytes(
        raw[:6] + len(blob).to_bytes(4, "little") + blob + forged_payload
    )
    state, warning = snapshot.load(session, "id", 512, owner="o")
    assert state is None and warning is not None and "not signed by this installation" in warning
    # a snapshot signed under another NPCCHAT_HOME (another installation) is refused too
    snapshot.save(session, snapshot.KvState("id", 512, (1, 2, 3), b"A" * 64), 16, "o")
    monkeypatch.setenv("NPCCHAT_HOME", str(tmp_path / "other-home"))
    state, warning = snapshot.load(session, "id", 512, owner="o")
    assert state is None and warning is not None and "another NPCCHAT_HOME" in warning


def test_an_installation_key_others_can_read_turns_snapshots_off_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npcchat.sessions import signing, snapshot

    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.key").write_bytes(b"k" * 32)
    (home / "secret.key").chmod(0o644)
    monkeypatch.setenv("NPCCHAT_HOME", str(home))
    monkeypatch.setattr(snapshot, "_warned", set())
    state = snapshot.KvState("id", 512, (1, 2, 3), b"A" * 64)
    warning = snapshot.save(tmp_path / "s.json", state, 16, "o")
    assert warning is not None and "readable by other users" in warning and "\n" not in warning
    assert snapshot.save(tmp_path / "s.json", state, 16, "o") is None  # once, not every turn
    assert not snapshot.path_for(tmp_path / "s.json").exists()
    with pytest.raises(signing.KeyUnavailable, match="readable by other users"):
        signing.installation_key()


def test_processes_starting_at_once_agree_on_one_installation_key(tmp_path: Path) -> None:
    code = (
        "from npcchat.sessions import signing; import sys; "
        "sys.stdout.write(signing.installation_key().hex())"
    )
    env = {**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
        for _ in range(6)
    ]
    keys = {p.communicate(timeout=60)[0] for p in procs}
    assert len(keys) == 1 and len(next(iter(keys))) == 64
    assert sorted(os.listdir(tmp_path / "home")) == ["secret.key"]  # no temp file left


def test_heads_fit_never_writes_into_the_installed_demo(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    code, out = _npcchat([b"heads", b"fit", str(data).encode()], home=tmp_path / "home")
    assert code == 1 and "the demo bundle inside the installed package" in out


def test_a_crash_between_the_heads_and_the_manifest_leaves_a_consistent_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npcchat.runtime import bundle as bundle_mod
    from npcchat_heads import onnx_builder, refit

    root = _copy_bundle(tmp_path)
    b = bundle_mod.load(root)
    weights = onnx_builder.random_weights(b.hidden_size, len(b.flags))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(refit, "write_manifest", crash)
    with pytest.raises(OSError):
        refit.write_heads(b, root, weights, b.flags, {})
    assert bundle_mod.load(root).heads_sha256 == b.heads_sha256  # the old pair, intact
    monkeypatch.undo()
    refit.write_heads(b, root, weights, b.flags, {})
    after = bundle_mod.load(root)
    assert after.heads is not None and after.heads.name.startswith("heads-")
    assert not (root / "heads.onnx").exists()  # the old file went once the manifest switched


# -- tracebacks for bad input (class 5) -------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"input": {"player_utterance": "hi"}, "output": {"flag": ["give_item"]}}', "output.flag"),
        ('{"input": {"player_utterance": "hi"}, "output": {"flag": "give_item"}}', "output.flag"),
        ('{"player_utterance": "hi", "flag": "give_item"}', "key 'flag'"),
        ('{"turns": [{"player": "hi", "expect": {"flags": [{"give_item": true}]}}]}', "flags"),
        ('{"turns": [{"player": "hi", "expect": {"delta": "up"}}]}', "delta"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_scenario_lines_are_reported_not_raised(tmp_path: Path, line: str, reason: str) -> None:
    from npcchat.eval import scenarios

    path = tmp_path / "s.jsonl"
    path.write_text(line + "\n")
    good, bad = scenarios.read(path)
    assert good == [] and len(bad) == 1
    assert bad[0].source == f"{path}:1" and reason in bad[0].reason


def test_deep_or_binary_toml_is_a_one_line_error(tmp_path: Path) -> None:
    from npcchat import config
    from npcchat.errors import ConfigError
    from npcchat.mind import npc

    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'id = "x"\n\xff\xfe\x00\x01 garbage\n')
    for path, message in ((deep, "nested too deeply"), (binary, "not UTF-8 text")):
        with pytest.raises(ConfigError, match=message):
            config.load(path)
        with pytest.raises(ConfigError, match=message):
            npc.load(path)


def test_deep_session_and_reports_without_their_keys(tmp_path: Path) -> None:
    import json

    from npcchat.errors import ConfigError, SessionError
    from npcchat.eval import report
    from npcchat.sessions import session as session_mod

    deep = tmp_path / "s.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SessionError, match="nested too deeply"):
        session_mod.load(deep)
    no_gates = tmp_path / "r.json"
    no_gates.write_text(json.dumps({"format": "npcchat-eval-report", "scenarios": []}))
    with pytest.raises(ConfigError, match="key 'gates': expected a dict"):
        report.compare(no_gates, no_gates)
    code, out = _npcchat([b"eval", b"compare", str(no_gates).encode(), str(no_gates).encode()])
    assert code == 1 and "key 'gates'" in out


@pytest.mark.model
def test_a_session_whose_npc_file_is_binary(tmp_path: Path) -> None:
    import npcchat
    from npcchat.sessions import session as session_mod

    npc_file = tmp_path / "npc.toml"
    npc_file.write_bytes(b"\x00\xff binary")
    path = tmp_path / "s.json"
    session_mod.save(npcchat.Session(npc_id="x", tags=npcchat.Tags(), npc_file=str(npc_file)), path)
    code, out = _npcchat([b"talk", b"--session", str(path).encode(), b"--say", b"hi"])
    assert code == 1 and "npc.toml: not UTF-8 text" in out


# -- leftovers and odd files (class 11) -------------------------------------------------------
def test_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import npcchat
    from npcchat.sessions import session as session_mod

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    target = tmp_path / "s.json"
    stale = tmp_path / f".s.json.{dead_pid}.abc123.tmp"  # a writer killed mid-save
    live = tmp_path / f".s.json.{os.getpid()}.def456.tmp"  # a writer still at work
    other = tmp_path / f".t.json.{dead_pid}.x.tmp"  # another file's
    session_mod.save(npcchat.Session(npc_id="x", tags=npcchat.Tags()), target)
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    assert session_mod.load(target).npc_id == "x"  # opening the session sweeps
    assert not stale.exists() and live.exists() and other.exists()


def test_a_symlinked_session_stays_a_symlink(tmp_path: Path) -> None:
    import npcchat
    from npcchat.sessions import session as session_mod

    real = tmp_path / "real"
    real.mkdir()
    target = real / "borin.json"
    session_mod.save(npcchat.Session(npc_id="x", tags=npcchat.Tags()), target)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    session_mod.save(npcchat.Session(npc_id="y", tags=npcchat.Tags()), link, known=True)
    assert link.is_symlink() and session_mod.load(target).npc_id == "y"


def test_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    import os

    from npcchat import config
    from npcchat.errors import ConfigError, SessionError
    from npcchat.eval import scenarios
    from npcchat.sessions import session as session_mod

    fifo = tmp_path / "s.json"
    os.mkfifo(fifo)
    with pytest.raises(SessionError, match="not a regular file"):
        session_mod.load(fifo)
    toml = tmp_path / "c.toml"
    os.mkfifo(toml)
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load(toml)
    jsonl = tmp_path / "x.jsonl"
    os.mkfifo(jsonl)
    assert scenarios.read(jsonl)[1][0].reason == "not a regular file"
    code, out = _npcchat([b"talk", b"--session", str(fifo).encode(), b"--say", b"hi"])
    assert code == 1 and "not a regular file" in out


def test_ctrl_c_while_a_report_is_written_keeps_the_report(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from npcchat.files.atomic import atomic_write, uninterrupted

    path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt), uninterrupted():
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, mid-write
        time.sleep(0.05)
        atomic_write(path, b'{"scenarios": ["kept"]}')
    assert path.read_bytes() == b'{"scenarios": ["kept"]}'


# -- converter gaps (class 12) ----------------------------------------------------------------
def test_alpha_pattern_takes_the_first_match_as_peft_does(tmp_path: Path) -> None:
    from npcchat_convert.lora import Adapter

    adapter = Adapter(
        root=tmp_path,
        alpha=16.0,
        r=8,
        rslora=False,
        fan_in_fan_out=False,
        target_modules=["q_proj"],
        alpha_pattern={"q_proj": 8.0, r"layers\.0\.self_attn\.q_proj": 64.0},
        pairs={},
        full={},
        file=None,  # type: ignore[arg-type]
    )
    assert adapter.scale("model.layers.0.self_attn.q_proj", 8) == 1.0  # 8 / 8, not 64 / 8
    assert adapter.scale("model.layers.0.self_attn.k_proj", 8) == 2.0  # the default alpha


def _checkpoint(tmp_path: Path) -> Path:
    from npcchat_convert import tiny

    root = tmp_path / "hf"
    tiny.make_checkpoint(root, "tiny", seed=1)
    return root


def test_rope_parameters_are_read_and_rope_scaling_refused(tmp_path: Path) -> None:
    import json

    from npcchat.errors import ConvertError
    from npcchat_convert.hf import read_config

    root = _checkpoint(tmp_path)
    path = root / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_theta", None)
    path.write_text(
        json.dumps({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    )
    assert read_config(root).rope_theta == 5e5  # transformers 5 writes it here
    for scaling in (
        {"rope_scaling": {"type": "yarn", "factor": 4.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    ):
        path.write_text(json.dumps({**cfg, **scaling}))
        with pytest.raises(ConvertError, match=r"rope scaling '(yarn|linear)' is not supported"):
            read_config(root)


def test_a_tokenizer_that_is_not_qwen2s_is_refused(tmp_path: Path) -> None:
    import json

    from npcchat.errors import ConvertError
    from npcchat_convert.hf import read_tokenizer

    root = _checkpoint(tmp_path)
    path = root / "tokenizer.json"
    good = json.loads(path.read_text())
    read_tokenizer(root)
    bad_split = json.loads(json.dumps(good))
    bad_split["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    for tj, key in (
        (bad_split, "pre_tokenizer"),
        ({**good, "pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer"),
        ({**good, "normalizer": {"type": "Lowercase"}}, "normalizer"),
    ):
        path.write_text(json.dumps(tj))
        with pytest.raises(ConvertError, match=f"key '{key}'"):
            read_tokenizer(root)


def test_scaffold_tags_must_be_special_tokens_at_convert_time(tmp_path: Path) -> None:
    from npcchat.errors import ConvertError
    from npcchat.runtime.prompt import builtin_template
    from npcchat_convert.hf import read_tokenizer
    from npcchat_convert.pipeline import check_scaffold

    tok = read_tokenizer(_checkpoint(tmp_path))
    check_scaffold(tok, builtin_template("served-v1"))  # the factory's tokenizer has them all
    state_id = next(i for i, (text, _) in tok.added.items() if text == "<STATE>")
    tok.added[state_id] = ("<STATE>", False)  # an added token, but not special
    with pytest.raises(ConvertError, match="<STATE> is a non-special added token"):
        check_scaffold(tok, builtin_template("served-v1"))
    del tok.added[state_id]
    with pytest.raises(ConvertError, match="<STATE> is not an added token"):
        check_scaffold(tok, builtin_template("served-v1"))


def test_a_kv_header_without_its_bundle_and_a_binary_manifest(tmp_path: Path) -> None:
    import json
    import struct

    from npcchat.errors import BundleError, ConfigError
    from npcchat.runtime import bundle as bundle_mod
    from npcchat.sessions import snapshot

    session = tmp_path / "s.json"
    header = json.dumps({"format": 3, "n_ctx": 512, "tokens": [1], "owner": "", "size": 0})
    blob = header.encode()
    snapshot.path_for(session).write_bytes(snapshot.MAGIC + struct.pack("<I", len(blob)) + blob)
    state, warning = snapshot.load(session, "id", 512)
    assert state is None and warning is not None and "without its owner, bundle" in warning
    huge = snapshot.MAGIC + struct.pack("<I", 0xFFFFFFF0) + b"{}"  # a header size that lies
    snapshot.path_for(session).write_bytes(huge)
    state, warning = snapshot.load(session, "id", 512)
    assert state is None and warning is not None and "out of bounds" in warning
    root = _copy_bundle(tmp_path)
    (root / "bundle.toml").write_bytes(b'format = "npcchat-bundle"\n\xff\xfe\x00')
    with pytest.raises((ConfigError, BundleError), match=r"bundle\.toml: not UTF-8 text"):
        bundle_mod.load(root)


def _listener(answer: bytes | None, family: int = 2) -> tuple[object, int]:
    """A loopback TCP server that accepts and, after reading, answers ``answer`` (None:
    nothing ever); returns (socket, port). Closed by the caller."""
    import socket
    import threading

    server = socket.socket(family)
    server.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                conn.recv(64)
                if answer is not None:
                    conn.sendall(answer)
            except OSError:
                pass
            if answer is not None:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a gRPC server answers first


def test_a_ray_address_is_checked_before_ray_sees_it() -> None:
    """Ray retries an unreachable head for minutes; malformed, oversized or unreachable
    addresses are one line at once (no ray needed for the check)."""
    import socket

    from npcchat.cluster.address import probe
    from npcchat.errors import ConfigError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"--ray-address 127.0.0.1:{port}: cannot connect"):
        probe(f"127.0.0.1:{port}")
    arabic = "127.0.0.1:\u0661\u0668\u0667\u0664\u0660"  # passes str.isdigit()
    for bad in ("nowhere", ":1", "ray://:1", "host:99999", "host:0", "a" * 5000 + ":1", arabic):
        with pytest.raises(ConfigError, match="expected HOST:PORT or ray://HOST:PORT"):
            probe(bad)
    with pytest.raises(ConfigError, match="cannot connect"):  # a label IDNA refuses
        probe("a" * 100 + ".example:1")
    server, port = _listener(H2_SETTINGS)  # an HTTP/2 server passes, as ray:// too
    with server:  # type: ignore[attr-defined]
        probe(f"127.0.0.1:{port}")
        probe(f"ray://127.0.0.1:{port}")
    try:
        server, port = _listener(H2_SETTINGS, socket.AF_INET6)
    except OSError:  # a machine without IPv6 loopback
        return
    with server:  # type: ignore[attr-defined]
        probe(f"[::1]:{port}")


@pytest.mark.parametrize(
    "answer", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n", b"-ERR unknown command\r\n", b""]
)
def test_a_port_that_accepts_tcp_but_is_not_a_ray_head_is_refused_in_time(
    answer: bytes | None,
) -> None:
    """A silent port, a web server, a Redis-like server, one that hangs up: one line,
    within the probe's deadline, instead of Ray retrying for ever."""
    import time

    from npcchat.cluster.address import probe
    from npcchat.errors import ConfigError

    server, port = _listener(answer)
    with server:  # type: ignore[attr-defined]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: not a Ray head") as info:
            probe(f"127.0.0.1:{port}", timeout=2)
        assert time.monotonic() - started < 10
    assert "\n" not in str(info.value)


def test_ray_address_from_the_environment_is_checked_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from npcchat.cluster.address import from_environment

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:\u0661\u0668")
    assert from_environment(None) == ("127.0.0.1:\u0661\u0668", "RAY_ADDRESS")
    assert from_environment("h:1") == ("h:1", "--ray-address")
    monkeypatch.delenv("RAY_ADDRESS")
    assert from_environment(None) == (None, "--ray-address")


# -- round 2 (issue 20): silent acceptances ---------------------------------------------------
DEMO_NPCS = Path(__file__).resolve().parents[1] / "npcchat" / "demo" / "npcs"


def test_npc_file_flags_the_bundle_lacks_are_named_in_warnings(tmp_path: Path) -> None:
    from npcchat.mind import npc as npc_mod

    path = tmp_path / "smith.toml"
    path.write_text(
        (DEMO_NPCS / "village_blacksmith.toml").read_text("utf-8")
        + "\n[flags.give_itme]\nthreshold = 0.5\n"
        + '\n[[triggers]]\nmatch = ["idiot"]\nreaction = "Out."\nflags = ["npc_acton"]\n'
    )
    from npcchat import demo
    from npcchat.runtime import bundle as bundle_mod

    demo_flags = bundle_mod.load(demo.default_bundle()).flags
    warnings = npc_mod.flag_warnings(npc_mod.load(path), demo_flags)
    assert len(warnings) == 2, warnings
    assert "key 'flags.give_itme'" in warnings[0] and "give_item, quest_stage_change" in warnings[0]
    assert "triggers" in warnings[1] and "'npc_acton'" in warnings[1]
    smith = npc_mod.load(DEMO_NPCS / "village_blacksmith.toml")
    assert npc_mod.flag_warnings(smith, demo_flags) == []


@pytest.mark.model
def test_talk_warns_about_an_npc_flag_the_bundle_lacks(tmp_path: Path) -> None:
    path = tmp_path / "smith.toml"
    path.write_text(
        (DEMO_NPCS / "village_blacksmith.toml").read_text("utf-8")
        + "\n[flags.give_itme]\nthreshold = 0.5\n"
    )
    args = [b"talk", b"--npc", str(path).encode(), b"--say", b"Hello.", b"--max-tokens", b"2"]
    code, out = _npcchat(args, home=tmp_path / "home")
    assert code == 0 and "key 'flags.give_itme'" in out and "give_item" in out


def test_multi_turn_thresholds_as_a_list_is_a_bad_line() -> None:
    from npcchat.eval.scenarios import parse_line

    line = (
        '{"npc_id": "x", "turns": [{"player": "hi", "expect": '
        '{"flags": ["give_item"], "thresholds": [0.5]}}]}'
    )
    with pytest.raises(ValueError, match=r"key 'turns\[0\]\.expect\.thresholds': expected"):
        parse_line(line, "s.jsonl:1", "s:1")


def test_labels_for_flags_a_bundle_lacks_are_found_with_their_key() -> None:
    from npcchat.eval.scenarios import parse_line, unknown_flags

    flags = ("give_item", "npc_action")
    multi = parse_line(
        '{"npc_id": "x", "turns": [{"player": "a"}, '
        '{"player": "b", "expect": {"flags": {"give_itme": true}}}]}',
        "s.jsonl:1",
        "s:1",
    )
    reason = unknown_flags(multi, flags)
    assert reason is not None and "key 'turns[1].expect.flags.give_itme'" in reason
    assert "give_item, npc_action" in reason
    nested = parse_line(
        '{"input": {"npc_id": "x", "player_utterance": "a"}, "output": {"flag": '
        '{"gift": {"score": 1, "threshold": 0.5, "label": 1}}}}',
        "s.jsonl:2",
        "s:2",
    )
    assert "key 'output.flag.gift'" in (unknown_flags(nested, flags) or "")
    flat = parse_line('{"npc_id": "x", "player_utterance": "a", "flag": ["nope"]}', "f:3", "f:3")
    assert "key 'flag'" in (unknown_flags(flat, flags) or "")
    good = parse_line('{"npc_id": "x", "player_utterance": "a", "flag": ["npc_action"]}', "f", "f")
    assert unknown_flags(good, flags) is None


def _eval(args: list[str], home: Path) -> tuple[int, str]:
    return _npcchat([b"eval", *(a.encode() for a in args)], home=home)


@pytest.mark.model
def test_eval_refuses_labels_of_unknown_flags_and_names_npc_ids_without_a_file(
    tmp_path: Path,
) -> None:
    sc = tmp_path / "s.jsonl"
    sc.write_text(
        '{"id": "typo", "npc_id": "village_blacksmith", "turns": [{"player": "Hello.", '
        '"expect": {"flags": {"give_itme": true}}}]}\n'
        '{"id": "fine", "npc_id": "village_blacksmith", "turns": [{"player": "Hello.", '
        '"expect": {"flags": ["give_item"]}}]}\n'
        '{"id": "loose", "npc_id": "nobody_here", "player_utterance": "Hi."}\n'
    )
    home = tmp_path / "home"
    report = tmp_path / "r.json"
    base = [str(sc), "--max-tokens", "2", "--report", str(report)]
    code, out = _eval(base, home)
    assert code == 0, out
    assert "s.jsonl:1: key 'turns[0].expect.flags.give_itme'" in out
    assert "no NPC file for NPC id 'nobody_here', 'village_blacksmith'" in out
    assert out.count("no NPC file") == 1  # once per run, not per scenario
    import json

    rep = json.loads(report.read_text())
    assert [s["id"] for s in rep["scenarios"]] == ["fine", "loose"]
    assert rep["aggregates"]["bad_lines"] == 1
    code, out = _eval([*base, "--strict"], home)
    assert code == 1 and "no NPC file for NPC id" in out
    code, out = _eval([*base, "--strict", "--npcs", str(DEMO_NPCS)], home)
    assert code == 1 and "no NPC file for NPC id 'nobody_here'" in out
    sc.write_text("\n".join(sc.read_text().splitlines()[:2]) + "\n")
    code, out = _eval([*base, "--strict", "--npcs", str(DEMO_NPCS)], home)
    assert code == 1 and "s.jsonl:1: key 'turns[0].expect.flags.give_itme'" in out
    assert len(out.strip().splitlines()) <= 2  # the error and its hint


def test_talk_with_a_bundle_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    code, out = _npcchat([b"talk", b"--bundle", str(missing).encode(), b"--say", b"hi"])
    assert code == 1 and f"{missing}: no such directory" in out
    assert "not a model bundle" not in out and "bundled demo" in out
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    code, out = _npcchat([b"talk", b"--bundle", str(afile).encode(), b"--say", b"hi"])
    assert code == 1 and "not a directory" in out


def test_a_bundle_path_too_long_for_the_file_system_is_one_line(tmp_path: Path) -> None:
    code, out = _npcchat([b"talk", b"--bundle", b"x" * 5000, b"--say", b"hi"])
    assert code == 1 and "cannot read" in out and len(out.strip().splitlines()) <= 3


@pytest.mark.model
def test_hostile_chat_completions_and_events_are_bounded_before_any_turn(serve: Any) -> None:
    """The OpenAI route and the events route refuse what is too much or not theirs before
    anything reaches a session or the model: one line each, no traceback, no file written."""
    server = serve(max_body=1 << 20)
    npc = "village_blacksmith"
    hi = {"role": "user", "content": "hi"}
    with server.client() as c:
        chat = [
            {"model": npc, "messages": [hi] * 513},  # over 512 messages
            {"model": npc, "messages": [hi], "user": "../../etc/passwd"},  # a path as a player
            {"model": npc, "messages": [hi], "stop": ["x" * 65]},  # a stop text over 64
            {"model": npc, "messages": [{"role": "user", "content": [{"type": "t"}] * 65}]},
            {"model": "x" * 65, "messages": [hi]},
            {"model": npc, "messages": [hi], "temperature": float("inf")},
        ]
        for body in chat:
            r = c.post("/v1/chat/completions", content=_json(body), headers=JSON)
            assert r.status_code == 400, (str(body)[:80], r.text)
            assert r.json()["error"]["code"] == "invalid_request" and "Traceback" not in r.text
        url = f"/v1/sessions/p1/{npc}/events"
        events = [
            {"events": [{"type": "time", "day": 1}] * 65},
            {"events": [{"type": "memory", "text": "x" * 2001}]},
            {"events": [{"type": "items", "gained": ["x"] * 201}]},
            {"events": [{"type": "time", "day": 1e300}]},
            {"events": [{"type": "tags", "tags": {"trust": 2}}]},
        ]
        for body in events:
            r = c.post(url, content=_json(body), headers=JSON)
            assert r.status_code == 422, (str(body)[:80], r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        assert not (server.sessions / npc / "p1.json").exists()  # nothing was started


JSON = {"content-type": "application/json"}


def _json(body: object) -> bytes:
    import json

    return json.dumps(body, allow_nan=True).encode()


def test_a_model_json_file_is_bounded_before_it_is_read(tmp_path: Path) -> None:
    from npcchat.errors import ConvertError
    from npcchat_convert import hf

    root = _checkpoint(tmp_path)
    with (root / "tokenizer.json").open("r+b") as fh:  # sparse: no real bytes written
        fh.truncate(hf.MAX_JSON_BYTES + 1)
    with pytest.raises(ConvertError, match="over the 64 MiB"):
        hf.read_tokenizer(root)


def test_training_refuses_a_tokenizer_convert_would_refuse(tmp_path: Path) -> None:
    """A base whose tokenizer convert cannot carry is refused before any training, and a
    scaffold tag that is a plain token of the base is named."""
    import json

    pytest.importorskip("tokenizers")
    from npcchat.errors import ConfigError, ConvertError
    from npcchat.runtime.prompt import builtin_template
    from npcchat_train.tokens import prepare

    root = _checkpoint(tmp_path)
    tj = json.loads((root / "tokenizer.json").read_text())
    (root / "tokenizer.json").write_text(
        json.dumps({**tj, "pre_tokenizer": {"type": "Whitespace"}})
    )
    with pytest.raises(ConvertError, match="key 'pre_tokenizer'"):
        prepare(root, builtin_template("served-v1"))
    for t in tj["added_tokens"]:
        if t["content"] == "<STATE>":
            t["special"] = False
    (root / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match="<STATE> is a plain token of this tokenizer"):
        prepare(root, builtin_template("served-v1"))
