"""Which administrative commands each server lets migrator run: probe, don't assume.

Managed services remove commands (``rename-command X ""``: the server answers ``unknown
command``), deny them by ACL (``NOPERM``) or refuse them with a message of their own. Each
capability below is probed without side effects:

- a harmless form that really runs (``CONFIG GET maxmemory``, ``CLIENT ID``, ``OBJECT ENCODING``
  of a key that does not exist, ``SCRIPT EXISTS``, ``EVAL "return 1" 0``...): it answers, or the
  server says why not;
- for commands that cannot run harmlessly (``SYNC``/``PSYNC``/``MONITOR``/``REPLICAOF``/``CONFIG
  SET``/``CLIENT PAUSE``), a form with the wrong number of arguments, which the server rejects
  before running anything (it tells a present command from a renamed one), then ``ACL DRYRUN``
  for this connection's user (Redis 7.0+) for the permission. Without ACL DRYRUN the command is
  "present, permission unconfirmed" — never "available".

SYNC, PSYNC, MONITOR and DEBUG with effects are never sent. The result is a ``Profile``: each
capability's state, what migrator does instead where it is missing, and the managed providers
whose documented restrictions match (``PROVIDERS``), shown by the ``provider`` check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from migrator.compat.model import PASS, WARN, Check
from migrator.compat.rpc import _raw, first_line, is_restricted

AVAILABLE, ABSENT, RENAMED, DENIED, DISABLED, UNCONFIRMED = (
    "available", "absent", "renamed", "denied", "disabled", "unconfirmed")
REFUSED = (RENAMED, DENIED, DISABLED)
PROBE_KEY = "__migrator:capability-probe"  # never written: read-only probes on a missing key
_NO_SHA = "0" * 40

# name, what to run (harmless), or None with (wrong-arity form, ACL DRYRUN form) for a command
# that has effects; the family (for the provider match) and what migrator does without it.
# The wrong-arity forms were checked against the COMMAND tables of Redis 6.2/7.0 and Valkey
# 8.1/9.1 (SYNC and MONITOR take no argument, PSYNC at least two, REPLICAOF exactly two,
# CONFIG SET / CLIENT KILL / CLIENT PAUSE at least one): every one is rejected before it runs.
_PROBES: tuple[tuple[str, str, tuple | None, tuple | None, tuple | None, str], ...] = (
    ("CONFIG GET", "CONFIG", ("CONFIG", "GET", "maxmemory"), None, None,
     "the config check says could-not-check, auth reads the default user's ACL; no gate reads CONFIG"),
    ("CONFIG SET", "CONFIG", None, ("CONFIG", "SET"), ("CONFIG", "SET", "maxmemory", "0"),
     "no keyspace notifications: sync's verify pass compares every copied key; no replica can be attached"),
    ("SYNC", "SYNC", None, ("SYNC", "x"), ("SYNC",),
     "no native replication: mirroring is dual-write through the shim"),
    ("PSYNC", "PSYNC", None, ("PSYNC",), ("PSYNC", "?", "-1"),
     "no native replication: mirroring is dual-write through the shim"),
    ("REPLICAOF", "REPLICAOF", None, ("REPLICAOF",), ("REPLICAOF", "NO", "ONE"),
     "this server cannot be attached as a replica: dual-write"),
    ("DEBUG", "DEBUG", ("DEBUG", "HELP"), None, None, "nothing: migrator does not need DEBUG"),
    ("COMMAND", "COMMAND", ("COMMAND", "COUNT"), None, None,
     "the shim uses the command table shipped for the server's version; compat judges commands from INFO"),
    ("OBJECT ENCODING", "OBJECT", ("OBJECT", "ENCODING", PROBE_KEY), None, None,
     "sync reads types and sizes with TYPE and the size commands instead"),
    ("OBJECT FREQ", "OBJECT", ("OBJECT", "FREQ", PROBE_KEY), None, None, "nothing: migrator does not need it"),
    ("MEMORY USAGE", "MEMORY", ("MEMORY", "USAGE", PROBE_KEY), None, None,
     "big keys are found by element count and string length instead"),
    ("CLIENT ID", "CLIENT", ("CLIENT", "ID"), None, None, "nothing: migrator does not need it"),
    ("CLIENT LIST", "CLIENT", ("CLIENT", "LIST", "ID", "1"), None, None, "nothing: migrator does not need it"),
    ("CLIENT KILL", "CLIENT", None, ("CLIENT", "KILL"), ("CLIENT", "KILL", "ID", "1"),
     "nothing: migrator does not need it"),
    ("CLIENT PAUSE", "CLIENT", None, ("CLIENT", "PAUSE"), ("CLIENT", "PAUSE", "0"),
     "the replication strategy's role swap pauses the source's writes with it; dual-write holds them in the shim"),
    ("MONITOR", "MONITOR", None, ("MONITOR", "x"), ("MONITOR",), "nothing: migrator never uses MONITOR"),
    ("CLUSTER", "CLUSTER", ("CLUSTER", "INFO"), None, None,
     "a standalone server does not need it; a cluster side cannot be read without CLUSTER NODES"),
    ("SCRIPT", "SCRIPT", ("SCRIPT", "EXISTS", _NO_SHA), None, None,
     "sync and check read and write with pipelines instead of Lua"),
    ("EVAL", "SCRIPT", ("EVAL", "return 1", "0"), None, None,
     "sync and check read and write with pipelines instead of Lua"),
    ("FUNCTION", "FUNCTION", ("FUNCTION", "LIST", "LIBRARYNAME", "__migrator_probe__"), None, None,
     "function libraries are not copied: load them on the target by hand"),
    ("DUMP", "DUMP", ("DUMP", PROBE_KEY), None, None, "sync copies type-aware (no DUMP/RESTORE)"),
)
FAMILIES = ("CONFIG", "SYNC", "PSYNC", "REPLICAOF", "DEBUG", "COMMAND", "OBJECT", "CLIENT", "MONITOR", "CLUSTER",
            "SCRIPT", "FUNCTION", "MEMORY", "DUMP")


@dataclass
class Capability:
    name: str  # "CONFIG GET"
    family: str  # "CONFIG"
    state: str  # available / absent (not in this version) / renamed / denied / disabled / unconfirmed
    how: str  # how it was probed
    answer: str = ""  # the server's own words where it refused
    instead: str = ""  # what migrator does without it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Profile:
    role: str
    capabilities: list[Capability] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)  # documented restrictions this matches
    nodes: dict[str, Profile] = field(default_factory=dict)  # a cluster side: each primary's own profile

    def state(self, name: str) -> str | None:
        return next((c.state for c in self.capabilities if c.name == name), None)

    def refused(self) -> list[Capability]:
        return [c for c in self.capabilities if c.state in REFUSED]

    def family_refused(self, family: str) -> bool:
        return any(c.family == family and c.state in REFUSED for c in self.capabilities)

    def family_available(self, family: str) -> bool:
        return all(c.state == AVAILABLE for c in self.capabilities if c.family == family)

    def to_json(self) -> dict[str, Any]:
        out = {"role": self.role, "providers": self.providers, "capabilities": [c.to_json() for c in self.capabilities]}
        if self.nodes:
            out["nodes"] = {addr: [c.to_json() for c in p.capabilities] for addr, p in self.nodes.items()}
        return out


# Each provider's documented restrictions (families refused), and the families it documents as
# available (a match needs every refused family refused and none of the available ones refused).
# Providers answer a blocked command with Redis's own "ERR unknown command" (they rename it).
PROVIDERS: dict[str, dict[str, Any]] = {
    "AWS ElastiCache": {
        "refused": {"CONFIG", "DEBUG", "REPLICAOF", "SYNC"},
        "available": {"COMMAND", "CLIENT", "OBJECT", "MONITOR"},
        "source": "https://docs.aws.amazon.com/AmazonElastiCache/latest/dg/ClientConfig.RestrictedCommands.html",
    },
    "AWS MemoryDB": {
        "refused": {"CONFIG", "DEBUG", "REPLICAOF", "SYNC", "PSYNC"},
        "available": {"COMMAND", "CLIENT", "OBJECT"},
        "source": "https://docs.aws.amazon.com/memorydb/latest/devguide/restrictedcommands.html",
    },
    "Google Memorystore for Redis": {
        "refused": {"CONFIG", "DEBUG", "REPLICAOF", "COMMAND", "OBJECT", "CLIENT", "MONITOR", "CLUSTER"},
        "available": set(),
        "source": "https://cloud.google.com/memorystore/docs/redis/product-constraints#blocked_redis_commands",
    },
    "Azure Cache for Redis": {
        "refused": {"CONFIG", "DEBUG", "REPLICAOF"},
        "available": {"COMMAND", "CLIENT", "OBJECT", "MONITOR", "SYNC"},
        "source": "https://learn.microsoft.com/en-us/azure/azure-cache-for-redis/cache-configure"
                  "#redis-commands-not-supported-in-azure-cache-for-redis",
    },
}


def _refusal(err: Exception) -> str:
    """The state a refusing answer means."""
    text = str(err).lower()
    if isinstance(err, redis.exceptions.NoPermissionError) or "noperm" in text or "no permissions" in text:
        return DENIED
    if "unknown command" in text:
        return RENAMED
    if "unknown subcommand" in text:
        return ABSENT  # the command exists, this version lacks the subcommand
    return DISABLED  # "DEBUG command not allowed", a provider's own wording


def _call(client: redis.Redis, args: tuple) -> Any:
    return _raw(client, args)  # unparsed: redis-py's reply parsers expect the full forms


def _dryrun(client: redis.Redis, user: str, args: tuple, rules=None) -> tuple[str, str, str]:
    """(state, how, answer) from ACL DRYRUN for ``user``; before 7.0 (no DRYRUN) from the user's rules
    (``ACL GETUSER``, evaluated as the server does); UNCONFIRMED where neither can be read."""
    try:
        reply = _raw(client, ("ACL", "DRYRUN", user, *args))
    except redis.exceptions.ResponseError as e:
        if "not found" in str(e).lower():  # "Command 'psync' not found": renamed away
            return RENAMED, "ACL DRYRUN", first_line(e)
        may = rules() if rules is not None else None
        if may is not None:
            name = str(args[0]).lower()
            unit = f"{name}|{str(args[1]).lower()}" if len(args) > 1 else name
            if name in may or unit in may:
                return AVAILABLE, f"present; user {user}'s ACL rules allow it", ""
            return DENIED, f"user {user}'s ACL rules (ACL GETUSER)", f"not granted to {user}"
        return UNCONFIRMED, "present (wrong-arity probe); ACL DRYRUN refused, so permission unconfirmed", first_line(e)
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    if text.upper() == "OK":
        return AVAILABLE, f"present; ACL DRYRUN {user} allows it", ""
    return DENIED, f"ACL DRYRUN {user}", text


def _rules(client: redis.Redis, user: str):
    """A function giving the commands ``user``'s ACL rules grant (read once), or None if unreadable."""
    memo: list = []

    def get():
        if not memo:
            from migrator.compat.acl import allowed, units
            from migrator.compat.commands import parse_spec

            try:
                raw = _raw(client, ("ACL", "GETUSER", user))
                table = _raw(client, ("COMMAND",))
            except redis.exceptions.ResponseError:
                memo.append(None)
                return None
            fields = dict(zip(raw[::2], raw[1::2])) if isinstance(raw, list) else dict(raw or {})
            fields = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
            text = fields.get("commands", b"")
            text = text.decode() if isinstance(text, bytes) else str(text)
            universe = units({sp.name: sp for sp in map(parse_spec, table)})
            memo.append(allowed(tuple(r.lower() for r in text.split() if r[:1] in "+-"), universe))
        return memo[0]

    return get


