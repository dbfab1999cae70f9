"""Data sync and the consistency checker (issue 4). One idea per module:

- ``keyspace``: which keys and databases are in scope, SCAN over them (prefetched).
- ``values``: a key's state on one server (type, PTTL, size, digest) and chunked readers.
- ``compare``: exact, chunked comparison of one key on two servers; kinds of difference.
- ``copy``: DUMP/RESTORE and type-aware writers, big keys through a temporary key;
  ``streams`` and ``functions`` copy streams' groups and function libraries.
- ``sync``: the resumable runner; ``checkpoint`` persists its progress; ``verify`` checks each
  copied batch after the mirror settled, using ``watch`` (the source's keyspace events) or
  DUMP-CRC signatures; ``dirty`` reads the keys the shim recorded as dirty.
- ``check``: sampling or full walk, multi-round recheck, repair; ``stats`` the confidence bound.
- ``render``: the sync and check reports (Markdown, HTML with inline SVG); ``gates``:
  ``sync_complete`` and ``consistency``.
- ``fastcall``, ``throttle``, ``failures``: packing big commands, ``--rate``, server errors.
"""
