"""The demo model recipe: one command from the NPC files to the bundle shipped in the package.

    pip install torch==2.13.0        # development only; the runtime never imports torch
    python -m npcchat_train.demo --out build/demo

Steps: synthetic records in English and Korean (``demo_data``: training frames; and three
quality sets, written beside them and never trained on: the training frames with other
draws, and whole held-out frames per language) -> a byte-level BPE trained on them -> a
small Qwen2 model (hidden 256: rows allow Q4_K_M) trained in torch on the reply tokens, with
the state heads on the `<STATE>` hidden state (:mod:`npcchat_train.state_heads`, the one
implementation every training here uses) so it carries the game state -> HF
checkpoint + `.pt` heads -> `npcchat convert` (Q4_K_M) -> `npcchat heads fit` on the
quantized GGUF -> copied into ``npcchat/demo/bundle``. Deterministic for a seed on one
machine (torch CPU kernels). The quality figures: ``npcchat eval build/demo/heldout_ko.jsonl``
(and ``heldout_en``, ``blind_en``, ``blind_ko``, ``intemplate``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from npcchat_convert import demo_data
from npcchat_convert.hf import Qwen2Config
from npcchat_convert.tiny import train_tokenizer
from npcchat_train import state_heads

CONFIG = Qwen2Config(256, 2, 4, 2, 512, 0, 1e-6, 1e6, 2048, True)
REPO = Path(__file__).resolve().parents[2]  # train/npcchat_train/demo.py


def build_model(cfg: Qwen2Config, n_vocab: int, n_flags: int) -> Any:
    """Qwen2 in plain torch, parameter names as Hugging Face writes them."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * self.weight

    hd, kv = cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)

    def rope(x: torch.Tensor) -> torch.Tensor:  # [B, heads, T, hd], NEOX halves
        ang = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = cfg.hidden_size
            self.q_proj, self.k_proj, self.v_proj = (
                nn.Linear(h, h),
                nn.Linear(h, kv),
                nn.Linear(h, kv),
            )
            self.o_proj = nn.Linear(h, h, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, cfg.n_heads, hd).transpose(1, 2)
            k = self.k_proj(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
            v = self.v_proj(x).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
            group = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
            return out

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, f = cfg.hidden_size, cfg.intermediate_size
            self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            return out

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = (
                RMSNorm(cfg.hidden_size),
                RMSNorm(cfg.hidden_size),
            )
            self.self_attn, self.mlp = Attn(), MLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.self_attn(self.input_layernorm(x))
            out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
            return out

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(n_vocab, cfg.hidden_size)
            self.layers = nn.ModuleList([Layer() for _ in range(cfg.n_layers)])
            self.norm = RMSNorm(cfg.hidden_size)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Body()
            heads = state_heads.heads(cfg.hidden_size, n_flags)  # named as convert reads them
            self.delta_head = heads.delta_head
            self.flag_head = heads.flag_head
            self.threshold_head = heads.threshold_head
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            """The final hidden states; :meth:`logits` of the positions that need them."""
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x)
            out: torch.Tensor = self.model.norm(x)
            return out

        def logits(self, h: torch.Tensor) -> torch.Tensor:
            # tied embeddings; only reply positions are scored (the vocabulary projection
            # of every prompt position would cost as much as the layers)
            out: torch.Tensor = h @ self.model.embed_tokens.weight.T
            return out

    return Model()


QUALITY_SETS = [
    # (file, frames, languages, seed offset)
    ("intemplate.jsonl", "train", ("en", "ko"), 1000),
    ("heldout_en.jsonl", "heldout", ("en",), 2000),
    ("heldout_ko.jsonl", "heldout", ("ko",), 3000),
    ("blind_en.jsonl", "blind", ("en",), 4000),
    ("blind_ko.jsonl", "blind", ("ko",), 5000),
]


