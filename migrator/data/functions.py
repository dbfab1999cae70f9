"""Copy the source's function libraries (Redis 7.0+ / Valkey): FUNCTION DUMP/RESTORE, or the
libraries' code loaded one by one when the target rejects the dump format."""

from __future__ import annotations

from typing import Any

import redis

from migrator.data import values


def copy_functions(src: redis.Redis, dst: redis.Redis) -> tuple[int, str]:
    """Copy the source's function libraries; returns (libraries copied, how)."""
    try:
        libs = src.execute_command("FUNCTION", "LIST", "WITHCODE")
    except redis.exceptions.ResponseError:
        return 0, "source has no functions (before Redis 7.0)"
    if not libs:
        return 0, "source has no function libraries"
    payload = src.execute_command("FUNCTION", "DUMP")
    try:
        dst.execute_command("FUNCTION", "RESTORE", payload, "REPLACE")
        return len(libs), "FUNCTION DUMP/RESTORE"
    except redis.exceptions.ResponseError:
        pass  # an older target rejects the newer dump format: load each library's code
    for lib in libs:
        code = _lib_field(lib, b"library_code")
        dst.execute_command("FUNCTION", "LOAD", "REPLACE", code)
    return len(libs), "FUNCTION LIST WITHCODE + FUNCTION LOAD REPLACE"


def _lib_field(lib: Any, name: bytes) -> Any:
    if isinstance(lib, dict):
        return lib.get(name) or lib.get(name.decode())
    items = list(lib)
    for i in range(0, len(items) - 1, 2):
        if values._s(items[i]) == name.decode():
            return items[i + 1]
    raise KeyError(name)
