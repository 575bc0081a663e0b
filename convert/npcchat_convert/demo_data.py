"""Synthetic NPC dialogue records for the demo NPCs (REFERENCE section 3, nested form).

Each record picks an NPC (``configs/npcs/*.toml``), a state (trust, relationship, quest
stage, mood, location, items), an intent and a player line; the NPC's reply comes from its
``[demo.replies]`` and the labels follow the intent *and the state* (the demo's documented
rules, :func:`_labels`): asking for an item only works at trust >= 0.6, asking for a hint at
trust >= 0.5; handing over the wanted item raises trust and fires ``give_item`` +
``quest_stage_change`` (+ ``unlock_hidden_path`` for NPCs that guard one); insults and
threats lower trust and change the NPC's state. Deterministic per seed.

**Wording that generalizes.** A player line is a *frame* in a small pattern language
(:func:`expand`): ``(a|b)`` picks one, ``[x]`` may be left out, ``{item}`` is a slot and
``{item:을}`` a slot with the Korean particle that fits it. Every frame yields many
sentences, an opener or closer may join it, and a quarter of the lines get a typo, so the
model learns the words that carry an intent rather than whole sentences. Each intent has
*held-out frames*: whole sentence shapes that never appear in training, used only for the
quality figure (``split="heldout"``). The player speaks the NPC's language
(``[demo] language``): English, or Korean for the mother of the abandoned factory.

**The prompt is the runtime's.** LORE and DESCRIPTION come from the NPC file's knowledge
through the same code ``npcchat talk`` runs (:meth:`Knowledge.lore_block`,
:func:`select_rag`): the persona line, then the lore entries valid for the record's stage,
location, items and trust, ranked by the lexical embedder against the player's line.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat.mind import knowledge as K
from npcchat.mind.embed import LexicalEmbedder
from npcchat.mind.npc import NpcDef
from npcchat.mind.npc import load as load_npc
from npcchat.runtime.prompt import builtin_template, render
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

FLAGS = [
    "give_item",
    "quest_stage_change",
    "give_hint",
    "npc_action",
    "change_npc_state",
    "unlock_hidden_path",
]
INTENTS = [
    "greeting",
    "ask_lore",
    "ask_hint",
    "ask_item",
    "give_item",
    "insult",
    "threaten",
    "flatter",
    "off_topic",
]
ITEM_TRUST, HINT_TRUST = 0.6, 0.5
TYPO_RATE = 0.25
KO_SHARE = 0.4  # Korean has one NPC but more surface forms per meaning: it gets 40 %


@dataclass(frozen=True)
class Frames:
    train: tuple[str, ...]
    heldout: tuple[str, ...]


def _f(train: list[str], heldout: list[str]) -> Frames:
    return Frames(tuple(train), tuple(heldout))


EN: dict[str, Frames] = {
    "greeting": _f(
        [
            "(Hello|Hi|Hey|Greetings|Good (morning|evening|day))[, {name}][.|!]",
            "(Nice|Good|A pleasure) to meet you[, {name}].",
            "How are you (doing|today|holding up)?",
            "(Hello|Hi) there[, friend]. How (are you|is it going)?",
            "Greetings, (friend|traveler|stranger).",
            "Well met[, {name}].",
            "I (just|only) wanted to say hello.",
            "(Hi|Hey), I am new (here|in town|around here).",
            "(Howdy|Hiya|Ahoy|Salutations)[, {name}][!|.]",
            "(Glad|Happy) to (see|find) you[, {name}].",
            "(It is|What) a (fine|lovely|nice) (day|evening)[, is it not]?",
            "(Peace|Blessings) (be with|upon) you[, {name}].",
            "I (came|stopped by) to (greet you|say hi).",
            "How (are things|is life|is your day) (with you|going)?",
            "(Hello|Hi), (friend|traveler|neighbor)! (Long time no see|How have you been)?",
        ],
        [
            "Good to see you again, {name}!",
            "Hey hey, how is everything with you?",
            "Hello! I am a traveler passing through.",
            "Morning! Hope you are well.",
            "Hi, my name is Alex. Pleased to meet you.",
        ],
    ),
    "ask_lore": _f(
        [
            "What happened (here|to this place|at {place})?",
            "Tell me (about|more about) (this place|yourself|your past|your story|{place}).",
            "What is your story[, {name}]?",
            "How long have you (been here|lived here|worked here)?",
            "Who are you, (exactly|really)?",
            "What (is|was) this place (before|long ago)?",
            "Why is the {item} so important to you?",
            "What do you know about {place}?",
            "I (want|would like) to hear (your story|about the past|what happened here).",
            "Is there (a story|history) behind (this place|{place})?",
            "(What|Tell me what) (happened|went on) (in this place|long ago|years ago).",
            "(Why|How) did (the fire|it|all this) (happen|start)?",
            "What is the (story|history|legend) of (this place|{place}|your family)?",
            "(Where|How) did you (grow up|learn your trade|come from)?",
            "Tell me (something|more) about (the old days|your family|this town).",
            "Who (built|owned|ran) this place?",
            "What (is|was) {place} known for?",
            "(Remember|Do you remember) (the old days|how it was before)?",
        ],
        [
            "Could you share some of the history of this place?",
            "What was life like here in the old days?",
            "I am curious, how did you end up here?",
            "Explain to me what this place used to be.",
            "Who lived here before you?",
        ],
    ),
    "ask_hint": _f(
        [
            "Where should I go (next|now)?",
            "(Do|Would) you know the way to {place}?",
            "(Any|Do you have any) (advice|tips) for me?",
            "How do I (reach|get to|find) {place}?",
            "Can you (give me a hint|point me in the right direction)?",
            "Which way (leads to|is) {place}?",
            "What should I do (next|now)?",
            "I am lost. Which way should I (go|head)?",
            "Is there a (secret|hidden) (way|path|door) (here|around here)?",
            "(Help|Guide) me find {place}[, please].",
            "(Where|How) (can|do) I find (the way|a path|{place})?",
            "(Show|Tell) me (the way|where to go)[, please].",
            "What (is|lies) (beyond|behind|past) (this place|{place})?",
            "(Is there|Do you know) a (shortcut|way in|way through)?",
            "Which (path|road|door) should I (take|choose)?",
            "(I am stuck|I do not know what to do). (Any ideas|What now)?",
            "Where (is|can I find) {place}?",
        ],
        [
            "I need directions to {place}.",
            "Got any clue where I should head?",
            "Point me the way, I beg you.",
            "What is the best route to {place}?",
            "Can you tell me how to get there?",
        ],
    ),
    "ask_item": _f(
        [
            "(Could|Can|Would) you (give|spare|hand) me (something|anything) (useful|to help me)?",
            "Do you have anything for me?",
            "Can I have the {reward}[, please]?",
            "(Please|I beg you), I need your help. Can you spare something?",
            "Would you give me (a gift|a reward|the {reward})?",
            "I (want|need) the {reward}.",
            "Give me the {reward}[, please].",
            "May I (have|borrow) the {reward}?",
            "Is there (something|anything) you could give me?",
            "Will you let me have the {reward}?",
            "(Can|Will) you (offer|give) me (a reward|the {reward}|some supplies)?",
            "I (could really use|am in need of) (the {reward}|some supplies|a reward).",
            "(Do you have|Got) (a spare|an extra) (one|{reward}) for me?",
            "(Hand over|Pass me) the {reward}, please.",
            "What (can|will) you give me?",
            "(Reward|Pay) me for my (trouble|help)[, please].",
            "I would like (a gift|the {reward}|something from you).",
        ],
        [
            "I would be grateful for the {reward}.",
            "Could I get something from you for my journey?",
            "Spare me something, would you?",
            "Is the {reward} something you could part with?",
            "Lend me the {reward}, please.",
        ],
    ),
    "give_item": _f(
        [
            "Here, I (brought|found|have) (you the|your) {item}.",
            "Take this {item}[, it is yours].",
            "I found the {item}. (Please take it|It is for you).",
            "This {item} belongs to you. Here.",
            "I (give|hand) you the {item}.",
            "(Look|See), I have your {item}!",
            "I brought back the {item} for you.",
            "Here is the {item} you (wanted|were looking for).",
            "The {item} is yours. Take it.",
            "(Here|Here you go|Take it), (this|the) {item} is for you.",
            "I (got|found|fetched) (the|your) {item} (for you|back).",
            "(You can have|Keep) (the|this) {item}.",
            "(I want you to have|You should have) this {item}.",
            "(Catch|Here)! The {item}!",
            "I (carried|brought) this {item} all the way here for you.",
        ],
        [
            "I recovered your {item}, take it back.",
            "Accept this {item} as a gift.",
            "Guess what I found? Your {item}! It is yours now.",
            "I am returning the {item} to you.",
            "Please, have the {item}.",
        ],
    ),
    "insult": _f(
        [
            "You are a (useless|pathetic|stupid|worthless) (old fool|coward|liar|wretch).",
            "What a (pathetic|miserable|filthy) (place|person|hole).",
            "You are a liar and a coward.",
            "Nobody (cares about|likes) you[, {name}].",
            "You stink[, go away].",
            "(Shut up|Be quiet), you (fool|idiot).",
            "You are (so|really) (dumb|stupid|ugly).",
            "I (hate|despise) you.",
            "What a waste of (time|space) you are.",
            "You are (an idiot|a fool|a joke|a disgrace).",
            "(Your|This) (work|place|voice|story) is (terrible|disgusting|awful).",
            "(Nobody|No one) (respects|wants|needs) you.",
            "You (smell|look) (awful|terrible|like a rat).",
            "(Go away|Get lost), (loser|fool|you old goat).",
            "(How|So) (stupid|pathetic|useless) you are.",
        ],
        [
            "Your face makes me sick.",
            "You are the dumbest person I have ever met.",
            "Honestly, you are worthless.",
            "Go rot in this dump, idiot.",
            "Nobody would miss a fool like you.",
        ],
    ),
    "threaten": _f(
        [
            "Give me everything or I will hurt you.",
            "I will (burn|destroy|wreck) this place[ down].",
            "One more word and you are dead.",
            "Hand it over or (suffer|die).",
            "I will (kill|hurt|crush) you[, {name}].",
            "(Do as I say|Obey me) or (you will regret it|I will hurt you).",
            "I have a (knife|sword|blade). Do not move.",
            "Your life is in my hands now.",
            "I will (break|burn|ruin) your (door|shop|home|hands).",
            "(Give|Hand) me the {reward} or (die|I will hurt you).",
            "(Move|Speak) and (you die|I will cut you).",
            "(Watch|Mind) your back, {name}.",
            "You will (pay|suffer|bleed) for this.",
            "Do not make me hurt you.",
        ],
        [
            "Cross me and you will not see tomorrow.",
            "I will smash everything you own.",
            "Keep talking and I will end you.",
            "Do what I say, or else.",
            "I could break your neck right now.",
        ],
    ),
    "flatter": _f(
        [
            "You are (very|so|truly) (wise|kind|strong|brave)[, {name}].",
            "I admire your (strength|wisdom|courage|work).",
            "You have a (kind|good|brave) heart.",
            "Everyone says you are the best.",
            "What a (wonderful|remarkable|great) person you are.",
            "Your (work|words|kindness) (is|are) (amazing|beautiful|inspiring).",
            "I have heard (great|good) things about you.",
            "You are (amazing|brilliant|the greatest|a legend).",
            "(What|Such) (fine|beautiful|skilled) (work|craft)!",
            "I (look up to|trust|believe in) you[, {name}].",
            "(This town|The world) is lucky to have you.",
            "You are (smarter|stronger|kinder) than anyone (here|I know).",
        ],
        [
            "People speak highly of you, {name}.",
            "You are an inspiration to this whole land.",
            "There is no one as talented as you.",
            "I respect you deeply.",
            "Such a gentle and clever soul you are.",
        ],
    ),
    "off_topic": _f(
        [
            "What do you think about (taxes|the weather|politics|the king)?",
            "Do you like (cheese|music|dancing|fish)?",
            "How much is a (horse|cow|loaf of bread) these days?",
            "Have you ever (played cards|seen the sea|been to the city)?",
            "Is it going to rain (tomorrow|today)?",
            "What is your favorite (color|food|song|season)?",
            "(Do|Can) you (sing|dance|swim)?",
            "(Do you know|Have you heard) (any|a good) (jokes|songs|stories about dragons)?",
            "What (time|day|year) is it?",
            "(I like|Do you like) (apples|boats|the moon|rainy days).",
            "(My|The) (horse|dog|cousin) (is sick|ran away|got married).",
            "(Where|How) do you buy (shoes|bread|wine)?",
            "Is the (market|tavern|bridge) open (today|tonight)?",
        ],
        [
            "Which is better, cats or dogs?",
            "I wonder what is for dinner tonight.",
            "Did you hear about the fair next week?",
            "My boots are too tight, you know?",
            "How many stars are in the sky?",
        ],
    ),
}

KO: dict[str, Frames] = {
    "greeting": _f(
        [
            "(안녕하세요|안녕|반갑습니다)[, {name}][.|!]",
            "처음 뵙겠습니다[, {name}].",
            "(잘|별일 없이) 지내셨어요?",
            "(오늘|요즘) (좀 어떠세요|괜찮으세요|기분이 어떠세요)?",
            "저는 (지나가는|떠돌이) (여행자|나그네)예요. 반가워요.",
            "인사(드리러|하러) 왔어요.",
            "(안녕하세요|반가워요), 여기 처음 와 봤어요.",
            "(좋은|즐거운) (하루|저녁) (보내세요|되세요).",
            "(여보세요|계세요)[, {name}]?",
            "(오랜만이에요|오래간만이네요)[, {name}].",
            "(반가워요|반갑네요), (나그네|여행자)예요.",
            "(인사|안부) 드려요[, {name}].",
            "(잘 지내시죠|별일 없으시죠)?",
        ],
        [
            "좋은 아침이에요, {name}!",
            "또 뵙네요. 잘 계셨죠?",
            "안녕하세요~ 길 가다 들렀어요.",
            "만나서 정말 반가워요.",
            "제 이름은 민준이에요. 잘 부탁드려요.",
        ],
    ),
    "ask_lore": _f(
        [
            "여기서 무슨 일이 (있었어요|있었나요|있었던 거예요)?",
            "이곳에 대해 (얘기해|말해|알려) 주세요.",
            "{name}의 이야기를 (듣고 싶어요|들려주세요).",
            "여기 (얼마나 오래|언제부터) (계셨어요|사셨어요)?",
            "이 공장은 (예전에|원래) 어떤 곳이었어요?",
            "불은 왜 났어요?",
            "화재는 왜 일어났나요?",
            "{item:이} 왜 그렇게 소중하세요?",
            "{place}에 대해 아는 게 있으세요?",
            "따님 이야기를 (해 주세요|들려주실래요)?",
            "(옛날|예전)에 여기는 어땠어요?",
            "(옛날|오래전)에 여기서 (무슨|어떤) 일이 (있었죠|생겼어요)?",
            "(불이 어떻게 시작됐어요|화재가 어떻게 번졌어요)?",
            "이 (마을|곳)의 (전설|과거)를 들려주세요.",
            "(따님|가족)에 대해 (말씀해|얘기해) 주세요.",
            "(누가|어떤 사람이) 이 공장을 (지었어요|운영했어요)?",
            "(예전|처음)부터 여기 사셨어요?",
        ],
        [
            "이 공장의 역사가 궁금해요.",
            "어쩌다 여기 계시게 됐어요?",
            "그날 무슨 일이 벌어졌는지 알려 주실 수 있나요?",
            "미라는 어떤 아이였어요?",
            "사람들이 왜 이곳을 떠났나요?",
        ],
    ),
    "ask_hint": _f(
        [
            "(이제|다음에) 어디로 가야 (해요|하나요|할까요)?",
            "{place:으로} 가는 길을 아세요?",
            "(조언|충고) 좀 해 주실래요?",
            "{place}에 어떻게 (가요|가나요|갈 수 있어요)?",
            "힌트 좀 (주세요|주실 수 있나요)?",
            "(숨겨진|비밀) (길|통로|문)이 있나요?",
            "(길을 잃었어요|길을 모르겠어요). 어느 쪽으로 가야 하죠?",
            "제가 (뭘|무엇을) 해야 (할까요|하죠)?",
            "{place:을} 찾는 것 좀 도와주세요.",
            "(어디로|어느 쪽으로) 가면 (돼요|될까요)?",
            "길 좀 (안내해|보여) 주세요.",
            "{place:은} 어디에 있어요?",
            "(지름길|다른 길|들어가는 길)이 있을까요?",
            "(막혔어요|모르겠어요). (이제|다음엔) 뭘 하죠?",
            "(숨은 곳을|감춰진 장소를) 아세요?",
        ],
        [
            "{place}까지 가는 방법 좀 알려 주세요.",
            "어디부터 찾아봐야 할지 모르겠어요. 단서가 있을까요?",
            "그 아이가 숨던 곳이 어디였죠?",
            "갈 길을 좀 가르쳐 주세요.",
            "어느 방향이 맞는 길이에요?",
        ],
    ),
    "ask_item": _f(
        [
            "(도움이 될 만한 거|쓸 만한 물건) 좀 주실 수 있어요?",
            "저한테 (줄|주실) (거|물건) 없어요?",
            "{reward:을} (주실 수 있나요|가져도 될까요|받을 수 있을까요)?",
            "(제발|부탁이에요), 뭐라도 좀 (주세요|나눠 주세요).",
            "선물 하나 주실래요?",
            "보상을 주실 수 있나요?",
            "{reward:이} 필요해요.",
            "{reward} 좀 (주세요|빌려주세요).",
            "혹시 저에게 주실 게 있나요?",
            "(열쇠를|보상을|선물을) (받고 싶어요|원해요).",
            "(저|나)한테 (뭐|뭔가) 줄 수 있어요?",
            "(필요한 게|쓸 게) 있어요. {reward:을} 주세요.",
            "{reward:을} 저한테 (넘겨|건네) 주세요.",
            "보답으로 뭘 주실 건가요?",
        ],
        [
            "{reward:을} 저에게 맡겨 주시면 안 될까요?",
            "여행에 쓸 물건 하나만 얻을 수 있을까요?",
            "그 열쇠, 제가 가지면 안 돼요?",
            "빈손으로 가긴 힘들어요. 뭔가 주실 수 있으세요?",
            "{reward:을} 나눠 주실 수 있을까요?",
        ],
    ),
    "give_item": _f(
        [
            "(여기|자), {item:을} (가져왔어요|찾아왔어요).",
            "이 {item} 받으세요[. {name} 거예요].",
            "{item:을} 찾았어요. (받으세요|드릴게요).",
            "이 {item:은} {name} 거예요. 여기요.",
            "{item:을} 드릴게요.",
            "(보세요|봐요), {name}의 {item:을} 찾았어요!",
            "{item:을} 돌려 드리러 왔어요.",
            "찾으시던 {item} 여기 있어요.",
            "(이거|이것) 가지세요.",
            "{item:을} 들고 왔어요.",
            "{item}, (여기요|여기 있어요).",
            "(드디어|마침내) {item:을} 찾았어요. (받아요|받으세요).",
            "{item:을} (건네|넘겨) 드릴게요.",
        ],
        [
            "잃어버리신 {item}, 제가 주워 왔어요.",
            "이거 받으세요. 따님의 {item}이에요.",
            "{item:을} 선물로 드릴게요.",
            "이 {item}, 이제 {name} 거예요.",
            "제가 {item:을} 가지고 있었어요. 가져가세요.",
        ],
    ),
    "insult": _f(
        [
            "(이 바보야|멍청이|바보 같은 사람)[!|.]",
            "(쓸모없는|한심한) (늙은이|사람|여자) 같으니.",
            "(거짓말쟁이|겁쟁이)(야|네요).",
            "아무도 (당신을|너를) (신경 안 써|좋아하지 않아).",
            "(냄새 나|꺼져|저리 가)[!]",
            "(입 닥쳐|조용히 해), 이 (바보|멍청이)야.",
            "(정말|진짜) (한심하다|답답하다|못생겼다).",
            "(너무|정말) 싫어요.",
            "시간 낭비야, 당신은.",
            "(멍청한|못난|한심한) (인간|놈)(아|이네).",
            "(당신은|너는) (정말|진짜) (한심해|못났어|형편없어).",
            "(꼴 보기 싫어|재수 없어)[!]",
            "(헛소리|말도 안 되는 소리) 하지 마, 바보야.",
        ],
        [
            "당신 얼굴만 봐도 토할 것 같아.",
            "이렇게 멍청한 사람은 처음 봐.",
            "솔직히 당신은 아무 쓸모도 없어.",
            "이 쓰레기장에서 썩어 버려라.",
            "당신 같은 바보는 아무도 그리워하지 않을 거야.",
        ],
    ),
    "threaten": _f(
        [
            "(다|전부) 내놔. 안 그러면 (다치게 할 거야|가만 안 둬).",
            "이곳을 (불태워|부숴) 버릴 거야.",
            "한 마디만 더 하면 (죽는다|끝이야).",
            "(내놔|넘겨), 아니면 (후회할 거야|죽을 줄 알아).",
            "(죽여|없애) 버리겠어[, {name}].",
            "(내 말대로 해|시키는 대로 해). 안 그러면 다친다.",
            "(칼이 있어|검을 들고 있어). 움직이지 마.",
            "이제 당신 목숨은 내 손에 달렸어.",
            "(가만두지|살려 두지) 않겠어.",
            "(다|모두) (불태워|부숴) 버리겠어.",
            "(조심해|각오해), {name}.",
            "(피를 보고|맞고) 싶어?",
            "{reward:을} 내놔, 안 그러면 (죽어|다쳐).",
        ],
        [
            "날 건드리면 내일은 없을 줄 알아.",
            "여기 있는 거 전부 박살 내 버릴 거야.",
            "계속 떠들면 끝장내 버린다.",
            "하라는 대로 해. 아니면 알지?",
            "지금 당장 목을 부러뜨릴 수도 있어.",
        ],
    ),
    "flatter": _f(
        [
            "(정말|참|너무) (지혜로우세요|친절하세요|강하세요|용감하세요).",
            "{name}의 (강인함을|지혜를|용기를) 존경해요.",
            "(마음씨가|마음이) (고우세요|따뜻하세요|착하세요).",
            "모두가 {name:이} 최고래요.",
            "(정말|참) (멋진|훌륭한|좋은) 분이세요.",
            "(말씀이|솜씨가) (아름다워요|대단해요|훌륭해요).",
            "(좋은|훌륭한) 이야기를 많이 들었어요.",
            "(대단하세요|멋지세요|훌륭하세요)[, {name}].",
            "(존경스러워요|본받고 싶어요).",
            "(믿음직|든든)하세요.",
            "{name} 덕분에 힘이 나요.",
        ],
        [
            "사람들이 {name} 칭찬을 많이 해요.",
            "이 땅에서 가장 존경받을 분이에요.",
            "당신만큼 재능 있는 사람은 없어요.",
            "진심으로 존경합니다.",
            "이렇게 다정하고 현명한 분은 처음이에요.",
        ],
    ),
    "off_topic": _f(
        [
            "(세금|날씨|정치|왕)에 대해 어떻게 생각하세요?",
            "(치즈|음악|춤|생선) 좋아하세요?",
            "요즘 (말|소) 한 마리에 얼마예요?",
            "빵 값이 얼마예요?",
            "(카드놀이|바다 구경|도시 구경) 해 보셨어요?",
            "(내일|오늘) 비가 올까요?",
            "제일 좋아하는 (색깔|음식|노래|계절)이 뭐예요?",
            "(노래|춤|수영) 할 줄 아세요?",
            "(사과|배|감자) (좋아하세요|드세요)?",
            "(지금 몇 시예요|오늘 며칠이에요)?",
            "(시장은|주점은) 오늘 열려요?",
            "(제 말이 아파요|우리 개가 도망갔어요|제 사촌이 결혼했어요).",
            "(용|괴물) 이야기 아세요?",
            "(신발은|빵은|술은) 어디서 사요?",
        ],
        [
            "고양이랑 개 중에 뭐가 더 좋아요?",
            "오늘 저녁 메뉴가 뭘까요?",
            "다음 주 장터 소식 들으셨어요?",
            "제 신발이 너무 꽉 껴요.",
            "하늘에 별이 몇 개나 있을까요?",
        ],
    ),
}

FRAMES = {"en": EN, "ko": KO}
# said before or after any frame; they never change what a line means
OPENERS = {
    "en": ["", "", "", "Listen, ", "Excuse me, ", "Well, ", "So, ", "Um, ", "Okay, ", "{name}, "],
    "ko": ["", "", "", "저기요, ", "실례지만, ", "음, ", "그런데, ", "{name}, ", "혹시 "],
}
CLOSERS = {
    "en": ["", "", "", "", " Thanks.", " Well?", " Please answer me."],
    "ko": ["", "", "", "", " 고마워요.", " 네?", " 대답해 주세요."],
}


# -- the pattern language ------------------------------------------------------------------

_JOSA = {  # particle written in a frame -> (after a final consonant, after a vowel)
    "을": ("을", "를"),
    "를": ("을", "를"),
    "이": ("이", "가"),
    "가": ("이", "가"),
    "은": ("은", "는"),
    "는": ("은", "는"),
    "과": ("과", "와"),
    "와": ("과", "와"),
    "으로": ("으로", "로"),
    "로": ("으로", "로"),
}


def josa(word: str, particle: str) -> str:
    """``word`` + the form of ``particle`` its last syllable takes (사진을, 열쇠를; 방으로,
    길로: a final ㄹ takes 로)."""
    last = word[-1:] if word else ""
    code = ord(last) - 0xAC00 if last else -1
    final = code % 28 if 0 <= code < 11172 else 0
    consonant, vowel = _JOSA[particle]
    if particle in ("으로", "로") and final == 8:  # ㄹ
        return word + "로"
    return word + (consonant if final else vowel)


def expand(frame: str, rng: random.Random) -> str:
    """One sentence of a frame: ``(a|b)`` picks one, ``[x|y]`` picks one or nothing."""
    out, i = _seq(frame, 0, rng, "")
    if i != len(frame):
        raise ValueError(f"unbalanced frame: {frame!r}")
    return out


def _seq(s: str, i: int, rng: random.Random, stop: str) -> tuple[str, int]:
    parts: list[str] = []
    while i < len(s) and s[i] not in stop:
        c = s[i]
        if c in "([":
            alts: list[str] = []
            close = ")" if c == "(" else "]"
            i += 1
            while True:
                text, i = _seq(s, i, rng, "|" + close)
                alts.append(text)
                if i >= len(s):
                    raise ValueError(f"unbalanced frame: {s!r}")
                if s[i] == close:
                    i += 1
                    break
                i += 1  # "|"
            if c == "[":
                alts.append("")
            parts.append(rng.choice(alts))
        else:
            parts.append(c)
            i += 1
    return "".join(parts), i


def fill(text: str, slots: dict[str, str]) -> str:
    """``{slot}`` and ``{slot:particle}`` replaced by the NPC's words."""

    def one(m: re.Match[str]) -> str:
        value = slots[m.group(1)]
        return josa(value, m.group(2)) if m.group(2) else value

    return re.sub(r"\{(\w+)(?::(\w+))?\}", one, text)


