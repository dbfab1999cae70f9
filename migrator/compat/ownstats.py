"""Migrator's own commands in the source's ``INFO commandstats``, so they are not taken for the application's.

The statistics are server-wide: the DUMPs, SCANs and MEMORY USAGEs a compatibility run (or a
sync, or a check) sends are counted with the application's calls, and the next compatibility
run would report them as commands the application used. So every such run reads the source's
statistics before and after its own work and adds the difference to a ledger,
``state_dir/compat/own-commands.json``; the pre-flight subtracts the ledger from what it reads.

The ledger holds for one life of the statistics: it is reset when the source's ``run_id``
changes (a restart) or any counter went down since it was last recorded (``CONFIG
RESETSTAT``). The difference over a run also counts what the application sent meanwhile, so a
command the application used *only* while migrator was running on the source is not seen
(docs/compatibility.md says so); sync and check record only the commands they send
themselves (``DATA_COMMANDS``), which every target has.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from migrator.state import atomic_write_json

LEDGER = Path("compat") / "own-commands.json"

# What sync and check send to the source (directly or from their Lua scripts).
DATA_COMMANDS = frozenset({
    "scan", "dump", "pttl", "ttl", "type", "exists", "randomkey", "object|encoding", "memory|usage", "eval",
    "evalsha", "script|load", "script|exists", "config|get", "config|set", "strlen", "getrange", "get", "hlen",
    "hscan", "hmget", "hgetall", "scard", "sscan", "smismember", "smembers", "zcard", "zrange", "zmscore", "llen",
    "lrange", "xlen", "xrange", "xinfo|stream", "xinfo|groups", "xinfo|consumers", "xpending", "function|dump",
    "function|list", "psubscribe", "punsubscribe", "subscribe", "unsubscribe", "client|id", "client|tracking", "time", "publish", "info",
    # asked by the copy and the comparison of newer data and of clusters (hash field TTLs, JSON
    # documents, slot walks)
    "command|info", "hpexpiretime", "json.get", "json.type", "role", "readonly", "asking", "cluster|nodes",
    "cluster|info", "cluster|slots", "cluster|shards", "cluster|myid", "cluster|getkeysinslot",
    "cluster|countkeysinslot",
})


@dataclass
class Ledger:
    run_id: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # calls migrator sent, since the statistics began
    last: dict[str, int] = field(default_factory=dict)  # the source's statistics when last recorded

    def holds_for(self, run_id: str, stats: dict[str, int]) -> bool:
        """Whether the statistics ``stats`` (read now) still include the calls counted here."""
        return bool(self.run_id) and run_id == self.run_id and all(stats.get(n, 0) >= c for n, c in self.last.items())


def path(state_dir: Path | str, node: str = "") -> Path:
    """The ledger of a standalone source, or of one cluster node (``node``: its cluster node id)."""
    if node:
        return Path(state_dir) / LEDGER.parent / "nodes" / f"{node}.json"
    return Path(state_dir) / LEDGER


def load(state_dir: Path | str, node: str = "") -> Ledger:
    try:
        d = json.loads(path(state_dir, node).read_text(encoding="utf-8"))
        return Ledger(str(d["run_id"]), {str(k): int(v) for k, v in d["counts"].items()},
                      {str(k): int(v) for k, v in d["last"].items()})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return Ledger()


def application_calls(state_dir: Path | str, run_id: str, stats: dict[str, int],
                      node: str = "") -> tuple[dict[str, int], dict[str, int]]:
    """``stats`` without migrator's own calls: (the application's calls, the calls subtracted)."""
    ledger = load(state_dir, node)
    if not ledger.holds_for(run_id, stats):
        return dict(stats), {}
    app: dict[str, int] = {}
    ours: dict[str, int] = {}
    for name, calls in stats.items():
        mine = min(calls, ledger.counts.get(name, 0))
        if mine:
            ours[name] = mine
        if calls - mine > 0:
            app[name] = calls - mine
    return app, ours


def record(state_dir: Path | str, run_id: str, before: dict[str, int], after: dict[str, int],
           names: frozenset[str] | None = None, node: str = "") -> None:
    """Add the calls made between ``before`` and ``after`` (of ``names``, or all) to the ledger
    (of cluster node ``node``, when given)."""
    p = path(state_dir, node)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock", timeout=30):
        ledger = load(state_dir, node)
        if not ledger.holds_for(run_id, before):
            ledger = Ledger(run_id)
        if any(after.get(n, 0) < c for n, c in before.items()):  # reset during the run: start over
            ledger = Ledger(run_id)
        else:
            for name, calls in after.items():
                if names is None or name in names:
                    delta = calls - before.get(name, 0)
                    if delta > 0:
                        ledger.counts[name] = ledger.counts.get(name, 0) + delta
        ledger.last = dict(after)
        atomic_write_json(p, {"run_id": ledger.run_id, "counts": ledger.counts, "last": ledger.last})


def command_calls(info: dict[str, Any]) -> dict[str, int]:
    """{"get": 12, "client|setname": 1} from a parsed ``INFO commandstats`` (commands with calls only)."""
    out = {}
    for name, stats in info.items():
        if name.startswith("cmdstat_") and isinstance(stats, dict) and int(stats.get("calls", 0)) > 0:
            out[name[len("cmdstat_"):].lower()] = int(stats["calls"])
    return out


def read_stats(client: Any) -> tuple[str, dict[str, int]]:
    """(run_id, {"get": 12, "client|setname": 1}) of a redis-py client's server."""
    return str(client.info("server").get("run_id", "")), command_calls(client.info("commandstats"))


@contextlib.contextmanager
def recording(state_dir: Path | str, client: Any, names: frozenset[str] | None = DATA_COMMANDS,
              node: str = "") -> Iterator[None]:
    """Around a sync or check: what it sends to the source (``names``) goes into the ledger (of
    cluster node ``node``, for a client of one node of a cluster source).

    A source that refuses INFO is left out silently: the pre-flight cannot read its statistics either.
    """
    import redis

    try:
        run_id, before = read_stats(client)
    except redis.exceptions.RedisError:
        yield
        return
    try:
        yield
    finally:
        try:
            run_id_after, after = read_stats(client)
        except redis.exceptions.RedisError:
            pass
        else:
            if run_id_after == run_id:
                record(state_dir, run_id, before, after, names, node)
