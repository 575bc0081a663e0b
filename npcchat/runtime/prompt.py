"""The one prompt builder every command uses (talk, eval, bench, later serve).

A template is data (Jinja source) shipped inside the model bundle, because a model is only
right with the exact template it was trained on. Rendering keeps the scaffold's special
tags apart from the text around them: the template's own ``<STATE>`` becomes a
:class:`SpecialTag` part, while the same characters typed by a player stay plain text.
That is how only the scaffold can produce control tokens.

Tokenizing the parts one by one gives the same ids as tokenizing the whole string with
the Hugging Face tokenizer, because HF splits on added tokens before pre-tokenizing, and
each text part here runs from one special tag to the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, NpcchatError, PromptError
from npcchat.text import nfc
from npcchat.types import PromptInput

SCAFFOLD_TAGS = ("<SYS>", "<CTX>", "<PLAYER>", "<NPC>", "<STATE>", "<RAG>", "<PLAYER_STATE>")
STATE_TAG = "<STATE>"
NPC_TAG = "<NPC>"
PLAYER_TAG = "<PLAYER>"
DEFAULT_TEMPLATE = "served-v1"

# Each tag is carried through Jinja as one private-use character, so values inserted by
# the template can never be mistaken for a tag. Private-use characters in user values are
# replaced by U+FFFD (they have no meaning in dialogue).
_SENTINEL_BASE = 0xE000
_TAG_OF_SENTINEL = {chr(_SENTINEL_BASE + i): t for i, t in enumerate(SCAFFOLD_TAGS)}
_SENTINEL_OF_TAG = {t: s for s, t in _TAG_OF_SENTINEL.items()}
_SANITIZE = str.maketrans({s: "\ufffd" for s in _TAG_OF_SENTINEL})


@dataclass(frozen=True)
class SpecialTag:
    """A scaffold tag that must become exactly one special token."""

    text: str


Part = str | SpecialTag


@dataclass(frozen=True)
class RenderedPrompt:
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The prompt as one string, byte-exact with what training used."""
        return "".join(p.text if isinstance(p, SpecialTag) else p for p in self.parts)

    def tag_count(self, tag: str) -> int:
        return sum(1 for p in self.parts if isinstance(p, SpecialTag) and p.text == tag)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()


def builtin_template(name: str = DEFAULT_TEMPLATE) -> PromptTemplate:
    """A template shipped with npcchat (used when building bundles)."""
    try:
        src = (
            resources.files("npcchat.runtime.templates")
            .joinpath(f"{name}.jinja")
            .read_text("utf-8")
        )
    except FileNotFoundError:
        raise ConfigError(
            f"unknown built-in template '{name}'", hint=f"built-in: {DEFAULT_TEMPLATE}"
        ) from None
    return PromptTemplate(name=name, source=src)


def load_template(path: Path, name: str | None = None) -> PromptTemplate:
    try:
        src = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read prompt template ({e.strerror})") from None
    return PromptTemplate(name=name or path.stem, source=src)


def _finalize(value: Any) -> Any:
    # Python str() of every value (0.35 -> "0.35", 1.0 -> "1.0"); None renders empty.
    if value is None:
        return ""
    # NFC: llama.cpp does not normalize, and decomposed Hangul tokenizes apart from training
    return nfc(str(value)).translate(_SANITIZE)


_compiled: dict[str, Any] = {}


def _compile(template: PromptTemplate) -> Any:
    cached = _compiled.get(template.sha256)
    if cached is not None:
        return cached
    from jinja2 import TemplateSyntaxError

    from npcchat.runtime.template_sandbox import MAX_SOURCE, BoundedSandbox

    if len(template.source) > MAX_SOURCE:
        raise ConfigError(
            f"prompt template '{template.name}': {len(template.source)} characters, "
            f"more than the {MAX_SOURCE} a prompt template may have"
        )
    env = BoundedSandbox(finalize=_finalize, keep_trailing_newline=True)
    src = template.source
    for tag, sentinel in _SENTINEL_OF_TAG.items():
        src = src.replace(tag, sentinel)
    try:
        compiled = env.from_string(src)
    except TemplateSyntaxError as e:
        raise ConfigError(
            f"prompt template '{template.name}':{e.lineno}: {e.message}",
            hint="templates use Jinja syntax",
        ) from None
    except Exception as e:  # a bound hit while Jinja folds constants at compile time
        msg = " ".join(str(e).split())
        raise ConfigError(f"prompt template '{template.name}' cannot compile: {msg}") from None
    _compiled[template.sha256] = compiled
    return compiled