def _whoami(client: redis.Redis, configured: str | None) -> str:
    try:
        me = _raw(client, ("ACL", "WHOAMI"))
        return me.decode() if isinstance(me, bytes) else str(me)
    except redis.exceptions.ResponseError:
        return configured or "default"


def probe_one(client: redis.Redis, user: str, name: str, family: str, run: tuple | None, arity: tuple | None,
              dry: tuple | None, instead: str, version: tuple[int, ...] = (), rules=None) -> Capability:
    if run is not None:
        try:
            _call(client, run)
            return Capability(name, family, AVAILABLE, f"ran {' '.join(run)}")
        except redis.exceptions.ResponseError as e:
            if family == "CLUSTER" and "cluster support disabled" in str(e).lower():
                return Capability(name, family, AVAILABLE, f"ran {' '.join(run)} (standalone server)")
            if family == "OBJECT" and "lfu" in str(e).lower():
                return Capability(name, family, AVAILABLE, f"ran {' '.join(run)} (no LFU policy: nothing to read)")
            if not is_restricted(e) and not ("not allowed" in str(e).lower()):
                return Capability(name, family, AVAILABLE, f"ran {' '.join(run)} (answered {first_line(e)!r})")
            state = _refusal(e)
            if state == RENAMED and family == "FUNCTION" and version and version < (7,):
                state = ABSENT  # FUNCTION arrived in 7.0
            return Capability(name, family, state, f"ran {' '.join(run)}", first_line(e), instead)
    assert arity is not None and dry is not None
    try:
        _call(client, arity)
        # Not expected (the form has the wrong number of arguments); the command is there.
        state, how, answer = _dryrun(client, user, dry, rules)
    except redis.exceptions.ResponseError as e:
        text = str(e).lower()
        if "wrong number of arguments" in text or "syntax" in text:
            state, how, answer = _dryrun(client, user, dry, rules)
        else:
            state, how, answer = _refusal(e), "wrong-arity probe (runs nothing)", first_line(e)
    cap = Capability(name, family, state, how, answer)
    if state != AVAILABLE:
        cap.instead = instead
    return cap


