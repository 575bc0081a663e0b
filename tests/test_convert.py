"""`npcchat convert`: merge, write, quantize, heads to ONNX, verify; no torch anywhere."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from torchfmt import save as save_pt
from torchfmt import write_heads

from npcchat.config import Config, RuntimeConfig
from npcchat.errors import ConvertError
from npcchat.runtime.bundle import load as load_bundle
from npcchat.runtime.engine import Engine, load_engine
from npcchat.runtime.heads import Heads
from npcchat.sessions.session import Session
from npcchat.types import Tags
from npcchat_convert import tiny
from npcchat_convert.gguf_out import gguf_name
from npcchat_convert.hf import Checkpoint, read_config
from npcchat_convert.pipeline import Options, convert
from npcchat_convert.reference import RefModel
from npcchat_heads import onnx_builder

pytestmark = pytest.mark.model
FLAGS = ["give_item", "npc_action", "give_hint"]
TEXT = "Hello <STATE> traveler! 안녕하세요, 여행자여. <NPC>The key? <|im_end|> 0.35 </SYS>"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "hf"
    tiny.make_checkpoint(root, "tiny", seed=5, dtype="bf16")
    return root


def reference(base: Path, adapter: Path | None = None) -> RefModel:
    """base (+ LoRA merged in numpy, float64) as a RefModel: independent of the converter."""
    ckpt = Checkpoint(base)
    cfg = ckpt.config
    ad_cfg: dict[str, object] = {}
    ad: dict[str, np.ndarray] = {}
    if adapter is not None:
        from npcchat.files.safetensors import SafeFile

        ad_cfg = json.loads((adapter / "adapter_config.json").read_text())
        f = SafeFile(adapter / "adapter_model.safetensors")
        ad = {k: f.get(k).astype(np.float64) for k in f.names()}
    r, alpha = float(ad_cfg.get("r", 1)), float(ad_cfg.get("lora_alpha", 1))  # type: ignore[arg-type]
    scale = alpha / (math.sqrt(r) if ad_cfg.get("use_rslora") else r)
    tensors = {}
    for name in ckpt.names():
        key = "base_model.model." + name
        w = ad.get(key, ckpt.get(name).astype(np.float64))
        a_key = key.replace(".weight", ".lora_A.weight")
        if a_key in ad:
            w = w + scale * ad[a_key.replace("lora_A", "lora_B")] @ ad[a_key]
        gname = gguf_name(name)
        if gname:
            tensors[gname] = w
    if "base_model.model.model.embed_tokens.weight" in ad:
        tensors["token_embd.weight"] = ad["base_model.model.model.embed_tokens.weight"]
    if "base_model.model.lm_head.weight" in ad:
        tensors["output.weight"] = ad["base_model.model.lm_head.weight"]
    return RefModel(tensors, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.rms_eps, cfg.rope_theta)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def state_and_logits(
    engine: Engine, player: str = "I brought the key. 열쇠를 가져왔어요."
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    import llama_cpp as ll

    s = Session(
        npc_id="smith", tags=Tags(quest_stage="start", location="forge"), lore="Swords and ore."
    )
    vec, tokens = engine.state_vector(engine.fit(engine.prompt_input(s, player), 8))
    m = engine.model
    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(m._ctx, -1), shape=(m.n_vocab,)).copy()
    return vec, logits, tokens


def check_against_reference(bundle: Path, ref: RefModel, lora: Path | None = None) -> None:
    cfg = Config(runtime=RuntimeConfig(lora_path=str(lora) if lora else ""))
    with load_engine(bundle, cfg) as engine:
        vec, logits, tokens = state_and_logits(engine)
        sid = engine.vocab.tags["<STATE>"]
    hidden = ref.hidden(tokens)
    assert cos(vec, hidden[tokens.index(sid)]) >= 0.99999
    assert cos(logits, ref.logits(hidden[-1:])[0]) >= 0.99999


def test_merged_lora_matches_numpy_reference(base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    tiny.make_adapter(adapter, base, r=4, alpha=16)
    heads = tmp_path / "heads"
    write_heads(heads, 256, FLAGS)
    out = tmp_path / "bundle"
    report = convert(Options(base=base, adapter=adapter, heads=heads, out=out, quant="f32"))
    assert report.lora_pairs == 2 * 7 and report.flags == FLAGS
    check_against_reference(out, reference(base, adapter))
    # the LoRA really moved the model: the base alone is far from the merged reference
    with load_engine(out, Config()) as engine:
        vec, _, tokens = state_and_logits(engine)
    plain = reference(base).hidden(tokens)[tokens.index(engine.vocab.tags["<STATE>"])]
    assert cos(vec, plain) < 0.999


def test_rslora_scaling(base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    tiny.make_adapter(adapter, base, r=16, alpha=8, rslora=True)
    out = tmp_path / "bundle"
    convert(Options(base=base, adapter=adapter, out=out, quant="f32", verify=False))
    check_against_reference(out, reference(base, adapter))


def test_runtime_adapter_matches_merged_model(base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    tiny.make_adapter(adapter, base, r=4, alpha=8, rslora=True)
    merged, runtime = tmp_path / "merged", tmp_path / "runtime"
    convert(Options(base=base, adapter=adapter, out=merged, quant="f32"))
    report = convert(
        Options(base=base, adapter=adapter, out=runtime, quant="f32", adapter_only=True)
    )
    assert report.adapter_file == "adapter.gguf" and (runtime / "adapter.gguf").is_file()
    with load_engine(merged, Config()) as engine:
        want, want_logits, _ = state_and_logits(engine)
    lora_cfg = Config(runtime=RuntimeConfig(lora_path=str(runtime / "adapter.gguf")))
    with load_engine(runtime, lora_cfg) as engine:
        got, got_logits, _ = state_and_logits(engine)
    assert cos(got, want) >= 0.9999 and cos(got_logits, want_logits) >= 0.9999
    with load_engine(runtime, Config()) as engine:  # without --lora: the base model
        base_vec, _, _ = state_and_logits(engine)
    assert cos(base_vec, want) < 0.999


def test_sharded_and_untied_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    tiny.make_checkpoint(root, "tiny-untied", seed=2)
    tiny.shard_checkpoint(root, 3)
    assert not (root / "model.safetensors").exists()
    assert not read_config(root).tie_embeddings
    out = tmp_path / "bundle"
    convert(Options(base=root, out=out, quant="f32"))
    check_against_reference(out, reference(root))
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert "output.weight" in names


def test_tied_checkpoint_has_no_output_tensor(base: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "bundle"
    convert(Options(base=base, out=out, quant="f32"))
    names = {t.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


@pytest.mark.parametrize("padded_rows", [None, 1024])
def test_resized_vocabulary(tmp_path: Path, padded_rows: int | None) -> None:
    """Adapter with new special tokens; the base is unpadded (adapter larger) or padded to
    1024 rows (adapter smaller). Token ids from the GGUF equal the `tokenizers` library's."""
    tokenizers = pytest.importorskip("tokenizers")
    root = tmp_path / "hf"
    tiny.make_checkpoint(root, "tiny-untied", seed=3, vocab_size=padded_rows)
    adapter = tmp_path / "adapter"
    tiny.make_adapter(adapter, root, new_tokens=("<QUEST>", "<ITEM>"))
    out = tmp_path / "bundle"
    convert(Options(base=root, adapter=adapter, out=out, quant="f32", verify=False))
    check_against_reference(out, reference(root, adapter))
    hf = tokenizers.Tokenizer.from_file(str(adapter / "tokenizer.json"))
    # the trained vocab already holds the 10 specials; the adapter adds 2 tokens
    n_rows = len(json.loads((adapter / "tokenizer.json").read_text())["model"]["vocab"]) + 2
    with load_engine(out, Config()) as engine:
        assert engine.model.n_vocab == n_rows
        if padded_rows:
            assert n_rows < padded_rows
        for text in (TEXT + " <QUEST><ITEM>", "plain 한국어 text", "<ITEM>"):
            assert (
                engine.model.tokenize(text, special=True)
                == hf.encode(text, add_special_tokens=False).ids
            )
        assert len(engine.model.tokenize("<QUEST>", special=True)) == 1


