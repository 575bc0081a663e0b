"""The tiny-model factory shared by tests, benchmarks and the demo.

It makes a Qwen2-architecture checkpoint in Hugging Face layout (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) with a byte-level BPE
tokenizer trained locally by the ``tokenizers`` library, the npcchat special tokens, and
random weights. The converter then turns it into GGUF like any real checkpoint, so every
test exercises the real conversion path. Nothing is downloaded.

Presets: ``tiny`` (hidden 256: rows allow K-quants, runs in milliseconds), and
``qwen2.5-0.5b`` / ``qwen2.5-1.5b`` (real dimensions, random weights) for benchmarks.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from npcchat.files.safetensors import save_lazy

from .hf import Qwen2Config

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<SYS>",
    "<CTX>",
    "<PLAYER>",
    "<NPC>",
    "<STATE>",
    "<RAG>",
    "<PLAYER_STATE>",
]

PRESETS = {
    "tiny": Qwen2Config(256, 2, 4, 2, 512, 0, 1e-6, 1e6, 4096, True),
    "tiny-untied": Qwen2Config(256, 2, 4, 2, 512, 0, 1e-6, 1e6, 4096, False),
    "tiny-odd": Qwen2Config(256, 2, 4, 2, 384, 0, 1e-6, 1e6, 4096, True),  # ffn_down rows of 384
    "qwen2.5-0.5b": Qwen2Config(896, 24, 14, 2, 4864, 151936, 1e-6, 1e6, 32768, True),
    "qwen2.5-1.5b": Qwen2Config(1536, 28, 12, 2, 8960, 151936, 1e-6, 1e6, 32768, True),
}

_CORPUS = [
    "Hello traveler, what brings you to the old factory?",
    "I lost my daughter here years ago. Have you seen her picture?",
    "The blacksmith forges swords by the river every morning.",
    "Give me the key and I will open the hidden path for you.",
    "You are a liar and a thief! Get out of my sight.",
    "Thank you, friend. Your kindness will not be forgotten.",
    "The forest hermit knows the old songs of the moon.",
    "Captain, when does the next ship leave the port?",
    "The apprentice mage burned her spellbook again.",
    "quest_stage=in_progress relationship=0.35 trust=0.35 npc_mood=grief",
    "player_reputation=helpful style=emotional items=forgotten_picture",
    "NPC_ID=mother_abandoned_factory NPC_LOCATION=map1 TAGS: LORE: DESCRIPTION:",
    "</SYS> </RAG> </PLAYER_STATE> </CTX> player: npc: (없음)",
    "안녕하세요, 여행자여. 이 폐공장에는 무슨 일로 오셨나요?",
    "제 딸을 찾고 있어요. 이 사진 속 아이를 본 적 있나요?",
    "고마워요. 당신의 친절은 잊지 않을게요.",
    "대장장이는 매일 아침 강가에서 칼을 벼린다.",
    "숲의 은둔자는 달의 오래된 노래를 알고 있다.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 0.5 1.0 -0.25",
]


def train_tokenizer(
    out_dir: Path,
    vocab_size: int = 1200,
    corpus: list[str] | None = None,
    scaffold: bool = True,
) -> None:
    """Train a Qwen2-style byte-level BPE and write tokenizer.json + tokenizer_config.json.
    ``scaffold=False``: without npcchat's tags, as a stock Qwen2 base has none of them."""
    specials = SPECIAL_TOKENS if scaffold else SPECIAL_TOKENS[:3]
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    qwen2_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _CORPUS * 4, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    decoder = {
        str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False}
        for t in specials
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "added_tokens_decoder": decoder,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 32768,
                "tokenizer_class": "Qwen2Tokenizer",
            },
            indent=2,
        ),
        "utf-8",
    )


def _rich_corpus() -> list[str]:
    """Prompts and replies of the demo NPCs (when the repository's configs are at hand)."""
    npcs = Path(__file__).resolve().parents[2] / "configs" / "npcs"
    if not npcs.is_dir():
        return _CORPUS * 4
    from . import demo_data

    records = demo_data.generate(npcs, 2000, seed=123)
    texts = [
        demo_data.prompt_text(r, t) + r["output"]["response"]
        for r in records
        for t in ("served-v1", "reuse-v1")
    ]
    return texts + _CORPUS * 4


def tensor_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of a Qwen2 model (torch Linear layout [out, in])."""
    h, kv = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        }
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = 0.08) -> np.ndarray:
    """A reproducible random tensor; norms near 1 so activations stay in a sane range.

    Real-size presets use HF's Qwen2 ``initializer_range`` (0.02): with a larger std a deep
    random network amplifies any perturbation, quantization noise included."""
    rng = np.random.default_rng([seed, *name.encode()])
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    scale = std if len(shape) == 2 else std / 2
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def make_checkpoint(
    out_dir: Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "f32",
    vocab_size: int | None = None,
    scaffold: bool = True,
) -> Qwen2Config:
    """Write a random HF-layout Qwen2 checkpoint with a locally trained tokenizer
    (``scaffold=False``: one that lacks npcchat's tags, as a stock base does)."""
    from dataclasses import replace

    out_dir.mkdir(parents=True, exist_ok=True)
    if preset.startswith("qwen"):
        # real-size presets get a tokenizer that compresses prompts about as well as a real
        # one does (a few chars per token), or every token count of a benchmark is inflated
        train_tokenizer(out_dir, 8000, _rich_corpus(), scaffold=scaffold)
    else:
        train_tokenizer(out_dir, scaffold=scaffold)
    n_tok = len(json.loads((out_dir / "tokenizer.json").read_text("utf-8"))["model"]["vocab"])
    cfg = PRESETS[preset]
    want = vocab_size or cfg.vocab_size or n_tok
    cfg = replace(cfg, vocab_size=max(want, n_tok))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2), "utf-8")
    std = 0.02 if preset.startswith("qwen") else 0.08
    entries = [
        (name, shape, partial(random_tensor, name, shape, seed, std))
        for name, shape in tensor_shapes(cfg).items()
    ]
    save_lazy(entries, out_dir / "model.safetensors", dtype=dtype)
    return cfg


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, int]]:
    shapes = tensor_shapes(cfg)
    return {
        name[: -len(".weight")]: (shape[0], shape[1])
        for name, shape in shapes.items()
        if name.endswith("_proj.weight")
    }


