"""`heads fit`: numpy fitter on synthetic vectors, and on the tiny model's own vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npcchat_heads.fit import FitData, fit_delta, fit_heads, fit_logistic
from npcchat_heads.onnx_builder import reference


def test_recovers_known_linear_heads() -> None:
    rng = np.random.default_rng(0)
    n, d, f = 3000, 24, 3
    x = rng.standard_normal((n, d)) * 2.0 + 1.0
    wd, bd = rng.standard_normal((2, d)) * 0.15, np.array([0.1, -0.2])
    wf, bf = rng.standard_normal((f, d)) * 0.8, np.array([0.5, -1.0, 0.0])
    wt, bt = rng.standard_normal((f, d)) * 0.05, np.array([0.3, 0.0, -0.3])
    delta = np.tanh(x @ wd.T + bd)
    flags = (rng.random((n, f)) < 1 / (1 + np.exp(-(x @ wf.T + bf)))).astype(float)
    thr = 1 / (1 + np.exp(-(x @ wt.T + bt)))
    # delta: exact targets -> exact weights
    w, b = fit_delta(x, delta, l2=1e-6)
    np.testing.assert_allclose(w, wd, atol=2e-3)
    np.testing.assert_allclose(b, bd, atol=2e-3)
    # logistic: sampled labels -> weights close to the truth
    for k in range(f):
        wk, bk = fit_logistic(x, flags[:, k], l2=1e-3)
        assert np.corrcoef(wk, wf[k])[0, 1] > 0.97
        fitted_p = 1 / (1 + np.exp(-(x @ wk + bk)))
        assert np.mean(np.abs(fitted_p - 1 / (1 + np.exp(-(x @ wf[k] + bf[k]))))) < 0.04
    data = FitData(x[:2500], delta[:2500], flags[:2500], thr[:2500])
    val = FitData(x[2500:], delta[2500:], flags[2500:], thr[2500:])
    heads, how = fit_heads(data, val, l2=1e-3)
    d_pred, p_pred, t_pred = reference(heads, x[2500:])
    assert np.max(np.abs(d_pred - delta[2500:])) < 1e-2
    assert np.max(np.abs(t_pred - thr[2500:])) < 1e-2  # labelled thresholds are regressed
    assert set(how.values()) == {"regressed on labelled thresholds"}
    true_p = 1 / (1 + np.exp(-(x[2500:] @ wf.T + bf)))
    assert np.mean(np.abs(p_pred - true_p)) < 0.05


def test_threshold_from_validation_when_unlabelled() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 8))
    y = (x[:, 0] > 0.5).astype(float)[:, None]
    nan = np.full((400, 2), np.nan)
    heads, how = fit_heads(
        FitData(x[:300], nan[:300], y[:300], np.full((300, 1), np.nan)),
        FitData(x[300:], nan[300:], y[300:], np.full((100, 1), np.nan)),
        l2=0.1,
    )
    assert str(how["0"]).startswith("F1-optimal on validation")
    _, prob, thr = reference(heads, x)
    assert np.all(thr == thr[0])  # a constant threshold
    fired = prob[:, 0] >= thr[:, 0]
    assert np.mean(fired == y[:, 0].astype(bool)) > 0.95


def _records(path: Path, n: int, seed: int) -> None:
    """Labels that depend on what the player says: thanks / give -> trust up + give_item."""
    rng = np.random.default_rng(seed)
    good = [
        "Thank you so much, here is the key.",
        "I give you the picture, take it.",
        "Thanks friend, take this gift.",
    ]
    bad = [
        "You are a liar and a thief!",
        "Get out of my sight, fool.",
        "I will burn this factory down.",
    ]
    lines = []
    for i in range(n):
        nice = bool(rng.integers(0, 2))
        text = str(rng.choice(good if nice else bad)) + f" ({i % 7})"
        lines.append(
            {
                "npc_id": "mother",
                "tags": {"location": "map1", "trust": float(rng.uniform(0.2, 0.8))},
                "player_utterance": text,
                "delta": [0.5 if nice else -0.5, 0.3 if nice else -0.3],
                "flag": ["give_item"] if nice else ["npc_action"],
            }
        )
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.mark.model
def test_fitted_heads_beat_random_heads_on_the_tiny_model(bundle_q4: Path, tmp_path: Path) -> None:
    from npcchat.config import Config
    from npcchat_heads.refit import fit_bundle

    data = tmp_path / "train.jsonl"
    _records(data, 240, seed=0)
    out = tmp_path / "fitted"
    before_manifest = (bundle_q4 / "bundle.toml").read_text()
    result = fit_bundle(bundle_q4, [data], out, Config(), seed=0)
    assert (
        bundle_q4 / "bundle.toml"
    ).read_text() == before_manifest  # --out leaves the source alone
    fitted = result["held_out"]
    # the random heads of the original bundle, scored on the same held-out rows
    from npcchat.eval.states import state_vectors
    from npcchat.runtime import bundle as bundle_mod
    from npcchat.runtime.engine import Engine
    from npcchat_heads.refit import labels, load_records, split

    records, _ = load_records([data], strict=False)
    b = bundle_mod.load(bundle_q4)
    with Engine.load(b, Config()) as engine:
        x = state_vectors(engine, records)
        _, _, te = split(len(records), 0, 0.2, 0.2)
        lab = labels(records, b.flags)
        raw = engine.heads.run_batch(x[te].astype(np.float32))  # type: ignore[union-attr]
    k = b.flags.index("give_item")
    from npcchat.eval import metrics as M

    random_f1 = M.prf(list(raw[1][:, k] >= raw[2][:, k]), list(lab.flags[te, k].astype(bool))).f1
    assert fitted["flags"]["give_item"]["f1"] > max(0.8, random_f1)
    assert fitted["delta"]["trust"]["sign_agreement"] > 0.8
    assert fitted["delta"]["trust"]["mae"] < 0.3
    # the new bundle loads and talks, and its manifest records the fit
    bundle_mod.load(out)
    assert "heads_fit" in (out / "bundle.toml").read_text()


@pytest.mark.model
def test_cli_heads_fit_in_place(bundle_q4: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_q4, copy)
    data = tmp_path / "d.jsonl"
    _records(data, 60, seed=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "heads",
            "fit",
            str(data),
            "--bundle",
            str(copy),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bundle"] == str(copy) and result["records"] == 60
    talk = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "talk",
            "--bundle",
            str(copy),
            "--say",
            "hi",
            "--json",
            "--max-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert talk.returncode == 0, talk.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "heads",
            "fit",
            str(tmp_path / "none.jsonl"),
            "--bundle",
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


@pytest.mark.model
def test_records_with_an_npc_are_fitted_on_the_prompt_eval_decodes() -> None:
    """A record's NPC (``--npcs`` by id, or its ``npc_file``) is applied as eval applies it:
    the vector ``heads fit`` reads comes from the very tokens eval decodes for the record,
    and without the NPC the prompt (and the vector) would be another."""
    from npcchat import demo
    from npcchat.config import Config
    from npcchat.eval import runner
    from npcchat.eval.scenarios import parse_line
    from npcchat.eval.similarity import Similarity
    from npcchat.eval.states import state_vectors
    from npcchat.mind import npc as npc_mod
    from npcchat.runtime import bundle as bundle_mod
    from npcchat.runtime.engine import Engine
    from npcchat.types import SamplingParams

    repo = Path(__file__).resolve().parents[1]
    npcs = npc_mod.load_dir(repo / "configs" / "npcs")
    lines = [  # records that leave lore and state to their NPC
        '{"npc_id": "mother_abandoned_factory", "player_utterance": "안녕하세요, 어머니", '
        '"delta": {"trust": 0.1, "relationship": 0.0}}',
        '{"npc_id": "village_blacksmith", "player_utterance": "Can you fix my sword?", "flag": []}',
    ]
    scenarios = [parse_line(line, f"x.jsonl:{i}", f"x:{i}") for i, line in enumerate(lines)]
    greedy = SamplingParams(temperature=0.0, max_tokens=1, seed=0)
    with Engine.load(bundle_mod.load(demo.default_bundle()), Config()) as engine:
        for sc in scenarios:
            with_npc = state_vectors(engine, [sc], npcs=npcs)
            fitted = list(engine.kv_tokens(0))
            without = state_vectors(engine, [sc])
            assert list(engine.kv_tokens(0)) != fitted
            assert not np.array_equal(with_npc, without)
            runner.run(engine, [sc], greedy, Similarity(), lambda _: None, False, npcs)
            assert list(engine.kv_tokens(0))[: len(fitted)] == fitted, sc.source