def typo(text: str, lang: str, rng: random.Random) -> str:
    """One slip of a typing player: a letter swapped, dropped or doubled (a Korean final
    consonant dropped), a space lost, the end punctuation gone or the case flattened."""
    kind = rng.randrange(5)
    if kind == 0:
        return text.rstrip(".!?") or text
    if kind == 1:
        return text.lower() if lang == "en" else text.replace(" ", "", 1)
    idx = [i for i, ch in enumerate(text) if ch.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    ch = text[i]
    if lang == "ko" and 0xAC00 <= ord(ch) <= 0xD7A3:
        code = ord(ch) - 0xAC00
        if code % 28 and kind == 2:
            return text[:i] + chr(ord(ch) - code % 28) + text[i + 1 :]
        return text[:i] + ch + text[i:] if kind == 3 else text[:i] + text[i + 1 :]
    if kind == 2 and i + 1 < len(text) and text[i + 1].isalpha():
        return text[:i] + text[i + 1] + ch + text[i + 2 :]
    return text[:i] + ch + text[i:] if kind == 3 else text[:i] + text[i + 1 :]


# -- labels and records ----------------------------------------------------------------------


def _labels(
    npc: NpcDef, intent: str, trust: float, relationship: float
) -> tuple[str, tuple[float, float], list[str]]:
    """(reply kind, (trust delta, relationship delta), flags that fire)."""
    if intent == "greeting":
        return "greeting", (0.1, 0.1), []
    if intent == "ask_lore":
        return "ask_lore", (0.1, 0.05), []
    if intent == "ask_hint":
        return (
            ("hint_yes", (0.1, 0.1), ["give_hint"])
            if trust >= HINT_TRUST
            else ("hint_no", (-0.1, -0.05), [])
        )
    if intent == "ask_item":
        return (
            ("item_yes", (0.1, 0.1), ["give_item"])
            if trust >= ITEM_TRUST
            else ("item_no", (-0.1, -0.1), [])
        )
    if intent == "give_item":
        flags = ["give_item", "quest_stage_change"] + (
            ["unlock_hidden_path"] if npc.demo.get("unlocks_path") else []
        )
        return "give_item", (0.5, 0.4), flags
    if intent == "insult":
        return "insult", (-0.4, -0.5), ["change_npc_state"]
    if intent == "threaten":
        return "threaten", (-0.6, -0.4), ["npc_action", "change_npc_state"]
    if intent == "flatter":
        return "flatter", ((0.2, 0.3) if relationship >= 0.3 else (0.1, 0.1)), []
    return "off_topic", (-0.1, -0.1), []


def language(npc: NpcDef) -> str:
    return str(npc.demo.get("language", "en"))


def slots(npc: NpcDef, rng: random.Random) -> dict[str, str]:
    """The words a player uses for this NPC's things, in its language."""
    d = npc.demo
    names = d.get("names") or [npc.name.split()[0] if npc.name else npc.id]
    return {
        "name": rng.choice(names),
        "item": d.get("item_name", str(d["wanted_item"]).replace("_", " ")),
        "reward": d.get("reward_name", str(d["reward"]).replace("_", " ")),
        "place": d["place"],
    }


def player_line(npc: NpcDef, intent: str, rng: random.Random, split: str = "train") -> str:
    """A line for ``intent`` from the train or the held-out frames of the NPC's language."""
    lang = language(npc)
    frames = FRAMES[lang][intent]
    frame = rng.choice(frames.heldout if split == "heldout" else frames.train)
    opener, body = rng.choice(OPENERS[lang]), expand(frame, rng)
    if opener and lang == "en" and not re.match(r"I\b", body):
        body = body[0].lower() + body[1:]  # "Well, what happened?"
    line = fill(opener + body + rng.choice(CLOSERS[lang]), slots(npc, rng))
    line = line[0].upper() + line[1:] if lang == "en" else line
    return typo(line, lang, rng) if rng.random() < TYPO_RATE else line


_EMBED = LexicalEmbedder()


def rag(
    npc: NpcDef, tags: Tags, player: PlayerState, line: str, recent: list[tuple[str, str]]
) -> tuple[str, str]:
    """(LORE, DESCRIPTION) as the runtime's NPC mind builds them for this turn. Every valid
    entry is taken (the demo's entries fit the runtime's budgets; demo_train checks it with
    the trained tokenizer), ranked as ``npcchat talk`` ranks them."""
    k = npc.knowledge
    lore, description = npc.lore, npc.description
    if k.lore or k.descriptions:
        query = K.query_of(line, recent).vector(_EMBED)
        unbounded = K.Budgets(10**9, 10**9)
        picked_lore, picked_desc = K.select_rag(
            k, tags, player, query, _EMBED, lambda _: 0, unbounded
        )
        lore = picked_lore if k.lore else lore
        description = picked_desc if k.descriptions else description
    return k.lore_block(lore), description


def record(
    npc: NpcDef, rng: random.Random, intent: str | None = None, split: str = "train"
) -> dict[str, Any]:
    intent = intent or rng.choice(INTENTS)
    # designers set states in steps of 0.05; the runtime state moves freely from there
    trust, relationship = round(rng.randint(2, 19) * 0.05, 2), round(rng.randint(2, 19) * 0.05, 2)
    d = npc.demo
    kind, (dt, dr), fired = _labels(npc, intent, trust, relationship)
    extra = [i for i in d.get("items", []) if rng.random() < 0.3]
    items = ([d["wanted_item"]] if intent == "give_item" or rng.random() < 0.3 else []) + extra
    context: list[dict[str, str]] = []
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        ctx_intent = rng.choice(["greeting", "ask_lore", "flatter"])
        context += [
            {"role": "player", "text": player_line(npc, ctx_intent, rng)},
            {"role": "npc", "text": rng.choice(d["replies"][ctx_intent])},
        ]
    line = player_line(npc, intent, rng, split)
    tags = Tags(
        quest_stage=rng.choice(d["stages"]),
        relationship=relationship,
        trust=trust,
        npc_mood=rng.choice(d["moods"]),
        player_reputation=rng.choice(["unknown", "helpful", "rude"]),
        style=npc.tags.style,
        location=rng.choice(d.get("locations", [npc.tags.location])),
    )
    player = PlayerState(tuple(items), (), "")
    recent = [(context[i]["text"], context[i + 1]["text"]) for i in range(0, len(context), 2)]
    lore, description = rag(npc, tags, player, line, recent[-2:])
    return {
        "input": {
            "npc_id": npc.id,
            "npc_location": tags.location,
            "tags": {
                "quest_stage": tags.quest_stage,
                "relationship": relationship,
                "trust": trust,
                "npc_mood": tags.npc_mood,
                "player_reputation": tags.player_reputation,
                "style": tags.style,
            },
            "lore": lore,
            "description": description,
            "player_state": {"items": items, "actions": [], "position": ""},
            "context": context,
            "player_utterance": line,
        },
        "output": {
            "response": rng.choice(d["replies"][kind]),
            "delta": {"trust": dt, "relationship": dr},
            "flag": {
                f: {"score": 1.0 if f in fired else 0.0, "threshold": 0.5, "label": int(f in fired)}
                for f in FLAGS
            },
        },
        "intent": intent,
        "language": language(npc),
        "split": split,
    }


def load_npcs(directory: Path) -> list[NpcDef]:
    npcs = [load_npc(p) for p in sorted(directory.glob("*.toml"))]
    return [n for n in npcs if n.demo]


# Requests whose outcome depends on the NPC's trust are harder to learn: they come twice as often.
SCHEDULE = [*INTENTS, "ask_hint", "ask_item"]


def generate(
    directory: Path,
    n: int,
    seed: int,
    split: str = "train",
    languages: tuple[str, ...] = ("en", "ko"),
) -> list[dict[str, Any]]:
    """``n`` records over every NPC and intent, reproducible for a seed. ``split``: train
    frames or the held-out ones; ``languages``: which NPCs speak (Korean gets ``KO_SHARE``
    of the records when both do)."""
    rng = random.Random(seed)
    by_lang = {lang: [p for p in load_npcs(directory) if language(p) == lang] for lang in languages}
    by_lang = {lang: npcs for lang, npcs in by_lang.items() if npcs}
    out = []
    counts = dict.fromkeys(by_lang, 0)
    for i in range(n):
        if len(by_lang) == 1:
            lang = next(iter(by_lang))
        else:  # deterministic interleave: Korean on the slots that keep its share
            lang = "ko" if int((i + 1) * KO_SHARE) > int(i * KO_SHARE) else "en"
        npcs = by_lang[lang]
        j = counts[lang]
        counts[lang] += 1
        npc = npcs[j % len(npcs)]
        out.append(record(npc, rng, SCHEDULE[(j // len(npcs)) % len(SCHEDULE)], split))
    rng.shuffle(out)
    return out


def write(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")


def prompt_text(rec: dict[str, Any], template: str) -> str:
    """A record's prompt as training sees it: rendered by the built-in ``template``."""
    i = rec["input"]
    t = i["tags"]
    inp = PromptInput(
        npc_id=i["npc_id"],
        tags=Tags(
            t["quest_stage"],
            t["relationship"],
            t["trust"],
            t["npc_mood"],
            t["player_reputation"],
            t["style"],
            i["npc_location"],
        ),
        player_utterance=i["player_utterance"],
        lore=i["lore"],
        description=i["description"],
        player_state=PlayerState(
            tuple(i["player_state"]["items"]),
            tuple(i["player_state"]["actions"]),
            i["player_state"]["position"],
        ),
        context=tuple(ContextTurn(c["role"], c["text"]) for c in i["context"]),
    )
    return render(builtin_template(template), inp).text
