"""What a server says about its own replication: role, link, offsets and replication ids.

This module reads; the modules that change roles (attaching the target, the write cutover's
role swap) build on it. Offsets are the truth (``WAIT`` is unreliable from a connection that
wrote nothing): a replica is in step with its primary when its ``slave_repl_offset`` equals the
primary's ``master_repl_offset``, read twice with nothing written in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplStatus:
    """One reading of ``INFO replication`` (plus the sync counters of ``INFO stats``)."""

    role: str  # "master" or "slave"
    master_repl_offset: int
    master_replid: str
    master_replid2: str
    second_repl_offset: int
    # As a replica (None on a primary):
    master_host: str | None = None
    master_port: int | None = None
    link_up: bool | None = None  # master_link_status:up
    sync_in_progress: bool | None = None  # master_sync_in_progress:1 (a full sync is loading)
    replica_offset: int | None = None  # slave_repl_offset: how far it has applied its primary's stream
    sync_read_bytes: int | None = None  # master_sync_read_bytes, during a full sync
    sync_total_bytes: int | None = None  # master_sync_total_bytes (-1 when unknown: diskless)
    link_down_since: int | None = None  # master_link_down_since_seconds
    # As a primary: its replicas, as ``ip:port`` → (state, offset, lag seconds).
    replicas: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # From INFO stats, when read: full syncs and partial resyncs this server served as a primary.
    sync_full: int | None = None
    sync_partial_ok: int | None = None
    sync_partial_err: int | None = None

    @property
    def is_replica(self) -> bool:
        return self.role == "slave"

    def replicates(self, host: str, port: int) -> bool:
        return self.is_replica and self.master_port == port and (self.master_host or "") == host


def parse(info: dict[str, Any], stats: dict[str, Any] | None = None) -> ReplStatus:
    """A ReplStatus from parsed ``INFO replication`` (and optionally ``INFO stats``) replies."""
    def num(key: str, default: int | None = 0) -> int | None:
        v = info.get(key)
        try:
            return int(v) if v is not None else default
        except (TypeError, ValueError):
            return default

    replicas: dict[str, tuple[str, int, int]] = {}
    for key, value in info.items():
        if key.startswith("slave") and key[5:].isdigit() and isinstance(value, dict):
            addr = f"{value.get('ip')}:{value.get('port')}"
            replicas[addr] = (str(value.get("state", "")), int(value.get("offset", 0) or 0), int(value.get("lag", 0) or 0))
    replica = str(info.get("role", "master")) == "slave"
    s = stats or {}
    return ReplStatus(
        role=str(info.get("role", "master")),
        master_repl_offset=num("master_repl_offset") or 0,
        master_replid=str(info.get("master_replid", "")),
        master_replid2=str(info.get("master_replid2", "")),
        second_repl_offset=num("second_repl_offset", -1) or 0,
        master_host=str(info["master_host"]) if replica and "master_host" in info else None,
        master_port=num("master_port", None) if replica else None,
        link_up=(str(info.get("master_link_status")) == "up") if replica else None,
        sync_in_progress=bool(num("master_sync_in_progress")) if replica else None,
        replica_offset=num("slave_repl_offset", None) if replica else None,
        sync_read_bytes=num("master_sync_read_bytes", None) if replica else None,
        sync_total_bytes=num("master_sync_total_bytes", None) if replica else None,
        link_down_since=num("master_link_down_since_seconds", None) if replica else None,
        replicas=replicas,
        sync_full=int(s["sync_full"]) if "sync_full" in s else None,
        sync_partial_ok=int(s["sync_partial_ok"]) if "sync_partial_ok" in s else None,
        sync_partial_err=int(s["sync_partial_err"]) if "sync_partial_err" in s else None,
    )


def read(client: Any, with_stats: bool = False) -> ReplStatus:
    """Read a server's replication status through a redis-py/valkey-py client."""
    info = client.info("replication")
    return parse(info, client.info("stats") if with_stats else None)


