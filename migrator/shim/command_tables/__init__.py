"""Command tables shipped with migrator, for a side whose ``COMMAND`` is refused.

Managed services (Memorystore, Aiven...) block ``COMMAND``; the shim needs each command's key
positions and flags to mirror it. Each file here is the ``COMMAND`` reply of one server family,
generated once from a real binary (``python -m migrator.shim.command_tables``) and stored as
gzipped JSON: ``redis-6.2``, ``redis-7.0``, ``valkey-8.1``, ``valkey-9.1``.

``family_for(kind, version)`` picks the newest family of the same kind not newer than the
server (an older one lacks commands the server has, never the other way round), else the
oldest of that kind; a Redis newer than 7.0 (7.2, 7.4, 8.x) gets ``redis-7.0``, so commands
added since (``HEXPIRE``, ``HSETEX``...) are unknown to the shim's table and reported as such.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from typing import Any

FAMILIES = ("redis-6.2", "redis-7.0", "valkey-8.1", "valkey-9.1")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def family_for(kind: str, version: str) -> str:
    """The shipped family that stands in for a ``kind`` server (redis/valkey) at ``version``."""
    same = [f for f in FAMILIES if f.split("-")[0] == kind] or [f for f in FAMILIES if f.startswith("redis-")]
    v = _version(version)[:2]
    older = [f for f in same if _version(f.split("-")[1]) <= v]
    return older[-1] if older else same[0]


def _to_bytes(x: Any) -> Any:
    """JSON back to what a raw RESP2 ``COMMAND`` reply holds: strings as bytes, lists nested."""
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, list):
        return [_to_bytes(i) for i in x]
    return x


def load_reply(family: str) -> list:
    """The stored ``COMMAND`` reply of ``family`` (raw: as ``parse_command_reply`` takes it)."""
    if family not in FAMILIES:
        raise KeyError(f"no shipped command table for {family!r} (have: {', '.join(FAMILIES)})")
    data = resources.files(__name__).joinpath(f"{family}.json.gz").read_bytes()
    return _to_bytes(json.loads(gzip.decompress(data)))


def _to_json(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, dict):  # a RESP3 map: stored as RESP2 renders it, a flat list of pairs
        return [_to_json(i) for kv in x.items() for i in kv]
    if isinstance(x, (list, set, tuple)):
        return [_to_json(i) for i in x]
    return x


def generate(label: str, out_dir) -> None:  # pragma: no cover - run by hand when a family is added
    """Start the ``label`` binary, read its ``COMMAND`` reply (RESP2) and store it in ``out_dir``."""
    from pathlib import Path

    from migrator import servers

    with servers.start(label) as s:
        client = s.client()
        conn = client.connection_pool.get_connection()
        try:
            conn.send_command("COMMAND")
            reply = conn.read_response()
        finally:
            client.connection_pool.release(conn)
            client.close()
    entries = sorted(_to_json(reply), key=lambda e: e[0])
    path = Path(out_dir) / f"{label}.json.gz"
    path.write_bytes(gzip.compress(json.dumps(entries, separators=(",", ":")).encode(), mtime=0))


if __name__ == "__main__":  # pragma: no cover
    import sys
    from pathlib import Path

    for fam in sys.argv[1:] or FAMILIES:
        generate(fam, Path(__file__).parent)
        print("wrote", fam)
