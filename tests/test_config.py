from __future__ import annotations

from pathlib import Path

import pytest

from npcchat import config
from npcchat.errors import ConfigError
from npcchat.mind import npc


def test_defaults_and_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(
        "[runtime]\nn_ctx = 1024\n[state]\ndelta_scale = 0.5\n[sampling]\ntemperature = 0\n"
    )
    cfg = config.load(p)
    assert cfg.runtime.n_ctx == 1024 and cfg.state.delta_scale == 0.5
    assert cfg.sampling.temperature == 0.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.runtime.flash_attn is False  # reproducible hidden states by default


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[runtime]\nn_ctxx = 5\n", r"c\.toml: key 'runtime\.n_ctxx': unknown key"),
        ('[runtime]\nn_ctx = "big"\n', r"key 'runtime\.n_ctx': expected int"),
        ("[nope]\n", r"key 'nope': unknown section"),
        ("[state]\nclamp_min = 2.0\n", r"clamp_min': must be below"),
        ("[runtime\n", r"c\.toml: invalid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        config.load(p)


def test_home_is_env_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NPCCHAT_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text("[sampling]\nmax_tokens = 33\n")
    assert config.home() == tmp_path
    assert config.load().sampling.max_tokens == 33


def test_npc_file(tmp_path: Path) -> None:
    p = tmp_path / "n.toml"
    p.write_text(
        'id = "smith"\nlocation = "forge"\nlore = "Swords."\n'
        '[tags]\ntrust = 0.8\nnpc_mood = "calm"\n'
        '[player_state]\nitems = ["ore"]\n'
    )
    d = npc.load(p)
    assert d.id == "smith" and d.tags.location == "forge" and d.tags.trust == 0.8
    assert d.player_state.items == ("ore",)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('id = "x"\n[tags]\ntrust = 1.5\n', r"key 'tags\.trust': expected a number in \[0, 1\]"),
        ('id = "x"\n[tags]\nmood = "x"\n', r"key 'tags\.mood': unknown tag"),
        ("id = 3\n", r"key 'id': expected a string"),
        ('name = "x"\n', r"key 'id': missing"),
        (
            'id = "x"\n[player_state]\nitems = "ore"\n',
            r"key 'player_state\.items': expected a list",
        ),
    ],
)
def test_npc_errors(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "n.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        npc.load(p)


def test_shipped_config_and_npc_files_load() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    assert config.load(root / "npcchat.toml") == config.Config()
    for path in (root / "npcs").glob("*.toml"):
        npc.load(path)