def check_budgets(npcs: Path, tok: Any) -> None:
    """The records take every valid lore entry and description; the runtime takes them
    within its token budgets. Both agree only when everything an NPC can show at once fits,
    so a demo NPC whose entries outgrow the budgets stops the recipe here."""
    from npcchat.config import KnowledgeConfig

    budgets = KnowledgeConfig()  # the budgets a default runtime uses
    for npc in demo_data.load_npcs(npcs):
        k = npc.knowledge
        for entries, budget, what in (
            (k.lore, budgets.lore_tokens, "lore_entries"),
            (k.descriptions, budgets.description_tokens, "descriptions"),
        ):
            n = sum(len(tok.encode(e.text, add_special_tokens=False).ids) for e in entries)
            if n > budget:
                raise SystemExit(
                    f"{npc.source}: its {what} take {n} tokens together, over the runtime's "
                    f"budget of {budget}: shorten them"
                )


def encode(
    records: list[dict[str, Any]], tok: Any, template: str, state_id: int, eos: int
) -> list[dict[str, Any]]:
    player_id = tok.token_to_id("<PLAYER>")
    out = []
    for r in records:
        p = tok.encode(demo_data.prompt_text(r, template), add_special_tokens=False).ids
        reply = [*tok.encode(r["output"]["response"], add_special_tokens=False).ids, eos]
        flags = [r["output"]["flag"][f]["label"] for f in demo_data.FLAGS]
        state = p.index(state_id)
        out.append(
            {
                "ids": p + reply,
                "n_prompt": len(p),
                "player": (p.index(player_id) + 1, state),  # the player's line, as tokens
                "state": state,
                "delta": [r["output"]["delta"]["trust"], r["output"]["delta"]["relationship"]],
                "flags": flags,
            }
        )
    return out


def _batches(data: list[dict[str, Any]], batch: int, rng: Any) -> list[list[dict[str, Any]]]:
    """Shuffled batches of records of similar length (little padding), in shuffled order."""
    order = sorted(rng.permutation(len(data)), key=lambda i: len(data[i]["ids"]) // 16)
    chunks = [[data[i] for i in order[s : s + batch]] for s in range(0, len(order), batch)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


# Share of the player's tokens replaced, afresh each epoch, by tokens drawn from other
# players' lines: the words a model has never seen are noise in the line it must still
# read, so the game state learns to rest on the words that carry the intent.
TOKEN_NOISE = 0.1


def noisy(x: dict[str, Any], pool: np.ndarray, rng: Any) -> list[int]:
    """``x``'s token ids with about :data:`TOKEN_NOISE` of its player tokens replaced."""
    ids = list(x["ids"])
    lo, hi = x["player"]
    for i in range(lo, hi):
        if rng.random() < TOKEN_NOISE:
            ids[i] = int(pool[rng.integers(len(pool))])
    return ids


def train(
    model: Any,
    data: list[dict[str, Any]],
    epochs: int,
    seed: int,
    batch: int = 16,
    lr: float = 3e-3,
) -> None:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(data) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    pool = np.array([t for x in data for t in x["ids"][x["player"][0] : x["player"][1]]])
    t0 = time.time()
    for epoch in range(epochs):
        total = 0.0
        for items in _batches(data, batch, rng):
            width = max(len(x["ids"]) for x in items)
            ids = torch.zeros((len(items), width), dtype=torch.long)
            target = torch.full((len(items), width), -100, dtype=torch.long)
            for j, x in enumerate(items):
                ids[j, : len(x["ids"])] = torch.tensor(noisy(x, pool, rng))
                n = x["n_prompt"]
                target[j, n - 1 : len(x["ids"]) - 1] = torch.tensor(
                    x["ids"][n:]
                )  # predict reply + EOS
            h = model(ids)
            scored = target != -100
            lm = state_heads.lm_loss(model.logits(h[scored]), target[scored])
            hs = state_heads.state_vectors(h, [[x["state"]] for x in items])
            delta = torch.tensor([x["delta"] for x in items])
            flags = torch.tensor([x["flags"] for x in items], dtype=torch.float32)
            aux = state_heads.state_loss(model, hs, delta, flags)["total"]
            loss = lm + aux
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(items)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(data):.4f} ({time.time() - t0:.0f} s)",
            flush=True,
        )


