"""The NPC's mind: NPC files (``npc``), what the NPC knows and remembers (``knowledge``:
lore and descriptions by stage and location, forbidden triggers, long-term memory), text
embeddings for ranking (``embed``), and ``mind``, which applies all of it around each
engine turn. Imports the foundation, the runtime and sessions.
"""
