"""Training: models whose `<STATE>` hidden state carries the game state (development only;
torch). The room above ``convert``: it may use npcchat_convert (checkpoints, tokenizers,
the tiny-model factory), npcchat_heads and npcchat's runtime; nothing below imports it.

* :mod:`.state_heads`: the one implementation of "state heads on `<STATE>`": the heads, the
  vector they read (the mean final hidden state at the `<STATE>` positions, after the final
  norm, as the runtime reads it) and their loss.
* :mod:`.demo`: the demo NPCs' recipe, ``python -m npcchat_train.demo``.
"""
