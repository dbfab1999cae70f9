"""What each command is, from the servers' own ``COMMAND`` replies: its class and its keys.

Both sides are asked at start-up. A command's flags are the union of what the two sides say
(Redis 6.2 has no ``blocking`` flag but Valkey does; a side that calls it a write wins), and its
key positions come from whichever side publishes key specs (Redis 7+ / Valkey), else from the
legacy first/last/step triple. A command one side does not know is still classified from the
other side's entry, and ``known_by`` says which side lacks it, so the shim can report it
rather than send it where it would fail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SOURCE, TARGET = 0, 1
SIDES = (SOURCE, TARGET)
SIDE_NAMES = ("source", "target")


class Cls(str, Enum):
    """The classes the routing table distinguishes."""

    READ = "read"
    WRITE = "write"
    BLOCKING = "blocking"  # a write that may block: answered by one side, mirrored by effect
    BLOCKING_READ = "blocking-read"  # a read that may block (XREAD BLOCK): one side only
    SCRIPT = "script"  # EVAL/EVALSHA/FCALL: run on both sides
    SCRIPT_ADMIN = "script-admin"  # SCRIPT LOAD/FLUSH, FUNCTION LOAD/DELETE/...: both sides
    ADMIN = "admin"  # about the server, not the data (INFO, CONFIG GET, PING...): one side only
    SERVER_BOTH = "server-both"  # changes a server setting (CONFIG SET, SCRIPT KILL...): every side in use
    PUBSUB_COUNT = "pubsub-count"  # PUBSUB NUMSUB/CHANNELS...: asked of every side, the answers added up
    CONNECTION = "connection"  # connection state (SELECT, HELLO, CLIENT SETNAME...): both sides
    LOCAL = "local"  # answered by the shim itself (AUTH, QUIT)
    TX = "tx"  # MULTI, EXEC, DISCARD, WATCH, UNWATCH
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    UNSUPPORTED = "unsupported"  # would break the shim's stream (MONITOR, SYNC...): refused
    UNKNOWN = "unknown"  # neither side knows it: sent to the answering side, which says so

    def __str__(self) -> str:
        return self.value


# Commands whose class is about how the shim must treat them, not what the flags say.
_BY_NAME: dict[bytes, Cls] = {
    b"auth": Cls.LOCAL,
    b"quit": Cls.LOCAL,
    b"hello": Cls.CONNECTION,
    b"select": Cls.CONNECTION,
    b"readonly": Cls.CONNECTION,
    b"readwrite": Cls.CONNECTION,
    b"multi": Cls.TX,
    b"exec": Cls.TX,
    b"discard": Cls.TX,
    b"watch": Cls.TX,
    b"unwatch": Cls.TX,
    b"eval": Cls.SCRIPT,
    b"evalsha": Cls.SCRIPT,
    b"fcall": Cls.SCRIPT,
    b"eval_ro": Cls.READ,
    b"evalsha_ro": Cls.READ,
    b"fcall_ro": Cls.READ,
    b"subscribe": Cls.SUBSCRIBE,
    b"psubscribe": Cls.SUBSCRIBE,
    b"ssubscribe": Cls.SUBSCRIBE,
    b"unsubscribe": Cls.SUBSCRIBE,
    b"punsubscribe": Cls.SUBSCRIBE,
    b"sunsubscribe": Cls.SUBSCRIBE,
    b"publish": Cls.PUBLISH,
    b"spublish": Cls.PUBLISH,
    b"reset": Cls.UNSUPPORTED,
    b"wait": Cls.ADMIN,
    b"waitaof": Cls.ADMIN,
}
_BY_SUBCOMMAND: dict[tuple[bytes, bytes], Cls] = {
    (b"client", b"setname"): Cls.CONNECTION,
    (b"client", b"tracking"): Cls.UNSUPPORTED,
    (b"client", b"caching"): Cls.UNSUPPORTED,
    (b"client", b"reply"): Cls.UNSUPPORTED,
    (b"client", b"trackinginfo"): Cls.ADMIN,
    (b"script", b"load"): Cls.SCRIPT_ADMIN,
    (b"script", b"flush"): Cls.SCRIPT_ADMIN,
    (b"function", b"load"): Cls.SCRIPT_ADMIN,
    (b"function", b"delete"): Cls.SCRIPT_ADMIN,
    (b"function", b"flush"): Cls.SCRIPT_ADMIN,
    (b"function", b"restore"): Cls.SCRIPT_ADMIN,
}

# Commands that act on the server rather than on the data: each one decided, never left to its
# flags. (command, subcommand or None) -> (class, why). docs/shim.md has the same table, and a
# test keeps the two in step. SERVER_BOTH goes to every side the phase uses and the write side's
# reply is returned (SCRIPT/FUNCTION KILL: OK if a script was killed on either side);
# PUBSUB_COUNT asks every side and adds the answers up; ADMIN is answered by the write side
# alone; UNSUPPORTED is refused with an error naming the command.
SERVER_COMMANDS: dict[tuple[bytes, bytes | None], tuple[Cls, str]] = {
    (b"config", b"set"): (Cls.SERVER_BOTH, "a setting (notify-keyspace-events...) must hold on the side that serves after a cutover"),
    (b"config", b"resetstat"): (Cls.SERVER_BOTH, "statistics reset on every side alike"),
    (b"config", b"rewrite"): (Cls.SERVER_BOTH, "persists what CONFIG SET changed, on every side"),
    (b"config", b"get"): (Cls.ADMIN, "read"),
    (b"script", b"kill"): (Cls.SERVER_BOTH, "the script runs on both sides; one left running keeps that side BUSY"),
    (b"function", b"kill"): (Cls.SERVER_BOTH, "as SCRIPT KILL"),
    (b"slowlog", b"reset"): (Cls.SERVER_BOTH, "statistics reset on every side alike"),
    (b"latency", b"reset"): (Cls.SERVER_BOTH, "statistics reset on every side alike"),
    (b"memory", b"purge"): (Cls.SERVER_BOTH, "harmless on every side"),
    (b"pubsub", b"channels"): (Cls.PUBSUB_COUNT, "subscribers may sit on either side: channels of both"),
    (b"pubsub", b"numsub"): (Cls.PUBSUB_COUNT, "subscribers of both sides added up"),
    (b"pubsub", b"numpat"): (Cls.PUBSUB_COUNT, "patterns of both sides added up"),
    (b"pubsub", b"shardchannels"): (Cls.PUBSUB_COUNT, "as PUBSUB CHANNELS"),
    (b"pubsub", b"shardnumsub"): (Cls.PUBSUB_COUNT, "as PUBSUB NUMSUB"),
    (b"client", b"kill"): (Cls.ADMIN, "ID/ADDR only, on the write side, where CLIENT ID/LIST are answered; "
                                       "filters that would match the shim's own connections are refused"),
    (b"client", b"pause"): (Cls.UNSUPPORTED, "would pause the shim's connections of every client"),
    (b"client", b"unpause"): (Cls.UNSUPPORTED, "as CLIENT PAUSE"),
    (b"client", b"id"): (Cls.ADMIN, "the write side's connection"),
    (b"client", b"info"): (Cls.ADMIN, "the write side's connection"),
    (b"client", b"list"): (Cls.ADMIN, "the write side's connections"),
    (b"client", b"unblock"): (Cls.ADMIN, "blocking commands block on the write side"),
    (b"acl", b"setuser"): (Cls.UNSUPPORTED, "changes users on one server; the shim's own user may be among them"),
    (b"acl", b"deluser"): (Cls.UNSUPPORTED, "as ACL SETUSER"),
    (b"acl", b"load"): (Cls.UNSUPPORTED, "as ACL SETUSER"),
    (b"acl", b"save"): (Cls.UNSUPPORTED, "as ACL SETUSER"),
    (b"module", b"load"): (Cls.UNSUPPORTED, "a module must be loaded on each server by its operator"),
    (b"module", b"loadex"): (Cls.UNSUPPORTED, "as MODULE LOAD"),
    (b"module", b"unload"): (Cls.UNSUPPORTED, "as MODULE LOAD"),
    (b"debug", None): (Cls.UNSUPPORTED, "DEBUG SLEEP/RELOAD/... act on one server and stall or reload it"),
    (b"shutdown", None): (Cls.UNSUPPORTED, "stops a server the migration depends on"),
    (b"monitor", None): (Cls.UNSUPPORTED, "streams every command: one reply per command no longer holds"),
    (b"sync", None): (Cls.UNSUPPORTED, "replication bypasses the migration"),
    (b"psync", None): (Cls.UNSUPPORTED, "as SYNC"),
    (b"replconf", None): (Cls.UNSUPPORTED, "as SYNC"),
    (b"replicaof", None): (Cls.UNSUPPORTED, "turns a side into a replica of something else"),
    (b"slaveof", None): (Cls.UNSUPPORTED, "as REPLICAOF"),
    (b"failover", None): (Cls.UNSUPPORTED, "hands a side's role to a replica"),
    (b"save", None): (Cls.ADMIN, "a snapshot of the side holding every acknowledged write"),
    (b"bgsave", None): (Cls.ADMIN, "as SAVE"),
    (b"bgrewriteaof", None): (Cls.ADMIN, "as SAVE"),
    (b"lastsave", None): (Cls.ADMIN, "read"),
    (b"swapdb", None): (Cls.WRITE, "changes data: both sides, ordered as a barrier"),
    (b"flushall", None): (Cls.WRITE, "changes data: both sides, ordered as a barrier"),
    (b"info", None): (Cls.ADMIN, "read"),
    (b"dbsize", None): (Cls.ADMIN, "read"),
    (b"latency", b"latest"): (Cls.ADMIN, "read"),
    (b"slowlog", b"get"): (Cls.ADMIN, "read"),
    (b"memory", b"stats"): (Cls.ADMIN, "read"),
}
for (_name, _sub), (_cls, _why) in SERVER_COMMANDS.items():
    if _sub is None:
        _BY_NAME[_name] = _cls
    else:
        _BY_SUBCOMMAND[(_name, _sub)] = _cls

# Blocking flags on these only matter with a BLOCK option.
_BLOCK_OPTION = frozenset({b"xread", b"xreadgroup"})
# EVAL-style numkeys at argv[2], for a side without key specs (Redis 6.2).
_NUMKEYS_AT_2 = frozenset({b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"})


@dataclass
class KeySpec:
    begin: tuple  # ("index", pos) | ("keyword", keyword, startfrom) | ("unknown",)
    find: tuple  # ("range", lastkey, keystep, limit) | ("keynum", keynumidx, firstkey, keystep) | ("unknown",)


@dataclass
class CommandInfo:
    name: bytes
    arity: int = 0
    flags: frozenset = frozenset()
    categories: frozenset = frozenset()
    first: int = 0
    last: int = 0
    step: int = 0
    key_specs: list[KeySpec] = field(default_factory=list)
    subcommands: dict[bytes, CommandInfo] = field(default_factory=dict)
    single_key: bool = False  # exactly one key, at argv[1] (GET, SET, INCR...): no spec walk per command

    def keys(self, args: list[bytes]) -> list[bytes]:
        """The key names in ``args`` (best effort: a malformed command yields what can be found)."""
        if self.single_key:
            return [args[1]] if len(args) > 1 else []
        if self.key_specs:
            return [args[i] for i in _keys_from_specs(self.key_specs, args)]
        name = args[0].lower()
        if name in _NUMKEYS_AT_2:
            return _numkeys(args, 2)
        if self.first <= 0:
            return []
        last = self.last if self.last >= 0 else len(args) + self.last
        step = self.step or 1
        return [args[i] for i in range(self.first, min(last, len(args) - 1) + 1, step)]


def _numkeys(args: list[bytes], at: int) -> list[bytes]:
    try:
        n = int(args[at])
    except (IndexError, ValueError):
        return []
    return list(args[at + 1 : at + 1 + max(n, 0)])


def _keys_from_specs(specs: Iterable[KeySpec], args: list[bytes]) -> list[int]:
    """Key positions, following the server's own algorithm (db.c getKeysUsingKeySpecs)."""
    argc = len(args)
    out: list[int] = []
    for spec in specs:
        kind = spec.begin[0]
        if kind == "index":
            first = spec.begin[1]
        elif kind == "keyword":
            keyword, startfrom = spec.begin[1].lower(), spec.begin[2]
            rng = range(startfrom, argc) if startfrom >= 0 else range(argc + startfrom, 0, -1)
            first = next((i + 1 for i in rng if 0 <= i < argc and args[i].lower() == keyword), None)
            if first is None:
                continue
        else:
            continue
        fk = spec.find
        if fk[0] == "range":
            lastkey, step, limit = fk[1], fk[2] or 1, fk[3]
            if lastkey >= 0:
                last = first + lastkey
            elif not limit:
                last = argc + lastkey
            else:
                last = first + ((argc - first) // limit + lastkey)
        elif fk[0] == "keynum":
            keynumidx, firstkey, step = fk[1], fk[2], fk[3] or 1
            if first + keynumidx >= argc:
                continue
            try:
                numkeys = int(args[first + keynumidx])
            except ValueError:
                continue
            if numkeys < 0:
                continue
            first += firstkey
            last = first + numkeys - 1
        else:
            continue
        i = first
        while i <= last and 0 < i < argc:
            out.append(i)
            i += step
    return sorted(set(out))


def _as_dict(x: Any) -> dict:
    """A RESP3 map, or its RESP2 rendering as a flat list of pairs, as a dict with str keys."""
    if isinstance(x, dict):
        items = x.items()
    elif isinstance(x, list):
        items = zip(x[0::2], x[1::2])
    else:
        return {}
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in items}


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _parse_key_spec(raw: Any) -> KeySpec:
    d = _as_dict(raw)
    bs, fk = _as_dict(d.get("begin_search")), _as_dict(d.get("find_keys"))
    bs_spec, fk_spec = _as_dict(bs.get("spec")), _as_dict(fk.get("spec"))
    btype, ftype = _text(bs.get("type", "unknown")), _text(fk.get("type", "unknown"))
    if btype == "index":
        begin: tuple = ("index", int(bs_spec.get("index", 0)))
    elif btype == "keyword":
        begin = ("keyword", bytes(bs_spec.get("keyword", b"")), int(bs_spec.get("startfrom", 0)))
    else:
        begin = ("unknown",)
    if ftype == "range":
        find: tuple = ("range", int(fk_spec.get("lastkey", 0)), int(fk_spec.get("keystep", 1)), int(fk_spec.get("limit", 0)))
    elif ftype == "keynum":
        find = ("keynum", int(fk_spec.get("keynumidx", 0)), int(fk_spec.get("firstkey", 1)), int(fk_spec.get("keystep", 1)))
    else:
        find = ("unknown",)
    return KeySpec(begin, find)


