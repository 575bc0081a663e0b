"""The token ids the engine needs from a GGUF vocabulary, checked once at load."""

from __future__ import annotations

from dataclasses import dataclass

from npcchat.errors import BundleError
from npcchat.runtime import prompt as prompt_mod
from npcchat.runtime.model import ModelLike
from npcchat.runtime.prompt import SCAFFOLD_TAGS

END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Vocab:
    """Token ids the engine needs, checked once at load."""

    tags: dict[str, int]
    stop: frozenset[int]


def check_vocab(model: ModelLike, bundle_name: str) -> Vocab:
    """Every scaffold tag must be exactly one control token of the GGUF vocabulary."""
    tags: dict[str, int] = {}
    for tag in SCAFFOLD_TAGS:
        ids = model.tokenize(tag, special=True)
        if len(ids) != 1 or not model.is_control(ids[0]):
            if tag in (prompt_mod.STATE_TAG, prompt_mod.NPC_TAG):
                raise BundleError(
                    f"{bundle_name}: {tag} is not a single control token of the GGUF vocabulary "
                    f"(tokenizes to {ids})",
                    hint="the model must be trained with npcchat's special tokens",
                )
            continue  # a template that never uses this tag still works
        tags[tag] = ids[0]
    stop = set(tags.values()) | {model.eos()}
    for text in END_TOKENS:
        ids = model.tokenize(text, special=True)
        if len(ids) == 1 and model.is_control(ids[0]):
            stop.add(ids[0])
    return Vocab(tags=tags, stop=frozenset(stop))