# --- deciding the strategy: can the target replicate the source? ---------------------------------
#
# Read-only probes only: SYNC/PSYNC are never sent from a client to find out (that would start a
# fork/BGSAVE on a production source). ``COMMAND INFO`` says whether the command exists (a
# ``rename-command PSYNC ""`` removes it); ``ACL DRYRUN`` (7.0+) or the user's rules
# (``ACL GETUSER``, 6.x) say whether the user the target will authenticate as may run it.

REPLICA_COMMANDS = ("psync", "replconf")  # what a replica sends its primary (besides AUTH and PING)


@dataclass(frozen=True)
class SyncAllowed:
    """Whether the source lets the configured user replicate from it; ``allowed`` None: could not tell."""

    allowed: bool | None
    why: str


def _err_text(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def source_allows_sync(client: Any, user: str | None) -> SyncAllowed:
    """Whether a replica authenticating as ``user`` (None: ``default``) can PSYNC from this server."""
    import redis

    name = user or "default"
    from migrator.compat.rpc import (
        _raw,  # unparsed: redis-py's COMMAND parser fails on the nil of a missing command
    )

    try:
        infos = _raw(client, ("COMMAND", "INFO", *REPLICA_COMMANDS))
    except redis.exceptions.ResponseError as e:
        from migrator.compat.capabilities import psync_without_command  # wrong-arity PSYNC + ACL DRYRUN: runs nothing

        allowed, why = psync_without_command(client, name)
        return SyncAllowed(allowed, f"COMMAND INFO is not available on the source ({_err_text(e)}); {why}")
    present = {(i[0].decode() if isinstance(i[0], bytes) else str(i[0])).lower() for i in infos or [] if i}
    missing = [c for c in REPLICA_COMMANDS if c not in present]
    if missing:
        return SyncAllowed(False, f"the source has no {'/'.join(m.upper() for m in missing)} command "
                                  "(renamed or disabled, as managed services do)")
    try:
        denied = []
        for args in (("PSYNC", "?", "-1"), ("REPLCONF", "listening-port", "6379")):
            reply = client.execute_command("ACL", "DRYRUN", name, *args)
            reply = reply.decode() if isinstance(reply, bytes) else str(reply)
            if reply.upper() != "OK":
                denied.append(f"{args[0]} ({reply})")
        if denied:
            return SyncAllowed(False, f"the source's ACL denies user {name!r}: {'; '.join(denied)}")
        return SyncAllowed(True, f"PSYNC present and allowed for user {name!r} (ACL DRYRUN)")
    except redis.exceptions.ResponseError as e:
        dryrun_error = _err_text(e)
    return _allowed_by_rules(client, name, dryrun_error)


def _allowed_by_rules(client: Any, name: str, dryrun_error: str) -> SyncAllowed:
    """Before Redis 7.0 (no ACL DRYRUN): the user's command rules, evaluated like the server does."""
    import redis

    try:
        raw = client.execute_command("ACL", "GETUSER", name)
    except redis.exceptions.ResponseError as e:
        return SyncAllowed(None, f"cannot read user {name!r}'s ACL on the source (ACL DRYRUN: {dryrun_error}; "
                                 f"ACL GETUSER: {_err_text(e)})")
    if raw is None:
        return SyncAllowed(False, f"the source has no ACL user {name!r}")
    fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2]))
    fields = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
    flags = [f.decode() if isinstance(f, bytes) else str(f) for f in fields.get("flags", [])]
    if "off" in flags:
        return SyncAllowed(False, f"the source's ACL user {name!r} is disabled")
    rules = fields.get("commands", b"")
    rules = (rules.decode() if isinstance(rules, bytes) else str(rules)).split()
    from migrator.compat.acl import allowed, units
    from migrator.compat.commands import parse_spec
    from migrator.compat.rpc import _raw

    try:
        universe = units({s.name: s for s in map(parse_spec, _raw(client, ("COMMAND",)))})
    except redis.exceptions.ResponseError as e:
        return SyncAllowed(None, f"cannot read the source's command table to evaluate user {name!r}'s rules ({_err_text(e)})")
    may = allowed(tuple(r.lower() for r in rules if r[:1] in "+-"), universe)
    if "psync" in may:
        return SyncAllowed(True, f"PSYNC present and allowed for user {name!r} by its rules ({' '.join(rules)})")
    return SyncAllowed(False, f"the source's ACL denies PSYNC to user {name!r} ({' '.join(rules) or 'no rules'})")