def probe_server(client: redis.Redis, role: str, user: str | None = None, version: tuple[int, ...] = ()) -> Profile:
    """Every capability of one server, for the connection's user (``ACL WHOAMI``, else ``user``)."""
    me = _whoami(client, user)
    prof = Profile(role)
    rules = _rules(client, me)
    for name, family, run, arity, dry, instead in _PROBES:
        prof.capabilities.append(probe_one(client, me, name, family, run, arity, dry, instead, version, rules))
    prof.providers = match_providers(prof)
    return prof


def match_providers(prof: Profile) -> list[str]:
    """The providers whose documented restrictions this server's refusals match (none on a plain server)."""
    refused = {f for f in FAMILIES if prof.family_refused(f)}
    if not refused:
        return []
    out = []
    for name, p in PROVIDERS.items():
        if p["refused"] <= refused and not (p["available"] & refused):
            out.append(name)
    return out


def replication_refused(prof: Profile | None) -> str | None:
    """Why the source refuses replication (SYNC/PSYNC), or None if it may allow it."""
    if prof is None:
        return None
    psync = next((c for c in prof.capabilities if c.name == "PSYNC"), None)
    if psync is None or psync.state in (AVAILABLE, UNCONFIRMED, ABSENT):
        return None
    return f"PSYNC is {psync.state} on the {prof.role} ({psync.answer or psync.how})"


