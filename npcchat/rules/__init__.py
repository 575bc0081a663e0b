"""The NPC's rules around the model: conditions that decide whether a flag may fire,
effects with parameters that firing makes on the game's state, actions for the game, and
guarded replies for requests the rules refuse.

Rules are data in the NPC file (:mod:`npcchat.rules.load`, validated at load) and pure
decisions over a turn's state (:mod:`npcchat.rules.model`). They sit beside the NPC's mind
(:mod:`npcchat.mind`), which applies them around every engine turn, so talk, eval, serve
and the Python API share one code path.
"""

from npcchat.rules.model import Case, Effects, FlagRule, Guard, Judgement, Requires, Rules, State

__all__ = ["Case", "Effects", "FlagRule", "Guard", "Judgement", "Requires", "Rules", "State"]