def parse_command_entry(entry: list) -> CommandInfo:
    """One element of a ``COMMAND`` / ``COMMAND INFO`` reply (Redis 6.2 through Valkey 9)."""
    name = bytes(entry[0]).lower()
    info = CommandInfo(
        name=name,
        arity=int(entry[1]),
        flags=frozenset(_text(f).lower() for f in entry[2]),
        first=int(entry[3]),
        last=int(entry[4]),
        step=int(entry[5]),
        categories=frozenset(_text(c).lower() for c in entry[6]) if len(entry) > 6 else frozenset(),
    )
    if len(entry) > 8 and entry[8]:
        info.key_specs = [_parse_key_spec(s) for s in entry[8]]
    if len(entry) > 9 and entry[9]:
        for sub in entry[9]:
            si = parse_command_entry(sub)
            info.subcommands[si.name.split(b"|", 1)[-1]] = si
    return info


def parse_command_reply(reply: list) -> dict[bytes, CommandInfo]:
    """The whole ``COMMAND`` reply as name → info."""
    out: dict[bytes, CommandInfo] = {}
    for entry in reply:
        if entry:
            info = parse_command_entry(entry)
            out[info.name] = info
    return out


@dataclass
class Classified:
    cls: Cls
    info: CommandInfo | None
    known: tuple[bool, bool]  # (source knows it, target knows it)
    # What the session's pipelined-chunk path needs to know of this command, worked out once
    # (see Session._batch); a classification is shared by every call of its command.
    batch: tuple | None = field(default=None, compare=False, repr=False)

    def keys(self, args: list[bytes]) -> list[bytes]:
        return self.info.keys(args) if self.info else []