def _needed(c: Capability) -> bool:
    """Whether migrator uses this capability (DEBUG, MONITOR, OBJECT FREQ: never)."""
    return bool(c.instead) and not c.instead.startswith("nothing")


def attach_refused(prof: Profile | None) -> str | None:
    """Why the target cannot be made a replica (REPLICAOF refused), or None."""
    cap = next((c for c in prof.capabilities if c.name == "REPLICAOF"), None) if prof else None
    if cap is None or cap.state not in REFUSED:
        return None
    return f"REPLICAOF is {cap.state} on the {prof.role} ({cap.answer or cap.how})"


def sync_refused(prof: Profile | None) -> str | None:
    """Why the server refuses SYNC (the pre-PSYNC replication command), or None."""
    cap = next((c for c in prof.capabilities if c.name == "SYNC"), None) if prof else None
    if cap is None or cap.state not in REFUSED:
        return None
    return f"SYNC is {cap.state} on the {prof.role} ({cap.answer or cap.how})"


def psync_without_command(client: redis.Redis, user: str) -> tuple[bool | None, str]:
    """Whether PSYNC exists and ``user`` may run it, where ``COMMAND INFO`` is refused:
    (True/False/None for unknown, why). Runs nothing: a wrong-arity PSYNC and ACL DRYRUN."""
    cap = probe_one(client, user, "PSYNC", "PSYNC", None, ("PSYNC",), ("PSYNC", "?", "-1"), "", (),
                    _rules(client, user))
    if cap.state == AVAILABLE:
        return True, f"PSYNC present and allowed for user {user!r} ({cap.how})"
    if cap.state in REFUSED:
        return False, f"PSYNC is {cap.state} on the source ({cap.answer or cap.how})"
    return None, f"PSYNC is present but whether user {user!r} may run it is unconfirmed ({cap.answer or cap.how})"


