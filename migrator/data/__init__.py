"""Data sync and the consistency checker (issue 4).

- ``keyspace``: which keys and databases are in scope, and SCAN over them.
- ``values``: type-aware reads in chunks, fingerprints (digests) and exact comparison.
- ``copy``: DUMP/RESTORE and type-aware writers, big keys through a temporary key.
- ``sync``: the resumable copy-then-verify runner; ``checkpoint`` persists its progress.
- ``check``: sampling or full walk, multi-round recheck, confidence bound, repair.
- ``render``: the sync and check reports (Markdown, HTML with inline SVG).
- ``gates``: ``sync_complete`` and ``consistency``.
"""