@dataclass(frozen=True)
class Decision:
    """The mirror strategy for a pair: ``strategy`` in effect, ``why``; ``ok`` False when the
    playbook asks for ``replication`` and it cannot work (the pre-flight then fails)."""

    requested: str  # auto | replication | dual-write
    strategy: str  # replication | dual-write
    why: str
    ok: bool = True
    unconfirmed: bool = False  # replication asked for, the source's permission could not be read
    topology: str | None = None  # why a side's topology (Sentinel, cluster) rules replication out

    def to_json(self) -> dict[str, Any]:
        return {"requested": self.requested, "strategy": self.strategy, "why": self.why, "ok": self.ok,
                "unconfirmed": self.unconfirmed, "topology": self.topology}


def subset_selected(pb: Any, client: Any) -> str | None:
    """Why the playbook migrates only part of the source (``sync.include``/``exclude``/``databases``
    leaving keys out), which replication cannot honour: a replica receives every key of every database."""
    sel = pb.sync
    if sel.include != ["*"] or sel.exclude:
        return "sync.include/exclude select a subset of the keys, and a replica receives every key"
    if sel.databases is not None:
        held = {int(k[2:]) for k, v in client.info("keyspace").items() if k.startswith("db") and isinstance(v, dict)}
        left = sorted(held - set(sel.databases))
        if left:
            return (f"sync.databases leaves out database(s) {', '.join(map(str, left))} that hold keys, and a replica "
                    "receives every database")
    return None


# Why the target cannot be made a replica of the source, by the topology of each side.
TOPOLOGY_WHY = {
    ("source", "cluster"): "the source is a Redis Cluster: a replica of one node would get one shard",
    ("target", "cluster"): ("the target is a Redis Cluster: a cluster node replicates only a primary of its own cluster "
                            "(REPLICAOF is refused in cluster mode)"),
    ("source", "sentinel"): ("the source is Sentinel-managed: a failover would leave the target replicating a demoted "
                             "primary"),
    ("target", "sentinel"): ("the target is Sentinel-managed: its sentinels watch the target's primary and would "
                             "fight (or fail over) a primary turned into a replica of the source"),
}


def topology_of(ep: Any, client: Any | None) -> str:
    """``sentinel``, ``cluster`` or ``standalone``: the playbook names a Sentinel endpoint; a cluster
    is what the server says it is (``cluster_enabled``), or the playbook's ``seeds`` when it cannot be asked."""
    if getattr(ep, "kind", "server") == "sentinel":
        return "sentinel"
    if client is not None:
        from migrator.cluster import is_cluster

        return "cluster" if is_cluster(client) else "standalone"
    return "cluster" if getattr(ep, "seeds", None) else "standalone"


def topology_why(pb: Any, source: Any | None, target: Any | None) -> str | None:
    """Why replication cannot mirror this pair's topology (a Sentinel or cluster side), or None."""
    why = [TOPOLOGY_WHY[(role, kind)] for role, ep, client in (("source", pb.source, source), ("target", pb.target, target))
           if (kind := topology_of(ep, client)) != "standalone"]
    return "; ".join(why) or None


