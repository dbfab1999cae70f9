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
    except redis.exceptions.ResponseError as e:
        if _before_functions(src):
            return 0, "source has no functions (before Redis 7.0)"
        # A managed service may refuse FUNCTION: say so rather than "no functions".
        return 0, (f"function libraries NOT copied: FUNCTION LIST is refused on the source "
                   f"({str(e).splitlines()[0]}); load them on the target by hand (FUNCTION LOAD)")
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


def _before_functions(src: redis.Redis) -> bool:
    """Whether the source predates functions (Redis before 7.0; every Valkey has them)."""
    try:
        info = src.info("server")
    except redis.exceptions.ResponseError:
        return False
    if "valkey_version" in info or str(info.get("server_name", "")).lower() == "valkey":
        return False
    major = str(info.get("redis_version", "0")).split(".")[0]
    return major.isdigit() and int(major) < 7


def _lib_field(lib: Any, name: bytes) -> Any:
    if isinstance(lib, dict):
        return lib.get(name) or lib.get(name.decode())
    items = list(lib)
    for i in range(0, len(items) - 1, 2):
        if values._s(items[i]) == name.decode():
            return items[i + 1]
    raise KeyError(name)