def test_gguf_token_ids_equal_tokenizers_library(bundle_q4: Path, tiny_work: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tiny_work / "hf" / "tokenizer.json"))
    with load_engine(bundle_q4, Config()) as engine:
        for text in (
            TEXT,
            "",
            " ",
            "\n\n",
            "줄바꿈\n  두 칸",
            "it's 12345 <PLAYER_STATE>x</PLAYER_STATE>",
        ):
            assert (
                engine.model.tokenize(text, special=True)
                == hf.encode(text, add_special_tokens=False).ids
            )


def test_heads_from_pt_and_safetensors_match_numpy(base: Path, tmp_path: Path) -> None:
    for fmt, thr in (("pt", "threshold_head"), ("safetensors", "flag_threshold_head")):
        heads = tmp_path / f"heads-{fmt}"
        w = write_heads(heads, 256, FLAGS, fmt=fmt, threshold_name=thr)
        out = tmp_path / f"bundle-{fmt}"
        convert(Options(base=base, heads=heads, out=out, quant="f32", verify=False))
        b = load_bundle(out)
        assert b.flags == tuple(FLAGS) and b.heads is not None
        runner = Heads(b.heads, b.flags, 256)
        x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        weights = onnx_builder.HeadWeights(
            w["delta_head.weight"],
            w["delta_head.bias"],
            w["flag_head.weight"],
            w["flag_head.bias"],
            w[f"{thr}.weight"],
            w[f"{thr}.bias"],
        )
        for got, want in zip(runner.run_batch(x), onnx_builder.reference(weights, x), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_pt_pickle_that_runs_code_is_refused(base: Path, tmp_path: Path) -> None:
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    heads = tmp_path / "heads"
    write_heads(heads, 256, FLAGS)
    rng = np.random.default_rng(0)
    save_pt(
        {"weight": rng.standard_normal((2, 256)), "bias": np.zeros(2)},
        heads / "delta_head.pt",
        extra=Evil(),
    )
    with pytest.raises(
        ConvertError,
        match=r"delta_head\.pt: refusing to load: its pickle asks for (posix|os)\.system",
    ):
        convert(Options(base=base, heads=heads, out=tmp_path / "b", quant="f32"))
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


def test_quantized_bundle_reports_drift_and_fallbacks(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    tiny.make_checkpoint(root, "tiny-odd", seed=4)
    heads = tmp_path / "heads"
    write_heads(heads, 256, FLAGS)
    out = tmp_path / "bundle"
    report = convert(Options(base=root, heads=heads, out=out, quant="q4_k_m"))
    assert {f["tensor"] for f in report.fallbacks} == {
        "blk.0.ffn_down.weight",
        "blk.1.ffn_down.weight",
    }
    assert all(f["row"] == 384 and f["type"] not in ("Q4_K", "Q6_K") for f in report.fallbacks)
    d = report.drift
    assert d is not None and d["prompts"] >= 5
    assert 0.9 < d["cosine_min"] <= d["cosine_mean"] < 1.0
    assert (
        d["head_max_abs_diff"] > 0
        and 0 <= d["flag_flips"] <= d["flag_decisions"] == 5 * 0 + d["prompts"] * 3
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "bundle.toml",
        "heads.onnx",
        "model.gguf",
        "prompt.jinja",
    ]
    manifest = (out / "bundle.toml").read_text()
    assert "adapter_config" not in manifest and "base_config.json" in manifest


def test_errors(base: Path, tmp_path: Path) -> None:
    # unsupported architecture
    bad = tmp_path / "llama"
    shutil.copytree(base, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="architecture LlamaForCausalLM is not supported"):
        convert(Options(base=bad, out=tmp_path / "o1"))
    # missing files
    with pytest.raises(ConvertError, match=r"config\.json: file not found"):
        convert(Options(base=tmp_path / "nowhere", out=tmp_path / "o2"))
    with pytest.raises(ConvertError, match=r"adapter_config\.json: file not found"):
        convert(Options(base=base, adapter=tmp_path, out=tmp_path / "o3"))
    # an adapter for a bigger model: targets layers the base lacks
    other = tmp_path / "other"
    tiny.make_checkpoint(other, "tiny", seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    from npcchat.files.safetensors import SafeFile, save

    f = SafeFile(other / "model.safetensors")
    tensors = {k: f.get(k) for k in f.names()}
    for k in [k for k in tensors if k.startswith("model.layers.1.")]:
        tensors[k.replace("layers.1.", "layers.2.")] = tensors[k]
    save(tensors, other / "model.safetensors")
    adapter = tmp_path / "adapter3"
    tiny.make_adapter(adapter, other)
    with pytest.raises(
        ConvertError, match=r"targets 7 module.s. the base model lacks, first model\.layers\.2"
    ):
        convert(Options(base=base, adapter=adapter, out=tmp_path / "o4"))
    # shape mismatch inside the adapter
    adapter = tmp_path / "adapter4"
    tiny.make_adapter(adapter, base)
    f = SafeFile(adapter / "adapter_model.safetensors")
    t = {k: f.get(k) for k in f.names()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    t[key] = np.zeros((128, 4), np.float32)
    save(t, adapter / "adapter_model.safetensors")
    with pytest.raises(
        ConvertError,
        match=r"q_proj: LoRA delta has shape \(128, 256\), the base weight \(256, 256\)",
    ):
        convert(Options(base=base, adapter=adapter, out=tmp_path / "o5", quant="f32"))
    assert not (tmp_path / "o5").exists() and not list(tmp_path.glob(".o5.partial-*"))
    # non-finite weights
    t[key] = np.full((256, 4), np.nan, np.float32)
    save(t, adapter / "adapter_model.safetensors")
    with pytest.raises(ConvertError, match=r"attn_q\.weight: holds NaN"):
        convert(Options(base=base, adapter=adapter, out=tmp_path / "o6", quant="f32"))
    # an existing bundle is never overwritten
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    with pytest.raises(ConvertError, match="already exists and is not empty"):
        convert(Options(base=base, out=keep))
    assert (keep / "mine.txt").read_text() == "x"


def test_full_disk_leaves_nothing(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from npcchat_convert import gguf_out

    real = gguf_out._CastWriter.tofile
    calls = [0]

    def failing(self, fout):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fout)

    monkeypatch.setattr(gguf_out._CastWriter, "tofile", failing)
    out = tmp_path / "bundle"
    with pytest.raises(ConvertError, match=r"\(no space left on device\); nothing was left behind"):
        convert(Options(base=base, out=out, quant="f32"))
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_json(base: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    heads = tmp_path / "heads"
    write_heads(heads, 256, FLAGS)
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "convert",
            "--base",
            str(base),
            "--heads",
            str(heads),
            "--out",
            str(out),
            "--quant",
            "q8_0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["quant"] == "q8_0" and report["drift"]["cosine_min"] > 0.99
    talk = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "talk",
            "--bundle",
            str(out),
            "--say",
            "hi",
            "--json",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert talk.returncode == 0, talk.stderr
    assert list(json.loads(talk.stdout)["flags"]) == FLAGS
    again = subprocess.run(
        [sys.executable, "-m", "npcchat", "convert", "--base", str(base), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        again.returncode == 1
        and again.stderr.startswith("error: ")
        and "Traceback" not in again.stderr
    )