def decide(requested: str, allowed: SyncAllowed, loads_rdb: bool | None, rdb_why: str,
           subset: str | None = None, topology: str | None = None) -> Decision:
    """The strategy from the evidence: neither side is a Sentinel or cluster deployment
    (``topology``: why one is), the source allows PSYNC, the target loads its RDB, and the whole
    keyspace is migrated (``subset``: why not)."""
    if requested == "dual-write":
        return Decision(requested, "dual-write", "mirror.strategy is dual-write: each shim writes to both servers")
    for why_not in (topology, subset):
        if not why_not:
            continue
        if requested == "replication":
            return Decision(requested, "replication", f"mirror.strategy is replication but it cannot work: {why_not}",
                            ok=False, topology=topology)
        return Decision(requested, "dual-write", f"auto chose dual-write: {why_not}", topology=topology)
    problems = []
    if allowed.allowed is not True:
        problems.append(allowed.why if allowed.allowed is False else f"could not confirm the source allows PSYNC: {allowed.why}")
    if loads_rdb is not True:
        problems.append(rdb_why)
    if not problems:
        return Decision(requested, "replication", f"{allowed.why}; {rdb_why}")
    why = "; ".join(problems)
    if requested == "replication" and allowed.allowed is None and loads_rdb is True:
        # Not known to fail: the playbook's choice stands, and replica_in_sync shows whether the link comes up.
        return Decision(requested, "replication", f"mirror.strategy is replication; {why}; {rdb_why}; whether the "
                        "target can replicate shows once it is attached (gate replica_in_sync)", unconfirmed=True)
    if requested == "replication":
        return Decision(requested, "replication", f"mirror.strategy is replication but it cannot work: {why}", ok=False)
    return Decision(requested, "dual-write", f"auto chose dual-write: {why}")


def rdb_loadable(copy_method: str | None, replication_fact: str | None) -> tuple[bool | None, str]:
    """Whether the target loads the source's RDB, from the compat data-format facts."""
    if copy_method is None and not replication_fact:
        return None, "the data-format check did not run, so it is unknown whether the target loads the source's RDB"
    fact = replication_fact or ""
    if copy_method == "dump-restore" and not fact.startswith("does not work: the target"):
        return True, "the target loads the source's RDB format (DUMP/RESTORE canaries)"
    return False, "the target cannot load the source's RDB format (a full sync would fail)"


# --- attaching and detaching the target ----------------------------------------------------------


@dataclass
class Outcome:
    """What a role change did (or why it refused): one line of evidence and the facts behind it."""

    ok: bool
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)


def address(ep: Any, override: str | None) -> tuple[str, int]:
    """host:port a *server* uses to reach ``ep``: the override (``mirror.replication.*_address``) or its URL's."""
    if override:
        from migrator.playbook import split_hostport

        return split_hostport(override)
    return ep.host, ep.port


def source_address(pb: Any) -> tuple[str, int]:
    """Where the target reaches the source: ``mirror.replication.source_address`` or the source URL's."""
    return address(pb.source, pb.mirror.replication.source_address)


def target_address(pb: Any) -> tuple[str, int]:
    """Where the source reaches the target (the rollback window): ``mirror.replication.target_address`` or the target URL's."""
    return address(pb.target, pb.mirror.replication.target_address)


def keys_by_db(client: Any) -> dict[str, int]:
    """Keys per database of a server (INFO keyspace), e.g. ``{"db0": 12}``."""
    return {k: int(v.get("keys", 0)) for k, v in client.info("keyspace").items() if k.startswith("db") and isinstance(v, dict)}


def keys_held(client: Any) -> int:
    """Keys in every database of a server (INFO keyspace)."""
    return sum(keys_by_db(client).values())


def replica_settings(primary: Any) -> list[tuple[str, str]]:
    """A replica's settings for authenticating (and TLS) to ``primary``, from that endpoint of the playbook."""
    out = []
    if primary.password:
        out.append(("masterauth", primary.password))
    if primary.user:
        out.append(("masteruser", primary.user))
    if primary.use_tls:
        out.append(("tls-replication", "yes"))
    return out