def save(model: Any, tok_dir: Path, hf: Path, heads: Path, n_vocab: int) -> None:
    from dataclasses import replace

    import torch

    from npcchat.files.safetensors import save as save_st

    hf.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, hf / f)
    (hf / "config.json").write_text(
        json.dumps(replace(CONFIG, vocab_size=n_vocab).to_hf(), indent=2)
    )
    sd = {
        k: v.detach().float().numpy()
        for k, v in model.state_dict().items()
        if k.startswith("model.")
    }
    save_st(sd, hf / "model.safetensors")
    heads.mkdir(parents=True, exist_ok=True)
    for name in ("delta_head", "flag_head", "threshold_head"):
        torch.save(getattr(model, name).state_dict(), heads / f"{name}.pt")
    (heads / "flags.json").write_text(json.dumps({"ALL_FLAGS": demo_data.FLAGS}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Build the demo NPC bundle (needs torch, development only)."
    )
    ap.add_argument("--out", type=Path, default=REPO / "build" / "demo")
    ap.add_argument("--npcs", type=Path, default=REPO / "configs" / "npcs")
    ap.add_argument("--train", type=int, default=24000)
    ap.add_argument("--heldout", type=int, default=450, help="records per quality set")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="reuse-v1")
    ap.add_argument(
        "--install",
        type=Path,
        default=REPO / "npcchat" / "demo" / "bundle",
        help="where the finished bundle is copied (the package's demo bundle)",
    )
    args = ap.parse_args(argv)
    import torch
    from tokenizers import Tokenizer

    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_recs = demo_data.generate(args.npcs, args.train, args.seed)
    demo_data.write(train_recs, out / "train.jsonl")
    # quality sets: the training frames with other draws, and whole frames never trained on
    for name, split, langs, seed in QUALITY_SETS:
        recs = demo_data.generate(args.npcs, args.heldout, args.seed + seed, split, langs)
        demo_data.write(recs, out / name)
    corpus = [demo_data.prompt_text(r, args.template) + r["output"]["response"] for r in train_recs]
    tok_dir = out / "tokenizer"
    train_tokenizer(tok_dir, args.vocab, corpus)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    n_vocab = tok.get_vocab_size()
    state_id, eos = tok.token_to_id("<STATE>"), tok.token_to_id("<|im_end|>")
    if state_id is None or eos is None:
        raise SystemExit("the trained tokenizer lacks <STATE> or <|im_end|>")
    check_budgets(args.npcs, tok)
    data = encode(train_recs, tok, args.template, state_id, eos)
    mean_len = np.mean([len(x["ids"]) for x in data])
    print(f"{len(data)} records, {n_vocab} tokens, mean length {mean_len:.0f}")
    model = build_model(CONFIG, n_vocab, len(demo_data.FLAGS))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train(model, data, args.epochs, args.seed)
    save(model, tok_dir, out / "hf", out / "heads", n_vocab)
    build_bundle(out, args.template, args.install, args.npcs)


def build_bundle(out: Path, template: str, install: Path, npcs: Path) -> None:
    """Convert, refit the heads on the quantized GGUF, install into the package."""
    from npcchat.config import Config
    from npcchat_convert.pipeline import Options, convert
    from npcchat_heads.refit import fit_bundle

    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    report = convert(
        Options(
            base=out / "hf",
            heads=out / "heads",
            out=bundle,
            quant="q4_k_m",
            template=template,
            name="npcchat-demo",
        )
    )
    print("convert:", json.dumps(report.drift))
    fit = fit_bundle(bundle, [out / "train.jsonl"], None, Config(), seed=0)
    print("heads fit (held-out part of train):", json.dumps(fit["held_out"]["flag_f1_macro"]))
    if install.exists():
        shutil.rmtree(install)
    shutil.copytree(bundle, install)
    # the demo NPC files ship next to the bundle (``talk --npc ID``); configs/npcs is the source
    npc_dir = install.parent / "npcs"
    if npc_dir.exists():
        shutil.rmtree(npc_dir)
    npc_dir.mkdir(parents=True)
    for p in sorted(npcs.glob("*.toml")):
        shutil.copyfile(p, npc_dir / p.name)
    print(f"installed {install} ({sum(p.stat().st_size for p in install.iterdir()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
