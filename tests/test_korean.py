"""Korean (and any text) where npcchat matches it: triggers, retrieval, similarity, prompts."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from npcchat.errors import ConfigError
from npcchat.eval import metrics
from npcchat.mind import npc
from npcchat.mind.embed import LexicalEmbedder, rank
from npcchat.mind.knowledge import Trigger
from npcchat.runtime.prompt import builtin_template, render
from npcchat.types import PromptInput, Tags


def _trigger(*phrases: str) -> Trigger:
    from npcchat.text import for_matching

    return Trigger(tuple(for_matching(p) for p in phrases), "그만해.", -0.2, -0.2)


@pytest.mark.parametrize(
    "said", ["바보", "이 바보", "이 바보야", "바보야!", "바보같은 소리", "너 진짜 바보구나"]
)
def test_a_korean_insult_fires_with_its_particles_and_endings(said: str) -> None:
    assert _trigger("바보").matches(said)


@pytest.mark.parametrize("said", ["바다를 봤어요", "바", "보바", "안녕하세요"])
def test_a_korean_trigger_does_not_fire_inside_other_words(said: str) -> None:
    assert not _trigger("바보").matches(said)


@pytest.mark.parametrize(
    "said",
    ["ｉｄｉｏｔ", "You IDIOT!", "id\u200biot", "i\u00addiot", "Ｓｈｕｔ ｕｐ", "shut   up!!"],
)
def test_full_width_zero_width_case_and_punctuation_do_not_slip_past(said: str) -> None:
    assert _trigger("idiot", "shut up!").matches(said)
    assert not _trigger("idiot").matches("idiotic question")  # Latin words stay whole


INVISIBLE = [
    "\u2063",  # invisible separator
    "\u2062",  # invisible times
    "\u034f",  # combining grapheme joiner
    "\ufe0f",  # variation selector 16
    "\U000e0020",  # tag space
    "\u200e",  # left-to-right mark
    "\u3164",  # Hangul filler
    "\uffa0",  # half-width Hangul filler
    "\u115f",  # Hangul choseong filler
    "\u1160",  # Hangul jungseong filler
    "\u200b",  # zero-width space
    "\u061c",  # Arabic letter mark
    "\U000e0100",  # variation selector 17
]


@pytest.mark.parametrize("mark", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_invisible_characters_inside_a_word_do_not_defeat_a_trigger(mark: str) -> None:
    assert _trigger("바보").matches(f"이 바{mark}보야")
    assert _trigger("idiot").matches(f"you id{mark}iot")
    assert _trigger("바보").matches(f"{mark}바보{mark}")


def test_an_invisible_character_inside_a_decomposed_syllable_is_removed_before_nfkc() -> None:
    ba = unicodedata.normalize("NFD", "바")  # two conjoining jamo
    assert _trigger("바보").matches(f"이 {ba[0]}\u200b{ba[1]}보야")
    assert _trigger("바보").matches("이 ㅂ\u200bㅏ보야")  # compatibility jamo typed one by one


def test_every_default_ignorable_code_point_is_stripped() -> None:
    from npcchat.text import IGNORABLE_RANGES, strip_ignorable

    every = "".join(chr(c) for a, b in IGNORABLE_RANGES for c in range(a, b + 1))
    assert strip_ignorable(f"a{every}b") == "ab"
    assert strip_ignorable("바보 idiot ㅂ") == "바보 idiot ㅂ"  # nothing visible goes


@pytest.mark.parametrize("phrase", ["\u3164", "\uffa0\u115f", "\u200b\u2063", "\ufe0f!"])
def test_a_trigger_phrase_of_invisible_characters_only_is_refused_at_load(
    tmp_path: Path, phrase: str
) -> None:
    path = tmp_path / "npc.toml"
    escaped = "".join(f"\\U{ord(c):08x}" for c in phrase)
    path.write_text(f'id = "x"\n[[triggers]]\nreaction = "그만."\nmatch = ["{escaped}"]\n')
    with pytest.raises(ConfigError, match=r"triggers\[0\]\.match.*no visible letters"):
        npc.load(path)


def test_trigger_phrases_are_checked_when_the_npc_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "npc.toml"
    body = 'id = "x"\n[tags]\ntrust = 0.5\n[[triggers]]\nreaction = "그만."\nmatch = '
    path.write_text(body + '["shut up!", "바보"]\n')
    loaded = npc.load(path).knowledge.triggers[0]
    assert loaded.matches("Shut up.") and loaded.matches("이 바보야")
    path.write_text(body + '["!!!"]\n')
    with pytest.raises(
        ConfigError, match=r"key 'triggers\[0\]\.match': '!!!' has no visible letters"
    ):
        npc.load(path)


def test_decomposed_hangul_reaches_the_prompt_as_nfc() -> None:
    line = "공장에 불이 났어요"
    nfd = unicodedata.normalize("NFD", line)
    assert nfd != line
    prompts = [
        render(builtin_template("served-v1"), PromptInput("mother", Tags(), said, lore=said)).text
        for said in (line, nfd)
    ]
    assert prompts[0] == prompts[1] and line in prompts[0]


def test_lexical_retrieval_finds_korean_lore_through_particles() -> None:
    lore = [
        "항구에는 낡은 배가 묶여 있다.",
        "십 년 전 공장에서 큰 불이 났다.",
        "숲의 은둔자는 약초를 모은다.",
    ]
    emb = LexicalEmbedder()
    order = rank(emb.embed(["공장은 어떻게 된 거예요?"])[0], emb.embed(lore))
    assert order[0] == 1
    order = rank(emb.embed(["은둔자를 만나고 싶어요"])[0], emb.embed(lore))
    assert order[0] == 2


def test_reply_similarity_gives_korean_partial_credit() -> None:
    assert "바보" in metrics.words("이 바보야")
    close = metrics.token_f1("공장에서 불이 났어요", "공장에 불이 났다")
    far = metrics.token_f1("공장에서 불이 났어요", "배가 항구에 있다")
    assert close > far >= 0.0 and close > 0.3