def attach(pb: Any, source: Any, target: Any, dry_run: bool = False) -> Outcome:
    """Make the target a replica of the source (``REPLICAOF``); idempotent, never waits for the full sync.

    Refuses a target that holds keys (``REPLICAOF`` discards them) unless
    ``mirror.replication.replace_target_data``, and a target that replicates another server.
    A target already replicating this source (a re-run after a crash) is left as it is.
    ``dry_run``: only say whether it would be refused (the ``mirror_strategy`` gate).
    """
    import redis

    host, port = source_address(pb)
    where = f"{host}:{port}"
    t = read(target)
    src = read(source, with_stats=True)
    data = {"source_address": where, "source_offset": src.master_repl_offset, "source_replid": src.master_replid,
            "source_sync_full": src.sync_full, "target_role": t.role}
    if t.replicates(host, port):
        data["already"] = True
        link = "up" if t.link_up else "down"
        return Outcome(True, f"the target already replicates the source at {where} (link {link}, "
                             f"offset {t.replica_offset}); left as it is", data)
    if t.is_replica:
        return Outcome(False, f"the target is a replica of {t.master_host}:{t.master_port}, not of the source at {where}: "
                              "run REPLICAOF NO ONE on it (or point mirror.replication.source_address at the source "
                              "as the target sees it)", data)
    held = keys_held(target)
    data["target_keys"] = held
    replace = pb.mirror.replication.replace_target_data
    if held and not replace:
        return Outcome(False, f"the target holds {held:,} key(s) and REPLICAOF would discard them: empty it (FLUSHALL) "
                              "or set mirror.replication.replace_target_data: true", data)
    settings = replica_settings(pb.source)
    if dry_run:
        what = f"{held:,} key(s) on it would be discarded (replace_target_data)" if held else "it is empty"
        return Outcome(True, f"the target can become a replica of the source at {where}: {what}", data)
    try:
        for name, value in settings:
            target.config_set(name, value)
    except redis.exceptions.ResponseError as e:
        return Outcome(False, f"cannot configure the target to reach the source (CONFIG SET "
                              f"{'/'.join(n for n, _ in settings)}: {_err_text(e)}): allow CONFIG for migrator's user "
                              "on the target, or use mirror.strategy: dual-write", data)
    try:
        target.execute_command("REPLICAOF", host, str(port))
    except redis.exceptions.ResponseError as e:
        return Outcome(False, f"REPLICAOF {where} refused by the target: {_err_text(e)}", data)
    data["configured"] = [n for n, _ in settings]
    discarded = f"; {held:,} key(s) on the target discarded (replace_target_data)" if held else ""
    return Outcome(True, f"the target now replicates the source at {where}"
                         f"{' (' + ', '.join(n for n, _ in settings) + ' set)' if settings else ''}; its full sync runs "
                         f"in the background (gate replica_in_sync){discarded}", data)


def detach(target: Any) -> Outcome:
    """Stop the target replicating (``REPLICAOF NO ONE``): it keeps the data it has. Idempotent."""
    t = read(target)
    if not t.is_replica:
        return Outcome(True, "the target is not a replica (already detached)", {"target_role": t.role})
    target.execute_command("REPLICAOF", "NO", "ONE")
    return Outcome(True, f"the target stopped replicating {t.master_host}:{t.master_port} at offset {t.replica_offset} "
                         "(REPLICAOF NO ONE); it keeps its data", {"offset": t.replica_offset})


# --- watching the initial sync and the lag -------------------------------------------------------


@dataclass
class SyncState:
    """One reading of how far the target is behind the source, and whether that is healthy."""

    in_sync: bool
    problem: str | None  # stalled / looping / timed out / not replicating; None when healthy or progressing
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)


SETTLE_S = 1.0  # how long a replica that is only catching up is read again before it is called behind


