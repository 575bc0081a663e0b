"""``npcchat train``: a tiny Qwen2 made here (the tiny factory) trained for a few steps on
CPU, then carried through ``npcchat convert``: the prompts are the runtime's byte for byte,
and the bundle's deltas and flag probabilities are the trained torch model's within 2e-3
(convert's own parity bound), merged and as a run-time LoRA adapter. Needs the train extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from npcchat.config import Config  # noqa: E402
from npcchat.eval import runner  # noqa: E402
from npcchat.eval.scenarios import Scenario, read  # noqa: E402
from npcchat.mind import npc as npc_mod  # noqa: E402
from npcchat.runtime.bundle import load as load_bundle  # noqa: E402
from npcchat.runtime.engine import Engine  # noqa: E402
from npcchat.runtime.prompt import SCAFFOLD_TAGS  # noqa: E402
from npcchat.types import SamplingParams  # noqa: E402
from npcchat_train import records, tokens  # noqa: E402
from npcchat_train.loop import Interrupted, LoopSettings, predict  # noqa: E402
from npcchat_train.model import LoraSettings, TrainModel  # noqa: E402
from npcchat_train.run import TrainOptions, train  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "configs" / "scenarios" / "labelled_sample.jsonl"
MULTI = REPO / "configs" / "scenarios" / "multi_turn.jsonl"
NPCS = REPO / "configs" / "npcs"
PARITY = 2e-3  # as convert's parity bound
LORA = LoraSettings(r=8, alpha=16.0, dropout=0.0)
CFG = Config()


def _loop(**kw: Any) -> LoopSettings:
    base = {"epochs": 1, "batch_size": 8, "lr": 5e-3, "heads_lr": 5e-3, "seed": 0}
    return LoopSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny bases: one with npcchat's tags, one without (as a stock Qwen2)."""
    from npcchat_convert.tiny import make_checkpoint

    root = tmp_path_factory.mktemp("bases")
    make_checkpoint(root / "tagged", "tiny", seed=3)
    # as a real Qwen2 base: no tags, and an embedding matrix wider than the vocabulary
    make_checkpoint(root / "stock", "tiny", seed=4, scaffold=False, vocab_size=1000)
    make_checkpoint(root / "tight", "tiny", seed=5, scaffold=False)  # no padding rows
    return {"tagged": root / "tagged", "stock": root / "stock", "tight": root / "tight"}


def _options(base: Path, out: Path, **kw: Any) -> TrainOptions:
    given: dict[str, Any] = {
        "data": (SAMPLE, MULTI),
        "npcs": NPCS,
        "template": "reuse-v1",
        "heldout": 0.15,
        "lora": LORA,
        "loop": _loop(),
        "device": "cpu",
        "precision": "fp32",
    }
    return TrainOptions(base=base, out=out, **{**given, **kw})