def profile_check(profiles: dict[str, Profile]) -> Check:
    """The ``provider`` check: what each server refuses, what migrator does instead, the guessed provider."""
    parts, data, warn = [], {}, False
    for role, prof in profiles.items():
        data[role] = prof.to_json()
        refused = prof.refused()
        unconfirmed = [c for c in prof.capabilities if c.state == UNCONFIRMED]
        if not refused and not unconfirmed:
            parts.append(f"{role}: every probed command is available")
            continue
        warn = warn or any(_needed(c) for c in refused + unconfirmed)
        text = f"{role}: " + ", ".join(f"{c.name} {c.state}" for c in refused + unconfirmed)
        if prof.providers:
            text += f" (matches the documented restrictions of {' or '.join(prof.providers)})"
        parts.append(text)
    evidence = "; ".join(parts)
    if not warn:
        return Check("provider", "Managed-service profile", PASS, evidence, "", data)
    instead = sorted({f"{c.name}: {c.instead}" for p in profiles.values() for c in p.capabilities
                      if c.state in REFUSED + (UNCONFIRMED,) and _needed(c)})
    return Check("provider", "Managed-service profile", WARN, evidence,
                 "migrator degrades as listed (docs/compatibility.md, Managed services): " + "; ".join(instead), data)


TITLE = "Managed-service profile"


def provider_check(probe) -> Check:
    """Probe both servers (on a cluster side, every primary) and report the profile; the profiles
    are kept for the data-format and strategy checks."""
    profiles = {}
    for role in ("source", "target"):
        side = probe.side(role)
        profiles[role] = probe.memo(f"capabilities:{role}", lambda side=side, role=role: probe_side(side, role, probe))
    probe.facts["capabilities"] = {role: p.to_json() for role, p in profiles.items()}
    return profile_check(profiles)


def probe_side(side, role: str, probe) -> Profile:
    """One side's profile; a lost connection still stops the run (``Side.guard``). On a cluster side
    every primary is probed and each capability takes its worst state over them, naming the nodes."""
    version = probe.identity(role).version_tuple
    view = probe.clusters.get(role)
    primaries = view.readable_primaries() if view is not None else []
    if not primaries:
        return side.guard("capability probe", lambda: probe_server(side.client, role, side.endpoint.user, version))
    nodes = {n.address: n.side.guard("capability probe", lambda n=n: probe_server(
        n.side.client, role, side.endpoint.user, version)) for n in primaries}
    return merge(role, nodes)


_WORST = (RENAMED, DENIED, DISABLED, UNCONFIRMED, ABSENT, AVAILABLE)  # most restrictive first


def merge(role: str, nodes: dict[str, Profile]) -> Profile:
    """A cluster side's profile from its primaries': each capability at its worst, with the nodes that differ."""
    first = next(iter(nodes.values()))
    out = Profile(role, nodes=nodes)
    for i, cap in enumerate(first.capabilities):
        caps = {addr: p.capabilities[i] for addr, p in nodes.items()}
        worst = min(caps.values(), key=lambda c: _WORST.index(c.state))
        merged = Capability(**worst.to_json())
        if len({c.state for c in caps.values()}) > 1:
            where = ", ".join(a for a, c in caps.items() if c.state == worst.state)
            merged.how += f" (on {where} of {len(caps)} primaries)"
        out.capabilities.append(merged)
    out.providers = match_providers(out)
    return out


def profile_of(probe, role: str) -> Profile | None:
    """The profile the provider check read (None if it did not run)."""
    return getattr(probe, "_memo", {}).get(f"capabilities:{role}")
