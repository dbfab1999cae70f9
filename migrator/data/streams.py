"""Type-aware copy of a stream: entries by ID range, then its last ID, groups, consumers and PELs.

DUMP/RESTORE carries all of it at once; this is for targets that cannot read the source's
payloads (a copy back to an older Redis) and for streams too big to DUMP.
"""

from __future__ import annotations

import redis

from migrator.data import values


def copy_stream(src: redis.Redis, dst: redis.Redis, key: bytes, tmp: bytes, chunk: int) -> int:
    """Entries by ID range, then the stream's last ID, consumer groups, consumers and PELs."""
    written = 0
    for part in values.range_stream(src, key, chunk):
        p = dst.pipeline(transaction=False)
        for entry_id, fields in part:
            p.xadd(tmp, fields, id=entry_id)
            written += sum(len(f) + len(v) for f, v in fields.items())
        p.execute()
    if not src.exists(key):
        return written
    info = src.xinfo_stream(key)
    if not dst.exists(tmp):  # an empty stream: create it through a throwaway group
        dst.xgroup_create(tmp, "__migrator__", id="0", mkstream=True)
        dst.xgroup_destroy(tmp, "__migrator__")
    _set_last_id(dst, tmp, info)
    for g in src.xinfo_groups(key):
        _copy_group(src, dst, key, tmp, g, chunk)
    return written


def _set_last_id(dst: redis.Redis, tmp: bytes, info: dict) -> None:
    last = info["last-generated-id"]
    if info.get("entries-added") is not None:
        try:
            dst.execute_command("XSETID", tmp, last, "ENTRIESADDED", info["entries-added"],
                                "MAXDELETEDID", info.get("max-deleted-entry-id") or b"0-0")
            return
        except redis.exceptions.ResponseError:
            pass  # a target before 7.0 has no ENTRIESADDED
    dst.execute_command("XSETID", tmp, last)


def _copy_group(src, dst, key: bytes, tmp: bytes, g: dict, chunk: int) -> None:
    name = g["name"]
    try:
        if g.get("entries-read") is None:
            raise redis.exceptions.ResponseError("no entries-read")
        dst.execute_command("XGROUP", "CREATE", tmp, name, g["last-delivered-id"], "ENTRIESREAD", g["entries-read"])
    except redis.exceptions.ResponseError:
        dst.execute_command("XGROUP", "CREATE", tmp, name, g["last-delivered-id"])
    for c in src.xinfo_consumers(key, name):
        dst.execute_command("XGROUP", "CREATECONSUMER", tmp, name, c["name"])
    start = b"-"
    while True:
        pending = src.xpending_range(key, name, min=start, max=b"+", count=chunk)
        p = dst.pipeline(transaction=False)
        for e in pending:
            p.xclaim(tmp, name, e["consumer"], 0, [e["message_id"]], idle=e["time_since_delivered"],
                     retrycount=e["times_delivered"], force=True, justid=True)
        p.execute()
        if len(pending) < chunk:
            return
        start = b"(" + pending[-1]["message_id"]