@pytest.fixture(scope="module")
def stock_run(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stock"
    report = train(_options(bases["stock"], out), CFG)
    assert len(report["tokens_added"]) == 7, "the stock base lacks the tags: the run adds them"
    # the tags take padding rows of the matrix (no growth), and those rows learn
    assert report["model"]["tokens_trained"] == 7 and report["model"]["rows_added"] == 0
    # the optimizer holds the 7 rows, not the matrix
    assert report["model"]["trainable_parameters"] < 1000 * 256  # the matrix alone is more
    return out


def _convert(base: Path, run: Path, out: Path, adapter_only: bool = False) -> None:
    """The run's adapter and heads as an f32 bundle (no drift check: parity is the test)."""
    from npcchat_convert.pipeline import Options, convert

    convert(
        Options(
            base=base,
            out=out,
            adapter=run / "adapter",
            heads=run / "heads",
            quant="f32",
            template="reuse-v1",
            adapter_only=adapter_only,
            verify=False,
        )
    )


@pytest.fixture(scope="module")
def stock_bundle(bases: dict[str, Path], stock_run: Path) -> Path:
    """The stock run merged into an f32 bundle, once for the tests that read it."""
    bundle = stock_run.parent / "stock-f32"
    _convert(bases["stock"], stock_run, bundle)
    return bundle


def _heldout(run: Path) -> list[Scenario]:
    """The run's held-out single-turn scenarios (the prompts file names them)."""
    held = {
        json.loads(line)["source"]
        for line in (run / "prompts.jsonl").read_text("utf-8").splitlines()
        if json.loads(line)["split"] == "heldout"
    }
    found = [sc for p in (SAMPLE, MULTI) for sc in read(p)[0] if sc.source in held]
    return [sc for sc in found if len(sc.turns) == 1]


def _torch_outputs(base: Path, run: Path, scenarios: list[Scenario]) -> np.ndarray:
    """deltas (2) and flag probabilities of the run's saved adapter and heads, in torch, on
    the prompts the runtime renders for ``scenarios``."""
    from npcchat_convert.pipeline import template_of
    from npcchat_train import data

    settings = json.loads((run / "settings.json").read_text("utf-8"))
    flags = settings["flags"]
    tok = tokens.prepare(base, template_of("reuse-v1"))
    engine = tokens.render_engine(tok, template_of("reuse-v1"), flags, 256, CFG, run)
    npcs = npc_mod.load_dir(NPCS)
    items = data.encode(list(records.examples(engine, scenarios, npcs)), tok, flags, 200)
    model = TrainModel(base, tok.n_vocab, tok.added_ids, len(flags), LORA, "cpu", "fp32", False, 0)
    model.load_adapter(run / "adapter")
    model.load_heads(run / "heads")
    vectors = torch.from_numpy(predict(model, items, _loop())["vectors"]).float()
    with torch.no_grad():
        delta = torch.tanh(model.heads.delta_head(vectors))
        prob = torch.sigmoid(model.heads.flag_head(vectors))
    return torch.cat([delta, prob], dim=1).numpy()


def _bundle_outputs(bundle: Path, scenarios: list[Scenario], cfg: Config) -> np.ndarray:
    npcs = npc_mod.load_dir(NPCS)
    rows = []
    with Engine.load(load_bundle(bundle), cfg) as engine:
        found = runner.Npcs(engine, npcs)
        for sc in scenarios:
            conv = runner.conversation_for(sc, engine, SamplingParams(seed=0), found.of(sc))
            conv.context = sc.context
            vec = engine.state_vector(conv.prompt(sc.turns[0][0]))[0]
            assert engine.heads is not None
            delta, prob, _ = engine.heads.run_batch(vec[None, :])
            rows.append(np.concatenate([delta[0], prob[0]]))
    return np.stack(rows)


def test_the_prompts_are_the_runtimes_byte_for_byte(
    bases: dict[str, Path], stock_run: Path, stock_bundle: Path
) -> None:
    """Every training prompt (NPC files applied, multi-turn teacher-forced), rendered
    without a model, is the prompt the converted bundle's engine renders: same text, same
    token ids (llama.cpp's tokenizer of the GGUF against the training tokenizer)."""

    bundle = stock_bundle
    rendered = [
        json.loads(line) for line in (stock_run / "prompts.jsonl").read_text("utf-8").splitlines()
    ]
    assert len(rendered) > 60 and any("#2" in r["id"] for r in rendered)
    scenarios = [sc for p in (SAMPLE, MULTI) for sc in read(p)[0]]
    npcs = npc_mod.load_dir(NPCS)
    with Engine.load(load_bundle(bundle), CFG) as engine:
        again = list(records.examples(engine, scenarios, npcs))
    by_id = {(e.source, e.id): e for e in again}
    for r in rendered:
        e = by_id[(r["source"], r["id"])]
        assert r["prompt"] == e.prompt, r["id"]
    # and the token ids: the training tokenizer's against llama.cpp's
    from npcchat_convert.pipeline import template_of

    settings = json.loads((stock_run / "settings.json").read_text("utf-8"))
    tok = tokens.prepare(bases["stock"], template_of("reuse-v1"))
    engine_v = tokens.render_engine(
        tok, template_of("reuse-v1"), settings["flags"], 256, CFG, bundle
    )
    mine = list(records.examples(engine_v, scenarios, npcs))
    assert [e.tokens for e in mine] == [e.tokens for e in again]
    korean = [e for e in mine if any("\uac00" <= ch <= "\ud7a3" for ch in e.prompt)]
    assert korean, "the sample data carries Korean lines"


def test_merged_bundle_gives_the_trained_models_state(
    bases: dict[str, Path], stock_run: Path, stock_bundle: Path
) -> None:
    """Tags added to a stock base, LoRA merged by convert (f32): the bundle's deltas and
    flag probabilities on held-out records are the torch model's within 2e-3."""

    adapter = stock_run / "adapter"
    tj = json.loads((adapter / "tokenizer.json").read_text("utf-8"))
    specials = {t["content"] for t in tj["added_tokens"] if t["special"]}
    assert {"<STATE>", "<NPC>", "<PLAYER>"} <= specials
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        assert "base_model.model.model.embed_tokens.weight" in f.keys()  # noqa: SIM118
    held = _heldout(stock_run)
    assert len(held) >= 5
    want = _torch_outputs(bases["stock"], stock_run, held)
    got = _bundle_outputs(stock_bundle, held, CFG)
    print(f"merged f32 parity: max |diff| {np.abs(got - want).max():.2e} over {len(held)}")
    assert np.abs(got - want).max() < PARITY, np.abs(got - want).max()
    assert np.abs(want).max() > 0.01  # not a trivial agreement of zeros


def test_lora_adapter_bundle_gives_the_trained_models_state(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """The same parity through a LoRA adapter llama.cpp applies at run time (convert
    --adapter-only), not merged into the weights."""

    run = tmp_path / "run"
    report = train(_options(bases["tagged"], run), CFG)
    assert report["tokens_added"] == []
    bundle = tmp_path / "bundle"
    _convert(bases["tagged"], run, bundle, adapter_only=True)
    assert (bundle / "adapter.gguf").is_file()
    cfg = replace(CFG, runtime=replace(CFG.runtime, lora_path=str(bundle / "adapter.gguf")))
    held = _heldout(run)
    want = _torch_outputs(bases["tagged"], run, held)
    got = _bundle_outputs(bundle, held, cfg)
    print(f"LoRA adapter f32 parity: max |diff| {np.abs(got - want).max():.2e} over {len(held)}")
    assert np.abs(got - want).max() < PARITY, np.abs(got - want).max()
    without = _bundle_outputs(bundle, held, CFG)  # the adapter matters: without it, not equal
    assert np.abs(without - want).max() > PARITY


def test_every_loss_part_is_logged_and_the_best_epoch_kept(stock_run: Path) -> None:
    log = [json.loads(x) for x in (stock_run / "log.jsonl").read_text("utf-8").splitlines()]
    steps = [r for r in log if "lm" in r]
    assert steps and all({"loss", "lm", "delta", "flags", "lr", "tokens"} <= set(r) for r in steps)
    for r in steps:
        parts = r["lm"] + r["delta"] + r["flags"] + r.get("thresholds", 0.0)
        assert abs(parts - r["loss"]) < 1e-4
    epochs = [r for r in log if "heldout" in r]
    assert epochs and {"flag_f1_macro", "delta_mae", "loss", "delta", "flags"} <= set(
        epochs[0]["heldout"]
    )
    report = json.loads((stock_run / "report.json").read_text("utf-8"))
    assert report["best_epoch"] == 1 and report["tokens_per_s"] > 0


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.numpy import load_file

    for rel in (
        "adapter/adapter_model.safetensors",
        "heads/flag_head.safetensors",
        "checkpoint/adapter/adapter_model.safetensors",
        "checkpoint/heads/delta_head.safetensors",
    ):
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), (rel, k)


def test_ctrl_c_then_resume_is_the_uninterrupted_run(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted run resumed with --resume ends with the very weights of a run never
    interrupted (batch order, random state with LoRA dropout on, and optimizer restored),
    whether Ctrl-C came after a step or while an epoch's held-out records were scored."""
    from npcchat_train import loop

    dropout = LoraSettings(r=8, alpha=16.0, dropout=0.05)
    opts = _options(
        bases["tagged"], tmp_path / "whole", loop=_loop(epochs=2, batch_size=16), lora=dropout
    )
    whole = train(opts, CFG)

    # a real Ctrl-C (SIGINT) arriving in the middle of the 5th optimizer step: the step
    # is finished and logged, then the run stops
    import signal

    import torch

    real_step, steps = torch.optim.AdamW.step, []

    def step_with_ctrl_c(self: Any, *args: Any, **kw: Any) -> Any:
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kw)

    cut = replace(opts, out=tmp_path / "cut")
    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_ctrl_c)
    with pytest.raises(Interrupted) as caught:
        train(cut, CFG)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert caught.value.exit_code == 130 and "--resume" in (caught.value.hint or "")
    state = json.loads((cut.out / "checkpoint" / "state.json").read_text("utf-8"))
    assert state["step"] == 5
    # the second time, Ctrl-C lands in the first epoch's scoring
    real_score, calls = loop.score, []

    def interrupted_score(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_score(*args)

    monkeypatch.setattr(loop, "score", interrupted_score)
    with pytest.raises(Interrupted):
        train(replace(cut, resume=True), CFG)
    monkeypatch.setattr(loop, "score", real_score)
    report = train(replace(cut, resume=True), CFG)
    assert report["steps"] == whole["steps"]
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert all("heldout" in h for h in report["history"])
    assert report["best_epoch"] == whole["best_epoch"]
    _same_weights(opts.out, cut.out)
    steps = [json.loads(x) for x in (cut.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "lm" in r] == list(range(1, whole["steps"] + 1))


def test_a_stock_base_without_padding_grows_its_embeddings(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """Tags that do not fit in the matrix make it grow; the grown matrix travels with the
    adapter and convert takes it over (the tags are control tokens of the bundle)."""
    from safetensors import safe_open

    run = tmp_path / "run"
    report = train(_options(bases["tight"], run, loop=_loop(max_steps=2), heldout=0.0), CFG)
    assert report["model"]["rows_added"] == 7 and report["heldout_examples"] == 0
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "np") as f:
        rows = f.get_slice("base_model.model.model.embed_tokens.weight").get_shape()[0]
    tj = json.loads((bases["tight"] / "tokenizer.json").read_text("utf-8"))
    base_ids = set(tj["model"]["vocab"].values()) | {t["id"] for t in tj["added_tokens"]}
    assert rows == len(base_ids) + 7
    bundle = tmp_path / "bundle"
    _convert(bases["tight"], run, bundle)
    with Engine.load(load_bundle(bundle), CFG) as engine:
        assert engine.vocab.tags["<STATE>"] == rows - 7 + SCAFFOLD_TAGS.index("<STATE>")


def test_the_held_out_split_is_the_same_however_the_path_is_spelled(tmp_path: Path) -> None:
    from npcchat_train import data

    a, _ = read(SAMPLE)
    b, _ = read(Path(os.path.relpath(SAMPLE)))
    for seed in (0, 1):
        ha = [sc.id for sc in data.split(a, 0.2, seed)[1]]
        hb = [sc.id for sc in data.split(b, 0.2, seed)[1]]
        assert ha == hb and ha
    shuffled = list(reversed(a))  # order does not matter either
    assert {sc.id for sc in data.split(shuffled, 0.2, 0)[1]} == {
        sc.id for sc in data.split(a, 0.2, 0)[1]
    }
    one, _ = data.split(a[:2], 0.99, 0)
    assert one, "something is always left to train on"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NPCCHAT_HOME": str(cwd / "home")}
    env.pop("NPCCHAT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "npcchat", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def test_the_command_trains_and_writes_a_bundle_that_talks(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    r = _cli(
        str(SAMPLE),
        "--base",
        str(bases["tagged"]),
        "--out",
        "run",
        "--npcs",
        str(NPCS),
        "--max-steps",
        "3",
        "--lora-r",
        "4",
        "--rank-pattern",
        "v_proj=2",
        "--alpha-pattern",
        "v_proj=4",
        "--bundle",
        "bundle",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["steps"] == 3
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"v_proj": 2}
    assert cfg["alpha_pattern"] == {"v_proj": 4.0}
    b = report["bundle"]
    assert b["convert"]["lora_pairs"] > 0 and b["heads_fit"]["records"] == 60
    assert isinstance(b["smoke_turn"]["reply"], str)
    manifest = (tmp_path / "bundle" / "bundle.toml").read_text("utf-8")
    assert "heads_fit" in manifest
    from npcchat import api

    with api.load(tmp_path / "bundle") as rt:
        turn = rt.open(NPCS / "mother_abandoned_factory.toml", seed=1).say("안녕하세요")
        assert set(turn.deltas) == {"trust", "relationship"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--qlora", "--device", "cpu"], "--qlora: 4-bit bases need a CUDA GPU"),
        (["--lora-r", "0"], "--lora-r 0: expected a rank of at least 1"),
        (["--rank-pattern", "q_proj"], "--rank-pattern 'q_proj': expected MODULE=NUMBER"),
        (["--heldout", "1.5"], "--heldout 1.5: expected a share"),
        (["--device", "tpu"], "--device tpu: expected auto, cpu or cuda"),
        (["--bundle", "b", "--quant", "q9"], "--quant q9: expected one of"),
    ],
)
def test_bad_options_are_one_line_and_nothing_is_written(
    bases: dict[str, Path], tmp_path: Path, args: list[str], expected: str
) -> None:
    r = _cli(str(SAMPLE), "--base", str(bases["tagged"]), "--out", "run", *args, cwd=tmp_path)
    assert r.returncode == 1 and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "run").exists()


