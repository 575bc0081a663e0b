"""Training: models whose `<STATE>` hidden state carries the game state (the ``train``
extra: torch, transformers, peft). The room above ``convert``: it may use npcchat_convert
(checkpoints, tokenizers, the tiny-model factory), npcchat_heads and npcchat's runtime;
nothing below imports it.

* ``npcchat train`` (:mod:`.cli` -> :mod:`.run`): records and a Qwen2 base to a LoRA adapter
  and state heads (and, with ``--bundle``, a bundle). Its parts, by concern:
  :mod:`.tokens` (the base's tokenizer with npcchat's tags, and the vocabulary-only model
  through which the runtime renders training prompts), :mod:`.records` and :mod:`.data`
  (examples rendered by the runtime, split and encoded), :mod:`.model` (base + LoRA +
  heads), :mod:`.loop` (loss, held-out scores, checkpoints, resume), :mod:`.bundle`
  (convert, refit, a first turn).
* :mod:`.state_heads`: the one implementation of "state heads on `<STATE>`": the heads, the
  vector they read (the mean final hidden state at the `<STATE>` positions, after the final
  norm, as the runtime reads it), their loss and the LM loss.
* :mod:`.demo`: the demo NPCs' recipe, ``python -m npcchat_train.demo``;
  :mod:`.speed`: training speed and memory, ``python -m npcchat_train.speed``.
"""