def sync_progress(source: Any, target: Any, host: str, port: int, *, attached_at: float | None = None,
                  sync_full_at_attach: int | None = None, sync_timeout: float = 3600.0, stall_timeout: float = 60.0,
                  settle: float = SETTLE_S) -> SyncState:
    """Where the target's replication of the source stands, read fresh from both servers.

    In sync: the link is up, no full sync is loading, the replica applied the same replication
    history (its primary's replid is the source's) up to at least the source's offset read just
    before it. Offsets are read source, target, source: the lag reported is the second
    source reading minus the target's. Under a steady stream of writes a healthy replica trails
    by a moment: one only catching up is read again every 50 ms for up to ``settle`` seconds.
    """
    import time

    deadline = time.monotonic() + settle
    while True:
        st = _progress_once(source, target, host, port, attached_at, sync_full_at_attach, sync_timeout, stall_timeout)
        catching_up = st.data.get("link") == "up" and st.data.get("lag_bytes") is not None
        if st.in_sync or st.problem or not catching_up or time.monotonic() >= deadline:
            if catching_up and not st.in_sync:
                st.evidence += f" (read for {settle:.0f} s)"
            return st
        time.sleep(0.05)


def _progress_once(source: Any, target: Any, host: str, port: int, attached_at: float | None,
                   sync_full_at_attach: int | None, sync_timeout: float, stall_timeout: float) -> SyncState:
    import time

    now = time.time()
    s1 = read(source, with_stats=True)
    t = read(target)
    s2 = read(source)
    data: dict[str, Any] = {"source_offset": s2.master_repl_offset, "target_role": t.role,
                            "link": None, "target_offset": t.replica_offset, "lag_bytes": None,
                            "sync_in_progress": t.sync_in_progress, "source_sync_full": s1.sync_full}
    elapsed = now - attached_at if attached_at else None
    data["since_attach_s"] = round(elapsed, 1) if elapsed is not None else None
    restarts = (s1.sync_full - sync_full_at_attach) if s1.sync_full is not None and sync_full_at_attach is not None else None
    data["full_syncs_since_attach"] = restarts
    if not t.replicates(host, port):
        what = (f"replicates {t.master_host}:{t.master_port}" if t.is_replica else
                "is not a replica (REPLICAOF NO ONE was run, or it restarted without its replica setting)")
        return SyncState(False, "not-replicating", f"the target {what}, not the source at {host}:{port}: "
                         "writes to the source no longer reach it; roll back to compatible and advance again to "
                         "re-attach it (the source stays authoritative throughout)", data)
    data["link"] = "up" if t.link_up else "down"
    info = target.info("replication")
    last_io = info.get("master_sync_last_io_seconds_ago")
    loops = f"; the source served {restarts} full syncs since the target was attached" if restarts and restarts > 1 else ""
    overdue = elapsed is not None and elapsed > sync_timeout
    if t.sync_in_progress or not t.link_up:
        if t.sync_in_progress:
            total = t.sync_total_bytes
            got = t.sync_read_bytes or 0
            done = f"{got:,} of {total:,} bytes" if total and total > 0 else f"{got:,} bytes read (diskless: size unknown)"
            ev = f"initial full sync in progress: {done}"
            # The server counts whole seconds of its cached clock, so a transfer a few ms old may
            # already say 1: no sync has gone without progress for longer than it has existed.
            stalled = (last_io is not None and int(last_io) >= stall_timeout
                       and (elapsed is None or elapsed >= stall_timeout))
            data["last_io_s"] = int(last_io) if last_io is not None else None
            hint = "is the source stopped or overloaded, or the network between them cut?"
        else:
            down = t.link_down_since if t.link_down_since is not None else -1
            if down < 0 and elapsed is not None:
                down = int(elapsed)  # never connected since REPLICAOF: down since then
            ev = f"replication link down {'for ' + str(down) + ' s' if down > 0 else '(connecting)'}"
            stalled = down >= stall_timeout
            hint = (f"can the target reach the source at {host}:{port} (mirror.replication.source_address) with the "
                    "source's credentials? The target's log says why")
        if elapsed is not None:
            ev += f", {elapsed:.0f} s since REPLICAOF"
        if overdue:
            return SyncState(False, "timed-out", f"{ev}{loops}: past mirror.replication.sync_timeout "
                             f"({sync_timeout:.0f} s); see the target's and the source's logs", data)
        if stalled:
            return SyncState(False, "stalled", f"{ev}{loops}: no progress for {stall_timeout:.0f} s "
                             f"(mirror.replication.stall_timeout): {hint}", data)
        if restarts is not None and restarts > 2:
            return SyncState(False, "looping", f"{ev}{loops}: the full sync keeps restarting (client-output-buffer-limit "
                             "replica or repl-timeout on the source too small for the data set?)", data)
        return SyncState(False, None, ev + loops, data)
    if t.master_replid != s2.master_replid and s2.master_replid:
        data["target_replid"] = t.master_replid
        return SyncState(False, None, "the target's replication history differs from the source's (a resync is due)", data)
    lag = max(0, s2.master_repl_offset - (t.replica_offset or 0))
    data["lag_bytes"] = lag
    if (t.replica_offset or 0) >= s1.master_repl_offset:
        return SyncState(True, None, f"replica in sync, lag {lag} bytes at offset {t.replica_offset}{loops}", data)
    behind = s1.master_repl_offset - (t.replica_offset or 0)
    return SyncState(False, None, f"replica catching up: {behind:,} bytes behind the source (offset {t.replica_offset} "
                     f"of {s1.master_repl_offset}){loops}", data)