def make_adapter(
    out_dir: Path,
    base: Path,
    r: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    seed: int = 1,
    targets: tuple[str, ...] = LORA_TARGETS,
    new_tokens: tuple[str, ...] = (),
    std: float = 0.05,
) -> dict[str, object]:
    """A PEFT-layout LoRA adapter for the checkpoint at ``base`` with non-zero A and B.

    ``new_tokens`` resizes the vocabulary: the adapter then carries the trained tokenizer
    (base tokens plus the new special tokens) and full ``embed_tokens`` (and ``lm_head``
    when the base is untied), as PEFT's ``save_embedding_layers`` writes them.
    """
    from .hf import read_config

    cfg = read_config(base)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for module, (n_out, n_in) in _module_shapes(cfg).items():
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, n_in)) * std).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, r)) * std).astype(np.float32)
    if new_tokens:
        tok = json.loads((base / "tokenizer.json").read_text("utf-8"))
        tc = json.loads((base / "tokenizer_config.json").read_text("utf-8"))
        used = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]
        next_id = max(used) + 1
        for text in new_tokens:
            tok["added_tokens"].append(
                {
                    "id": next_id,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )
            tc["added_tokens_decoder"][str(next_id)] = {"content": text, "special": True}
            next_id += 1
        (out_dir / "tokenizer.json").write_text(json.dumps(tok), "utf-8")
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tc), "utf-8")
        rows = next_id
        embed = (rng.standard_normal((rows, cfg.hidden_size)) * 0.08).astype(np.float32)
        tensors["base_model.model.model.embed_tokens.weight"] = embed
        if not cfg.tie_embeddings:
            head = (rng.standard_normal((rows, cfg.hidden_size)) * 0.08).astype(np.float32)
            tensors["base_model.model.lm_head.weight"] = head
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.1,
        "bias": "none",
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "base_model_name_or_path": str(base),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    from npcchat.files.safetensors import save

    save(tensors, out_dir / "adapter_model.safetensors")
    return config


def shard_checkpoint(root: Path, shards: int = 2) -> None:
    """Split ``model.safetensors`` into shards with an index, as HF writes big models."""
    from npcchat.files.safetensors import SafeFile, save

    src = SafeFile(root / "model.safetensors")
    names = src.names()
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per : (i + 1) * per]
        save({n: src.get(n) for n in part}, root / fname)
        weight_map |= dict.fromkeys(part, fname)
    (root / "model.safetensors").unlink()
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index), "utf-8")


DEMO_FLAGS = [
    "give_item",
    "end_npc_main_story",
    "quest_stage_change",
    "change_game_state",
    "change_player_state",
    "npc_action",
    "unlock_hidden_path",
    "give_hint",
    "change_npc_state",
]


def build_bundle(
    work: Path,
    preset: str = "tiny",
    quant: str = "q4_k_m",
    seed: int = 0,
    flags: list[str] | None = None,
    vocab_size: int | None = None,
    template: str = "served-v1",
) -> Path:
    """Random checkpoint -> GGUF (f32, and ``quant``) -> bundle with random ONNX heads.

    Returns the bundle directory ``work/bundle-{quant}``; ``work/hf`` keeps the checkpoint
    and ``work/model-f32.gguf`` the unquantized model (the numpy reference reads it).
    """
    from npcchat.runtime.bundle import write_manifest
    from npcchat.runtime.prompt import builtin_template
    from npcchat_heads import onnx_builder

    from .model import hf_to_gguf

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        dtype = "bf16" if preset.startswith("qwen") else "f32"  # real checkpoints ship bf16
        make_checkpoint(hf, preset, seed, dtype=dtype, vocab_size=vocab_size)
    cfg_hidden = json.loads((hf / "config.json").read_text("utf-8"))["hidden_size"]
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        hf_to_gguf(hf, f32, "f16" if preset.startswith("qwen") else "f32", name=f"random-{preset}")
    out = work / (f"bundle-{quant}" if template == "served-v1" else f"bundle-{quant}-{template}")
    out.mkdir(parents=True, exist_ok=True)
    if quant == "f32":
        import shutil

        shutil.copyfile(f32, out / "model.gguf")
    else:
        from npcchat.runtime.backend import quantize

        quantize(f32, out / "model.gguf", quant)
    flag_names = flags or DEMO_FLAGS
    onnx_builder.write(
        onnx_builder.random_weights(cfg_hidden, len(flag_names), seed),
        flag_names,
        out / "heads.onnx",
    )
    write_manifest(
        out,
        name=f"random-{preset}-{quant}",
        gguf="model.gguf",
        heads="heads.onnx",
        template=builtin_template(template),
        flags=flag_names,
        hidden_size=cfg_hidden,
        quant=quant,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m npcchat_convert.tiny --preset qwen2.5-0.5b --out DIR``: a random bundle."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument(
        "--out", type=Path, required=True, help="work directory (hf/, GGUFs, bundle-*/)"
    )
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="served-v1", help="built-in prompt template")
    args = ap.parse_args(argv)
    print(build_bundle(args.out, args.preset, args.quant, args.seed, template=args.template))


if __name__ == "__main__":
    main()