def _split(rendered: str) -> tuple[Part, ...]:
    parts: list[Part] = []
    buf: list[str] = []
    for ch in rendered:
        tag = _TAG_OF_SENTINEL.get(ch)
        if tag is None:
            buf.append(ch)
            continue
        if buf:
            parts.append("".join(buf))
            buf = []
        parts.append(SpecialTag(tag))
    if buf:
        parts.append("".join(buf))
    return tuple(parts)


def render_bounded(compiled: Any, variables: dict[str, Any]) -> str:
    from npcchat.runtime.template_sandbox import render_bounded as bounded

    return bounded(compiled, variables)


def render(template: PromptTemplate, inp: PromptInput) -> RenderedPrompt:
    """Render one prompt; raises PromptError when the template lacks `<STATE>` or `<NPC>`."""
    # Objects, not dicts: `player_state.items` must be the field, not dict.items.
    variables = {f.name: getattr(inp, f.name) for f in fields(inp)}
    variables["npc_location"] = inp.tags.location
    try:
        text = render_bounded(_compile(template), variables)
    except NpcchatError:
        raise  # already one line naming the template
    except Exception as e:  # jinja raises many types; all mean "the template is wrong"
        msg = " ".join(str(e).split())
        raise PromptError(f"prompt template '{template.name}' failed to render: {msg}") from None
    prompt = RenderedPrompt(_split(text))
    if prompt.tag_count(STATE_TAG) < 1:
        raise PromptError(f"prompt template '{template.name}' has no {STATE_TAG} tag")
    last = prompt.parts[-1]
    if not (isinstance(last, SpecialTag) and last.text == NPC_TAG):
        raise PromptError(f"prompt template '{template.name}' must end with {NPC_TAG}")
    return prompt


@dataclass(frozen=True)
class FittedPrompt:
    prompt: RenderedPrompt
    tokens: tuple[int, ...]
    dropped_turns: int


def fit(
    template: PromptTemplate,
    inp: PromptInput,
    tokenize: Callable[[RenderedPrompt], Sequence[int]],
    budget: int,
    pinned: int = 0,
) -> FittedPrompt:
    """Render and tokenize within ``budget`` tokens, dropping the oldest context turns first.

    The scaffold, `<STATE>` and `<NPC>` are never cut (the original right-truncated and lost
    them), nor are the first ``pinned`` context lines (recalled memories). Token count only
    grows with history, so a binary search over how many of the oldest turns to drop finds
    the longest history that fits.
    """
    head, history = inp.context[:pinned], inp.context[pinned:]

    def attempt(drop: int) -> FittedPrompt:
        trimmed = PromptInput(**{**inp.__dict__, "context": head + history[drop:]})
        prompt = render(template, trimmed)
        return FittedPrompt(prompt, tuple(tokenize(prompt)), drop)

    full = attempt(0)
    if len(full.tokens) <= budget:
        return full
    bare = attempt(len(history))
    if len(bare.tokens) > budget:
        raise PromptError(
            f"prompt needs {len(bare.tokens)} tokens even with no history, "
            f"but only {budget} fit (context size minus max tokens)",
            hint="raise --ctx, lower --max-tokens, or shorten lore/description",
        )
    lo, hi, best = 1, len(history), bare  # drop in [lo, hi]; hi is known to fit
    while lo < hi:
        mid = (lo + hi) // 2
        cand = attempt(mid)
        if len(cand.tokens) <= budget:
            hi, best = mid, cand
        else:
            lo = mid + 1
    return best if best.dropped_turns == hi else attempt(hi)