def wait_caught_up(source: Any, target: Any, timeout: float = 5.0) -> bool:
    """Wait until the target's applied offset reaches the source's offset as read now (lag-aware compares)."""
    import time

    goal = read(source).master_repl_offset
    deadline = time.monotonic() + timeout
    while True:
        t = read(target)
        if t.is_replica and (t.replica_offset or 0) >= goal:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


# --- what the phase machine reads -----------------------------------------------------------------

ATTACHED_EVENT = "replica-attached"


def strategy_of(state: Any) -> str:
    """The mirror strategy in effect for a migration's state: ``dual-write`` unless recorded otherwise."""
    mirror = getattr(state, "mirror", None)
    return mirror.strategy if mirror else "dual-write"


def attachment(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest journaled attach of the target (when, and the source's sync counter then)."""
    return next((e for e in reversed(entries) if e.get("event") == ATTACHED_EVENT), None)


def fresh_decision(pb: Any, source: Any, target: Any | None = None) -> Decision:
    """Decide the strategy again on fresh evidence: each side's topology, the source's PSYNC/ACL
    read now, the RDB format from the newest compatibility report for these servers (not trusted
    if the source's version changed since)."""
    from migrator import reports
    from migrator.compat.identify import identify

    requested = pb.mirror.strategy
    if requested == "dual-write":
        return decide(requested, SyncAllowed(None, ""), None, "")
    topology = topology_why(pb, source, target)
    if topology:
        return decide(requested, SyncAllowed(None, ""), None, "", topology=topology)
    subset = subset_selected(pb, source)
    if subset:
        return decide(requested, SyncAllowed(None, ""), None, "", subset)
    allowed = source_allows_sync(source, pb.source.user)
    report = reports.latest(pb.state_path, "compat", lambda r: r.get("endpoints_hash") == pb.endpoints_hash())
    if report is None:
        return decide(requested, allowed, None, f"no compatibility report for these servers (run: migrator compat -p {pb.path})")
    now_version = identify(source.info("server")).version
    then = (report.get("source") or {}).get("version")
    if then not in (None, now_version):
        return decide(requested, allowed, None, f"the source now runs {now_version}, not the {then} the compatibility "
                      f"report {report['id']} judged: run migrator compat -p {pb.path} again")
    loads, why = rdb_loadable(report.get("copy_method"), (report.get("replication") or {}).get("target_replicates_source"))
    return decide(requested, allowed, loads, f"{why} (report {report['id']})")
