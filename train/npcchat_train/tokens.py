"""The base model's tokenizer, made ready for npcchat's prompts, and a vocabulary-only model
through which the runtime renders the training prompts.

A base that lacks the scaffold tags (`<STATE>`, `<NPC>`, ... as the bundle's template uses
them) gets them added as *special* tokens: the runtime decodes them as single control ids,
and a player who types ``<STATE>`` gets plain text, never the tag. The changed tokenizer is
written beside the adapter (``tokenizer.json``, ``tokenizer_config.json``), where
``npcchat convert`` looks for the tokenizer of a resized vocabulary.

:class:`VocabModel` is the runtime's :class:`npcchat.runtime.model.ModelLike` with a
vocabulary and nothing else: with it, the runtime's own :class:`npcchat.runtime.engine.Engine`
and :class:`npcchat.Conversation` pick lore within their token budgets, recall memories and
render the bundle's template, so training sees the prompts talk will decode, without a GGUF
(there is none before training). Decoding through it is a programming error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npcchat.config import Config
from npcchat.errors import ConfigError
from npcchat.runtime.bundle import Bundle
from npcchat.runtime.engine import Engine
from npcchat.runtime.prefill import Chunk
from npcchat.runtime.prompt import NPC_TAG, SCAFFOLD_TAGS, STATE_TAG, PromptTemplate
from npcchat.runtime.vocab import END_TOKENS
from npcchat.types import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TrainTokenizer:
    """The tokenizer training encodes with: the base's, plus the tags it lacked."""

    tokenizer: Any  # tokenizers.Tokenizer, special tokens split as plain text when encoding
    added: tuple[str, ...]  # scaffold tags this run added (empty: the base had them all)
    eos: int  # the token that ends a reply (the tokenizer config's eos_token)
    files: dict[str, str]  # tokenizer.json / tokenizer_config.json contents to save

    @property
    def n_vocab(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def added_ids(self) -> list[int]:
        return [self.id_of(t) for t in self.added]

    def id_of(self, text: str) -> int:
        tid = self.tokenizer.token_to_id(text)
        if tid is None:
            raise ConfigError(f"the tokenizer has no token {text}")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        """Plain text: a typed `<STATE>` stays text (as llama.cpp's parse_special=False)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (out / name).write_text(text, "utf-8")


def needed_tags(template: PromptTemplate) -> list[str]:
    """The tags the template uses, `<STATE>` and `<NPC>` always (as convert checks)."""
    return [t for t in SCAFFOLD_TAGS if t in template.source or t in (STATE_TAG, NPC_TAG)]


def prepare(base: Path, template: PromptTemplate) -> TrainTokenizer:
    """Read the base's tokenizer and add every scaffold tag it lacks as a special token.
    A tag the base has as a *non-special* token is refused: its id would stay plain text
    for llama.cpp, so the runtime could not find `<STATE>`."""
    from tokenizers import AddedToken, Tokenizer

    from npcchat_convert.hf import read_tokenizer

    tj_path, tc_path = base / "tokenizer.json", base / "tokenizer_config.json"
    if not tj_path.is_file():
        raise ConfigError(
            f"{tj_path}: file not found",
            hint="--base must be a Hugging Face model directory with a fast tokenizer",
        )
    # what convert will demand of it (Qwen2's BPE and pre-tokenizer, bounded in size),
    # checked now rather than after the training
    read_tokenizer(base)
    try:
        tok = Tokenizer.from_file(str(tj_path))
        config = json.loads(tc_path.read_text("utf-8")) if tc_path.is_file() else {}
    except (OSError, ValueError, Exception) as e:  # tokenizers raises plain Exception
        raise ConfigError(f"{tj_path}: not a readable tokenizer ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{tc_path}: expected a JSON object")
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    added: list[str] = []
    for tag in needed_tags(template):
        if tag in specials:
            continue
        if tok.token_to_id(tag) is not None:
            raise ConfigError(
                f"{tj_path}: {tag} is a plain token of this tokenizer, not a special one",
                hint="mark it special in tokenizer.json, or train from a base without it",
            )
        added.append(tag)
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        decoder = dict(config.get("added_tokens_decoder") or {})
        for tag in added:
            decoder[str(tok.token_to_id(tag))] = {
                "content": tag,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
        config["added_tokens_decoder"] = decoder
    eos_text = config.get("eos_token")
    if isinstance(eos_text, dict):
        eos_text = eos_text.get("content")
    eos = tok.token_to_id(eos_text) if isinstance(eos_text, str) else None
    if eos is None:
        eos = next((tok.token_to_id(t) for t in END_TOKENS if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise ConfigError(
            f"{tc_path}: key 'eos_token': no end-of-reply token (nor <|im_end|>, <|endoftext|>)",
            hint="a reply must end with a token the runtime stops on",
        )
    files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}
    tok.encode_special_tokens = True  # plain text from here on: specials never parsed
    return TrainTokenizer(tok, tuple(added), int(eos), files)


class VocabModel:
    """:class:`npcchat.runtime.model.ModelLike` with a vocabulary only (see the module)."""

    n_seq = 1

    def __init__(self, tok: TrainTokenizer, hidden_size: int, n_ctx: int, n_batch: int) -> None:
        self._tok = tok
        self.n_embd = hidden_size
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        specials = tok.tokenizer.get_added_tokens_decoder()
        self._control = {int(i) for i, t in specials.items() if t.special}
        self._by_text = {t.content: int(i) for i, t in specials.items() if t.special}
        self._eog = {tok.eos} | {self._by_text[t] for t in END_TOKENS if t in self._by_text}

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        if special and text in self._by_text:
            return [self._by_text[text]]
        return self._tok.encode(text)

    def piece(self, token: int) -> bytes:
        if token in self._control:
            return b""
        return str(self._tok.tokenizer.decode([token], skip_special_tokens=False)).encode()

    def is_control(self, token: int) -> bool:
        return token in self._control

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def eos(self) -> int:
        return self._tok.eos

    def _no_decoding(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("VocabModel renders prompts; it has no weights to decode with")

    def prefill_chunk(
        self, tokens: Sequence[int], chunk: Chunk, outputs: Sequence[int], seq: int = 0
    ) -> dict[int, np.ndarray]:
        return self._no_decoding()  # type: ignore[no-any-return]

    def extend(self, tokens: Sequence[int], start: int, seq: int = 0) -> None:
        self._no_decoding()

    def share(self, src: int, dst: int, keep: int) -> None:
        self._no_decoding()

    def new_sampler(self, params: SamplingParams, seed: int, seq: int = 0) -> None:
        self._no_decoding()

    def sample(self, seq: int = 0, idx: int = -1) -> int:
        return self._no_decoding()  # type: ignore[no-any-return]

    def sample_banned(self, banned: Sequence[int], seq: int = 0, idx: int = -1) -> int:
        return self._no_decoding()  # type: ignore[no-any-return]

    def step(self, token: int, pos: int, seq: int = 0) -> None:
        self._no_decoding()

    def choose(self, tokens: Sequence[int], pos: int, grammar: str, seq: int = 0) -> list[int]:
        return self._no_decoding()  # type: ignore[no-any-return]

    def step_many(self, items: Sequence[tuple[int, int, int]]) -> None:
        self._no_decoding()

    def keep_prefix(self, n: int, seq: int = 0) -> None:
        self._no_decoding()

    def state_get(self, seq: int = 0) -> bytes:
        return self._no_decoding()  # type: ignore[no-any-return]

    def state_set(self, seq: int, data: bytes) -> bool:
        return self._no_decoding()  # type: ignore[no-any-return]

    def close(self) -> None:
        pass


def render_engine(
    tok: TrainTokenizer,
    template: PromptTemplate,
    flags: Sequence[str],
    hidden_size: int,
    cfg: Config,
    root: Path,
) -> Engine:
    """The runtime's engine over :class:`VocabModel`: it fits and renders prompts exactly
    as a bundle of this tokenizer and template will (no heads, no weights)."""
    bundle = Bundle(
        root=root,
        name="training prompts",
        gguf=root / "(no model yet)",
        gguf_sha256="",
        heads=None,
        heads_sha256="",
        flags=tuple(flags),
        hidden_size=hidden_size,
        template=template,
        quant="none",
        manifest={},
    )
    # llama.cpp pads a context to a multiple of 256 tokens (llama-context.cpp), and the
    # prompt's budget is what the context really holds
    n_ctx = -(-cfg.runtime.n_ctx // 256) * 256
    model = VocabModel(tok, hidden_size, n_ctx, cfg.runtime.n_batch)
    return Engine(bundle, cfg, model, None)