def test_bad_data_and_an_existing_run_are_refused(bases: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text("utf-8").splitlines()[0] + "\n{not json\n", "utf-8")
    r = _cli(str(bad), "--base", str(bases["tagged"]), "--out", "run", cwd=tmp_path)
    assert r.returncode == 1 and "bad.jsonl:2" in r.stderr, r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep me")
    r = _cli(str(SAMPLE), "--base", str(bases["tagged"]), "--out", "run", cwd=tmp_path)
    assert r.returncode == 1 and "never overwrites" in r.stderr
    assert (tmp_path / "run" / "mine.txt").read_text() == "keep me"
    r = _cli(str(SAMPLE), "--base", str(tmp_path), "--out", "run2", cwd=tmp_path)
    assert r.returncode == 1 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_data_that_cannot_make_a_bundle_or_fit_a_prompt_is_refused_before_training(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    r = _cli(
        str(MULTI), "--base", str(bases["tagged"]), "--out", "run", "--bundle", "b", cwd=tmp_path
    )
    assert r.returncode == 1 and "at least 5 are needed" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
    long = tmp_path / "long.jsonl"
    line = {
        "id": "long",
        "npc_id": "x",
        "player_utterance": "word " * 3000,
        "delta": {"trust": 0.1, "relationship": 0.0},
    }
    long.write_text(SAMPLE.read_text("utf-8") + json.dumps(line) + "\n", "utf-8")
    r = _cli(str(long), "--base", str(bases["tagged"]), "--out", "run", cwd=tmp_path)
    assert r.returncode == 1 and "long.jsonl:64" in r.stderr and "n_ctx" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(
        str(long),
        "--base",
        str(bases["tagged"]),
        "--out",
        "run",
        "--skip-bad-lines",
        "--max-steps",
        "1",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert any("long.jsonl:64" in n for n in json.loads(r.stdout)["notes"])


def test_the_prompt_budget_is_the_context_llama_cpp_really_makes(bases: dict[str, Path]) -> None:
    """llama.cpp pads a context to 256 tokens: training budgets prompts as talk will."""
    from npcchat import demo
    from npcchat_convert.pipeline import template_of

    cfg = replace(CFG, runtime=replace(CFG.runtime, n_ctx=1000))
    tok = tokens.prepare(bases["tagged"], template_of("served-v1"))
    rendering = tokens.render_engine(
        tok, template_of("served-v1"), ["f"], 256, cfg, bases["tagged"]
    )
    with Engine.load(load_bundle(demo.default_bundle()), cfg) as engine:
        assert rendering.model.n_ctx == engine.model.n_ctx == 1024