class CommandTable:
    """Both sides' command tables merged; ``classify`` is called for every client command."""

    def __init__(self, source: dict[bytes, CommandInfo] | None, target: dict[bytes, CommandInfo] | None) -> None:
        # None: that side's table could not be read yet (it was down at start-up). Until it is,
        # commands are assumed known there rather than all reported unknown.
        self.tables: list[dict[bytes, CommandInfo] | None] = [source, target]
        self._cache: dict[bytes, Classified] = {}
        self._exact: dict[bytes, Classified] = {}

    def set_table(self, side: int, table: dict[bytes, CommandInfo]) -> None:
        self.tables[side] = table
        self._cache, self._exact = {}, {}

    def loaded(self, side: int) -> bool:
        return self.tables[side] is not None

    def unknown_to(self, side: int) -> set[bytes]:
        """Commands the other side has and ``side`` lacks (reported at start-up)."""
        mine, other = self.tables[side], self.tables[1 - side]
        if mine is None or other is None:
            return set()
        return set(other) - set(mine)

    def _merged(self, name: bytes, sub: bytes | None) -> tuple[CommandInfo | None, tuple[bool, bool]]:
        infos = []
        for table in self.tables:
            info = table.get(name) if table is not None else None
            if info is not None and sub is not None and info.subcommands:
                info = info.subcommands.get(sub)  # an unknown subcommand is unknown
            elif info is not None and sub is not None and not info.subcommands:
                pass  # a side without subcommand detail (Redis 6.2): the container decides
            infos.append(info)
        known = (infos[0] is not None or self.tables[0] is None, infos[1] is not None or self.tables[1] is None)
        present = [i for i in infos if i is not None]
        if not present:
            return None, known
        with_specs = next((i for i in present if i.key_specs), present[0])
        merged = CommandInfo(
            name=with_specs.name,
            arity=with_specs.arity,
            flags=frozenset().union(*(i.flags for i in present)),
            categories=frozenset().union(*(i.categories for i in present)),
            first=with_specs.first,
            last=with_specs.last,
            step=with_specs.step,
            key_specs=with_specs.key_specs,
        )
        specs = merged.key_specs
        merged.single_key = (len(specs) == 1 and specs[0].begin == ("index", 1) and specs[0].find[:2] == ("range", 0)
                             and not merged.subcommands)
        return merged, known

    def classify(self, args: list[bytes]) -> Classified:
        first = args[0]
        hit = self._exact.get(first)  # the name as the client spells it: no lower() per command
        if hit is not None:
            return hit
        name = first.lower()
        hit = self._cache.get(name)
        if hit is not None:
            if len(self._exact) < 4096:
                self._exact[first] = hit
            return hit
        has_sub = self._has_subcommands(name)
        sub = args[1].lower() if len(args) > 1 and has_sub else None
        info, known = self._merged(name, sub)
        cls = _BY_SUBCOMMAND.get((name, sub)) if sub is not None else None
        if cls is None:
            cls = _BY_NAME.get(name)
        if cls is None:
            cls = _from_flags(name, info)
        if name in _BLOCK_OPTION and cls in (Cls.BLOCKING, Cls.BLOCKING_READ):
            blocks = any(a.lower() == b"block" for a in args[1:])
            if not blocks:
                cls = Cls.WRITE if cls is Cls.BLOCKING else Cls.READ
            return Classified(cls, info, known)  # depends on the arguments: not cached
        out = Classified(cls, info, known)
        if not has_sub:  # a container (CLIENT, CONFIG...) depends on its subcommand: not cached
            self._cache[name] = out
        return out

    def _has_subcommands(self, name: bytes) -> bool:
        return any(t is not None and t.get(name) is not None and t[name].subcommands for t in self.tables) or name in (
            b"client", b"script", b"function", b"config", b"object", b"memory", b"xinfo", b"cluster", b"command",
            b"debug", b"acl", b"latency", b"slowlog", b"pubsub", b"module", b"xgroup",
        )


def _from_flags(name: bytes, info: CommandInfo | None) -> Cls:
    if info is None:
        return Cls.UNKNOWN
    flags = info.flags
    blocking = "blocking" in flags or "@blocking" in info.categories
    if "write" in flags:
        return Cls.BLOCKING if blocking else Cls.WRITE
    if "readonly" in flags:
        return Cls.BLOCKING_READ if blocking else Cls.READ
    if "pubsub" in flags:
        return Cls.ADMIN  # PUBSUB CHANNELS etc.: about the server
    return Cls.ADMIN
