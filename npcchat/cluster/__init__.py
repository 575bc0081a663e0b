"""Work past one machine: eval scenarios and heads-fit prefills on Ray actors, each of which
loads the bundle once (``pip install '.[ray]'`` in npcchat's clone). The only package that
imports ray.

:mod:`.worker` is what an actor holds (plain Python, the local code); :mod:`.pool` spreads
chunks over actors and survives dead ones; :mod:`.eval` is what ``npcchat eval --ray`` and
``npcchat heads fit --ray`` call.
"""
