"""``npcchat talk``: a REPL for designers, or scripted turns with ``--say`` (and ``--json``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from npcchat.config import Config
    from npcchat.conversation import Conversation
    from npcchat.engine import Engine
    from npcchat.types import TurnResult

HELP = (
    ("/state", "show the NPC state, player state and fired flags"),
    (
        "/set KEY VALUE",
        "change state, e.g. /set trust 0.8, /set quest_stage complete, /set items key,map",
    ),
    ("/undo", "take back the last turn (trust and relationship return to before it)"),
    ("/retry", "redo the last turn with a new draw"),
    ("/save [FILE]", "save the session (.toml or .json)"),
    ("/reset", "back to the initial state, history cleared"),
    ("/memory", "long-term memories (turns that left the context window)"),
    ("/flags", "the bundle's flags with the NPC file's names, thresholds and examples"),
    ("/help", "this list"),
    ("/quit", "leave (Ctrl-D works too)"),
)


def talk(
    say: Annotated[
        list[str] | None,
        typer.Option("--say", help="Player line; repeat for several turns; no REPL."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="With --say: one JSON object per turn.")
    ] = False,
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    npc: Annotated[
        str | None,
        typer.Option(help="NPC definition TOML, or a demo NPC's id (e.g. village_blacksmith)."),
    ] = None,
    session: Annotated[
        Path | None,
        typer.Option(
            help="Session file (.toml/.json): resumed if it exists, else created; saved after every turn."
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (0: greedy).")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most reply tokens per turn.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Sampling seed (default: new per session).")
    ] = None,
    repeat_penalty: Annotated[float | None, typer.Option(help="Repetition penalty.")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: all available).")
    ] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="Layers to offload to a GPU.")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context size in tokens.")] = None,
    lora: Annotated[
        Path | None, typer.Option(help="GGUF LoRA adapter applied at run time.")
    ] = None,
    lora_scale: Annotated[float | None, typer.Option(help="Scale of --lora.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Config TOML (defaults: $NPCCHAT_HOME/config.toml).")
    ] = None,
) -> None:
    """Talk to an NPC: each turn shows the reply, trust/relationship deltas and flags."""
    from npcchat.cli import common

    cfg = common.build_config(
        config, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        repeat_penalty=repeat_penalty, threads=threads, gpu_layers=gpu_layers, ctx=ctx,
        lora=lora, lora_scale=lora_scale,
    )  # fmt: skip
    engine = common.open_engine(bundle, cfg)
    with engine:
        if engine.heads is None and not json_out:
            from npcchat.cli import ui

            ui.warn(
                f"{engine.bundle.name} has no heads: replies only, no state changes (npcchat heads fit adds them)"
            )
        conv = _conversation(engine, cfg, npc, session, quiet=json_out)
        if say:
            _scripted(conv, say, json_out)
        else:
            _repl(conv)


def _conversation(
    engine: Engine, cfg: Config, npc_path: str | None, path: Path | None, quiet: bool
) -> Conversation:
    import random

    from npcchat import session as session_mod
    from npcchat.cli import common, ui
    from npcchat.conversation import Conversation, new_session
    from npcchat.mind import NpcMind, knowledge_of
    from npcchat.types import SamplingParams

    s = cfg.sampling
    sampling = SamplingParams(s.temperature, s.top_p, s.repeat_penalty, s.max_tokens, None)
    if path is not None and path.exists():
        sess = session_mod.load(path)
        if npc_path is not None and not quiet:
            ui.warn(f"resuming {path}; --npc {npc_path} is ignored")
        if sess.bundle_id and sess.bundle_id != engine.bundle.identity and not quiet:
            ui.warn(
                f"{path} was made with bundle {sess.bundle_name} ({sess.bundle_id}), now {engine.bundle.identity}"
            )
        if s.seed >= 0:
            sess = replace(sess, seed=s.seed)
        know = knowledge_of(sess)
    else:
        is_demo = engine.bundle.root.resolve() == (common.demo_dir() / "bundle").resolve()
        npc_def = common.load_npc(npc_path, demo=is_demo)
        sess = new_session(npc_def, engine, s.seed if s.seed >= 0 else random.randrange(2**31))
        know = npc_def.knowledge
        if path is not None:
            session_mod.save(sess, path)
    mind = NpcMind(engine, know, cfg.knowledge)
    conv = Conversation(
        engine, sess, sampling, path, on_warning=None if quiet else ui.warn, mind=mind
    )
    if path is not None and sess.history and conv.resume_snapshot() and not quiet:
        ui.info(f"restored the KV cache saved with {path.name}")
    return conv


def turn_json(conv: Conversation, r: TurnResult) -> dict[str, Any]:
    from npcchat import types

    return {"npc_id": conv.session.npc_id, **types.turn_json(r)}


def _scripted(conv: Conversation, lines: list[str], json_out: bool) -> None:
    from npcchat.cli import ui

    for line in lines:
        if json_out:
            r = conv.say(line)
            print(json.dumps(turn_json(conv, r), ensure_ascii=False), flush=True)
        else:
            ui.out.print(f"[bold]you>[/bold] {line}")
            ui.reply_start(conv.session.npc_id)
            r = conv.say(line, ui.reply_text)
            ui.reply_end()
            ui.turn_summary(r, _display(conv))


def _read_line() -> str | None:
    from npcchat.cli import ui

    while True:
        try:
            return input(ui.prompt_text())
        except EOFError:
            return None
        except KeyboardInterrupt:
            ui.info("\n(Ctrl-D or /quit to leave)")


def _repl(conv: Conversation) -> None:
    from npcchat.cli import ui

    s = conv.session
    ui.banner(
        s.npc_id,
        s.npc_id,
        conv.engine.bundle.name,
        str(conv.path) if conv.path else None,
        len(s.history),
    )
    if conv.mind is not None:
        k = conv.mind.know
        ui.info(
            f"knowledge: {len(k.lore)} lore entries, {len(k.descriptions)} descriptions, "
            f"{len(k.triggers)} triggers · retrieval and memory ranking: {conv.mind.method} · "
            f"{len(s.memories)} memories"
        )
    conv.idle_snapshots = True  # written by _idle, before each wait for the player
    try:
        _converse(conv)
    finally:
        conv.flush_snapshot()  # a predecode that failed or was interrupted left it due


def _converse(conv: Conversation) -> None:
    from npcchat.cli import ui

    while True:
        _idle(conv)
        line = _read_line()
        if line is None:
            ui.out.print()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(conv, line):
                break
            continue
        _run_turn(conv, lambda cb, text=line: conv.say(text, cb))


def _run_turn(conv: Conversation, action: Any) -> None:
    from npcchat.cli import ui
    from npcchat.errors import NpcchatError

    ui.reply_start(conv.session.npc_id)
    try:
        r = action(ui.reply_text)
    except KeyboardInterrupt:
        ui.reply_end()
        ui.info("(turn abandoned; the session is as it was before it)")
        return
    except NpcchatError as e:
        ui.reply_end()
        ui.error(e)
        return
    ui.reply_end()
    if r is None:
        ui.info("(nothing to retry)")
        return
    ui.turn_summary(r, _display(conv))


def _command(conv: Conversation, line: str) -> bool:
    """Run a slash command; True means quit."""
    from npcchat.cli import ui
    from npcchat.errors import NpcchatError

    name, _, rest = line.partition(" ")
    rest = rest.strip()
    try:
        if name in ("/quit", "/exit", "/q"):
            return True
        if name == "/help":
            ui.help_table(HELP)
        elif name == "/state":
            ui.state(conv.session)
        elif name == "/set":
            key, _, value = rest.partition(" ")
            if not key:
                ui.info("usage: /set KEY VALUE")
            else:
                conv.set(key, value.strip())
                ui.state(conv.session)
        elif name == "/undo":
            ui.info("last turn taken back" if conv.undo() else "(nothing to undo)")
        elif name == "/retry":
            _run_turn(conv, conv.retry)
        elif name == "/save":
            saved = conv.save(Path(rest) if rest else None)
            ui.info(f"saved {saved}")
        elif name == "/flags":
            ui.flag_defs(conv.engine.bundle.flags, conv.mind.know.flags if conv.mind else {})
        elif name == "/memory":
            ui.memories(conv.session.memories)
        elif name == "/reset":
            conv.reset()
            ui.info("session reset")
        else:
            ui.info(f"unknown command {name}; /help lists them")
    except NpcchatError as e:
        ui.error(e)
    return False


def _display(conv: Conversation) -> dict[str, str]:
    return {n: d.display for n, d in conv.mind.know.flags.items()} if conv.mind else {}


def _idle(conv: Conversation) -> None:
    """Before waiting for the player: decode what the next prompt holds up to <PLAYER>."""
    from npcchat.cli import ui
    from npcchat.errors import NpcchatError

    try:
        conv.predecode()
    except KeyboardInterrupt:
        conv.engine.forget()
    except NpcchatError as e:
        ui.warn(f"could not prepare the next turn ahead of time ({e.message})")
