"""``npcchat serve``: the HTTP endpoint a game server calls, a thin layer over the public API
(:mod:`npcchat.api`): the original AI server's turn contract (``/v1/turn``, JSON or
Server-Sent Events), the original model server's ``/api/predict_main``, sessions, health
and Prometheus metrics. ``schemas`` is the contract (pydantic, published at
``/openapi.json``), ``legacy`` parses prompts in the original format, ``store`` keeps one
conversation per (player, NPC) in session files, ``metrics`` counts, ``app`` routes.
"""
