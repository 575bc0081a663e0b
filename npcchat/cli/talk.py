"""``npcchat talk``: a REPL for designers, or scripted turns with ``--say`` (and ``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from npcchat import Conversation, Runtime

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
    (
        "/event ...",
        "a game event: /event stage complete, /event items +key -coin, "
        "/event memory day=12 TEXT, /event time 13, /event {JSON} (/event alone: all forms)",
    ),
    ("/prompt TEXT", "the prompt the model would read for TEXT (lore, memories, state)"),
    ("/memory", "long-term memories (old turns, rules' and the game's memory lines)"),
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
            help="Session file (.toml/.json): resumed if it exists, else created; "
            "saved after every turn."
        ),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature (0: greedy).")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Draw from the k most likely tokens (0: all; default 50).")
    ] = None,
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
    import npcchat
    from npcchat.cli import common, ui

    cfg = common.build_config(
        config,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        seed=seed,
        repeat_penalty=repeat_penalty,
        threads=threads,
        gpu_layers=gpu_layers,
        ctx=ctx,
        lora=lora,
        lora_scale=lora_scale,
    )
    with npcchat.load(bundle, config=cfg) as rt:
        if not rt.has_heads and not json_out:
            ui.warn(
                f"{rt.bundle.name} has no heads: replies only, no state changes "
                "(npcchat heads fit adds them)"
            )
        with _conversation(rt, npc, session, quiet=json_out) as conv:
            if say:
                _scripted(conv, say, json_out)
            else:
                _repl(rt, conv)


def _conversation(rt: Runtime, npc: str | None, path: Path | None, quiet: bool) -> Conversation:
    from npcchat.cli import ui

    conv = rt.open(npc, path, on_warning=_ignore if quiet else ui.warn)
    if conv.restored_snapshot and path is not None and not quiet:
        ui.info(f"restored the KV cache saved with {path.name}")
    return conv


def _ignore(message: str) -> None:
    """``--json`` output stays machine-readable: no warnings on the terminal."""


def _scripted(conv: Conversation, lines: list[str], json_out: bool) -> None:
    from npcchat.cli import ui

    for line in (readable(text) for text in lines):
        if json_out:
            r = conv.say(line)
            print(r.to_json(), flush=True)
        else:
            ui.you(line)
            ui.reply_start(conv.npc_name)
            r = conv.say(line, ui.reply_text)
            ui.reply_end()
            ui.turn_summary(r, _display(conv), conv.engine.cfg.state.decimals)


def readable(text: str) -> str:
    """Command-line text as valid Unicode: bytes that were not UTF-8 (Python keeps them as
    lone surrogates in argv) become U+FFFD instead of failing deep in the tokenizer."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _reader(conv: Conversation) -> Any:
    """How the player's lines are read: the line editor on a terminal (history per NPC,
    Tab completion, wide-character editing), plain ``input()`` when piped."""
    from npcchat.cli import lineedit

    if not lineedit.interactive():
        return input
    from npcchat.config import home
    from npcchat.conversation import SETTABLE

    commands = [c.split(" ")[0] for c, _ in HELP]
    history = lineedit.history_path(home(), conv.session.npc_id)
    editor = lineedit.LineEditor(history, [*commands, "/exit"], SETTABLE)

    def read(prompt: str) -> str:
        line = editor.read(prompt)
        if line is None:
            raise EOFError
        return line

    return read


def _read_line(read: Any) -> str | None:
    from npcchat.cli import ui

    while True:
        try:
            line: str = read(ui.prompt_text())
            return line
        except EOFError:
            return None
        except KeyboardInterrupt:
            ui.info("\n(Ctrl-D or /quit to leave)")


def _repl(rt: Runtime, conv: Conversation) -> None:
    from npcchat.cli import ui

    s = conv.session
    ui.banner(
        conv.npc_name,
        s.npc_id,
        rt.bundle.name,
        str(conv.path) if conv.path else None,
        len(s.history),
    )
    if conv.mind is not None:
        k = conv.mind.know
        ui.info(
            f"knowledge: {_count(len(k.lore), 'lore entry', 'lore entries')}, "
            f"{_count(len(k.descriptions), 'description')}, {_count(len(k.triggers), 'trigger')}"
            f" · retrieval and memory ranking: {conv.mind.method} · "
            f"{_count(len(s.memories), 'memory', 'memories')}"
        )
    conv.idle_snapshots = True  # written by _idle, before each wait for the player
    try:
        _converse(rt, conv)
    finally:
        conv.flush_snapshot()  # a predecode that failed or was interrupted left it due


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _converse(rt: Runtime, conv: Conversation) -> None:
    from npcchat.cli import ui

    read = _reader(conv)
    warned = False  # /quit with unsaved turns warns once
    while True:
        _idle(conv)
        line = _read_line(read)
        if line is None:
            ui.out.print()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(rt, conv, line):
                unsaved = len(conv.session.history) if conv.path is None else 0
                if unsaved and not warned:
                    warned = True
                    ui.warn(
                        f"{_count(unsaved, 'turn')} of this session are not saved: /save FILE "
                        "keeps them (and every turn after); /quit again leaves without"
                    )
                    continue
                break
            continue
        _run_turn(conv, lambda cb, text=line: conv.say(text, cb))


def _run_turn(conv: Conversation, action: Any) -> None:
    from npcchat.cli import ui
    from npcchat.errors import NpcchatError

    ui.reply_start(conv.npc_name)
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
    ui.turn_summary(r, _display(conv), conv.engine.cfg.state.decimals)


def _command(rt: Runtime, conv: Conversation, line: str) -> bool:
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
            if conv.undo():
                ui.info("last turn taken back; the state is now:")
                ui.state(conv.session)
            else:
                ui.info("(nothing to undo)")
        elif name == "/retry":
            _run_turn(conv, conv.retry)
        elif name == "/save":
            if rest:  # the session file from now on: every later turn is saved there too
                saved = conv.save_as(Path(rest))
                ui.info(f"saved {saved}; later turns are saved there too")
            else:
                saved = conv.save()
                ui.info(f"saved {saved}")
        elif name == "/flags":
            ui.flag_defs(rt.flags, conv.mind.know.flags if conv.mind else {})
        elif name == "/event":
            from npcchat.sessions import events

            if not rest:
                ui.info(f"usage: {events.COMMAND_HELP}")
            else:
                record = conv.apply_events(events.parse_command(rest))
                ui.event_changes(record.changes)
        elif name == "/prompt":
            if not rest:
                ui.info("usage: /prompt TEXT (the player's line to show the prompt for)")
            else:
                fitted = conv.prompt(rest)
                ui.model_prompt(fitted.prompt.text, len(fitted.tokens), fitted.dropped_turns)
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
        pass  # the player pressed Ctrl-C while the next prompt was prepared: carry on
    except NpcchatError as e:
        ui.warn(f"could not prepare the next turn ahead of time ({e.message})")
