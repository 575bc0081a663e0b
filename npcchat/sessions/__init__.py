"""Sessions on disk: session files (``session``) and the KV snapshots saved beside them
(``snapshot``). Imports the foundation and the runtime; nothing above it.
"""
