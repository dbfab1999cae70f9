"""Configuration: the settings that change what the application sees, compared with severities.

Secret settings (requirepass, masterauth...) are dropped as soon as they are read: only
whether they are set is kept, and the values are registered with ``migrator.redact`` so that
nothing could print them even by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from migrator.compat.model import FAIL, PASS, STATUSES, UNKNOWN, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rpc import Unavailable, text
from migrator.redact import register_secret

SECRET_SETTINGS = frozenset({"requirepass", "masterauth", "masteruser", "tls-key-file-pass", "tls-client-key-file-pass"})

# Settings a Valkey target lacks on purpose (retired or internal) with Redis's default: a
# source still at the default loses nothing.
LACKING = "(settings the target lacks)"
RETIRED_DEFAULTS = {
    "dynamic-hz": "yes", "io-threads-do-reads": "no", "aof-disable-auto-gc": "no", "sanitize-dump-payload": "no",
    "lua-replicate-commands": "yes", "gopher-enabled": "no", "use-exit-on-panic": "no", "watchdog-period": "0",
    "key-load-delay": "0", "rdb-key-save-delay": "0",
}


def read_config(probe: Probe, role: str) -> dict[str, str]:
    """``CONFIG GET *`` with secret values replaced by "set" or ""."""
    def fetch() -> dict[str, str]:
        raw = probe.side(role).call("CONFIG", "GET", "*")
        out = {}
        for k, v in raw.items():
            k, v = text(k), text(v)
            if k in SECRET_SETTINGS:
                register_secret(v)
                v = "set" if v else ""
            out[k] = v
        return out
    return probe.memo(f"config:{role}", fetch)


@dataclass
class Finding:
    setting: str
    source: str
    target: str
    status: str
    note: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def describe(self) -> str:
        if self.setting == LACKING:
            return f"{self.note}: {self.source}"
        return f"{self.setting}: {self.note} (source {self.source!r}, target {self.target!r})"


def _int(v: str | None) -> int:
    try:
        return int(v or 0)
    except ValueError:
        return 0


def _maxmemory(s: dict, t: dict, used: int, _dbs: int) -> Finding:
    limit = _int(t.get("maxmemory"))
    f = Finding("maxmemory", s.get("maxmemory", "?"), str(limit), PASS, "")
    if limit == 0:
        f.note = f"target unlimited; source uses {used} bytes"
    elif limit < used:
        f.status, f.note = FAIL, f"target maxmemory {limit} is below the {used} bytes the source uses"
        f.fix = f"raise the target's maxmemory above {int(used * 1.25)}"
    elif limit < used * 1.25:
        f.status, f.note = WARN, f"target maxmemory {limit} leaves under 25% headroom over the source's {used} bytes"
        f.fix = f"raise the target's maxmemory to at least {int(used * 1.25)}"
    else:
        f.note = f"target limit {limit} covers the {used} bytes the source uses"
    return f


def _policy(s: dict, t: dict, _used: int, _dbs: int) -> Finding:
    sp, tp = s.get("maxmemory-policy", ""), t.get("maxmemory-policy", "")
    f = Finding("maxmemory-policy", sp, tp, PASS, "same")
    if sp != tp:
        evicts_more = sp == "noeviction" or (sp.startswith("volatile") and tp.startswith("allkeys"))
        f.status = FAIL if evicts_more else WARN
        f.note = "the target may evict keys the source keeps" if evicts_more else "eviction differs"
        f.fix = f"CONFIG SET maxmemory-policy {sp} on the target"
    return f


def _databases(s: dict, t: dict, _used: int, highest_db: int) -> Finding:
    sd, td = _int(s.get("databases")), _int(t.get("databases"))
    f = Finding("databases", str(sd), str(td), PASS, f"source uses up to db {highest_db}")
    if td <= highest_db:
        f.status, f.note = FAIL, f"the source has keys in db {highest_db}, the target has only {td} databases"
        f.fix = f"set databases {max(sd, highest_db + 1)} in the target's config (needs a restart)"
    elif td < sd:
        f.status, f.note = WARN, "the target has fewer databases than the source"
        f.fix = f"set databases {sd} in the target's config (needs a restart)"
    return f


def _flags(v: str) -> set[str]:
    v = v.replace("A", "g$lshzxetd")  # A is the alias for every event class
    return set(v)


def _notify(s: dict, t: dict, _used: int, _dbs: int) -> Finding:
    sv, tv = s.get("notify-keyspace-events", ""), t.get("notify-keyspace-events", "")
    f = Finding("notify-keyspace-events", sv, tv, PASS, "same events")
    lacking = _flags(sv) - _flags(tv)
    if lacking:
        f.status, f.note = FAIL, f"subscribers would miss events the source publishes ({''.join(sorted(lacking))})"
        f.fix = f"CONFIG SET notify-keyspace-events {sv} on the target"
    elif _flags(sv) != _flags(tv):
        f.status, f.note, f.fix = WARN, "the target publishes more events", f"CONFIG SET notify-keyspace-events {sv!r}"
    return f


def _same(name: str, why: str, parse: Callable[[str], Any] = str, more_is_fine: bool = False) -> Callable:
    """A setting that should match; with ``more_is_fine`` a larger target value is no problem."""
    def compare(s: dict, t: dict, _used: int, _dbs: int) -> Finding:
        sv, tv = s.get(name, ""), t.get(name, "")
        f = Finding(name, sv, tv, PASS, "same")
        if name not in t and name in s:
            f.status, f.note, f.fix = WARN, "the target has no such setting", f"find the target's equivalent of {name}"
        elif more_is_fine and parse(tv) > parse(sv):
            f.note = "larger on the target"
        elif parse(sv) != parse(tv):
            f.status, f.note, f.fix = WARN, why, f"CONFIG SET {name} {sv!r} on the target, or accept the difference"
        return f
    return compare


def _obl(v: str) -> str:
    return " ".join(v.replace("slave", "replica").split())


COMPARISONS = (
    _maxmemory, _policy, _databases, _notify,
    _same("timeout", "idle clients are disconnected differently"),
    _same("appendonly", "durability differs (AOF)"),
    _same("save", "durability differs (RDB snapshots)"),
    _same("client-output-buffer-limit", "clients (pub/sub, replicas) are disconnected at other limits", parse=_obl),
    _same("proto-max-bulk-len", "the target accepts smaller values than the source", parse=_int, more_is_fine=True),
    _same("busy-reply-threshold", "long scripts are declared busy at another time", parse=_int),
    _same("repl-backlog-size", "a smaller backlog: the rollback's partial resync survives fewer writes",
          parse=_int, more_is_fine=True),
)


def _lacking(s: dict, t: dict) -> Finding | None:
    missing = sorted(set(s) - set(t))
    changed = [k for k in missing if RETIRED_DEFAULTS.get(k) != s[k]]
    if not missing:
        return None
    if not changed:
        return Finding(LACKING, ", ".join(missing), "", PASS,
                       "retired in the target; the source has them at their defaults")
    return Finding(LACKING, ", ".join(changed), "", WARN,
                   "settings the target does not have", "find the target's equivalent or confirm they are not needed")


def _aliases(conf: dict[str, str]) -> dict[str, str]:
    """Redis before 7.0 calls busy-reply-threshold lua-time-limit."""
    if "busy-reply-threshold" not in conf and "lua-time-limit" in conf:
        return {**conf, "busy-reply-threshold": conf["lua-time-limit"]}
    return conf


# Settings every node of a cluster should share (maxmemory may differ per shard on purpose).
NODE_SETTINGS = ("maxmemory-policy", "notify-keyspace-events", "timeout", "appendonly", "save",
                 "client-output-buffer-limit", "proto-max-bulk-len", "busy-reply-threshold", "lua-time-limit",
                 "repl-backlog-size", "cluster-require-full-coverage", "cluster-allow-reads-when-down")


def _across_nodes(probe: Probe) -> list[Finding]:
    """On a cluster side the settings above are read on every primary: one differing is a warning by name
    (the comparison with the other side used the playbook's node only)."""
    out = []
    for role, view in sorted(probe.clusters.items(), reverse=True):
        values: dict[str, dict[str, list[str]]] = {}
        for n in view.readable_primaries():
            try:
                conf = dict(n.side.call("CONFIG", "GET", "*"))
            except Unavailable:
                continue
            for k, v in conf.items():
                k, v = text(k), text(v)
                if k in NODE_SETTINGS:
                    values.setdefault(k, {}).setdefault(v, []).append(n.address)
        for k, by_value in sorted(values.items()):
            if len(by_value) > 1:
                where = "; ".join(f"{v!r} on {', '.join(a)}" for v, a in sorted(by_value.items()))
                out.append(Finding(k, where if role == "source" else "", where if role == "target" else "", WARN,
                                   f"differs across the {role}'s primaries",
                                   f"set {k} alike on every {role} primary"))
    return out


def config_check(probe: Probe) -> Check:
    try:
        s, t = read_config(probe, "source"), read_config(probe, "target")
    except Unavailable as e:
        return Check("config", "Configuration", UNKNOWN, f"could not check: {e}",
                     "compare maxmemory, maxmemory-policy, databases, notify-keyspace-events, timeout, persistence, "
                     "output buffer limits and proto-max-bulk-len in the provider's console", {"unavailable": str(e)})
    s, t = _aliases(s), _aliases(t)
    # In cluster mode only database 0 exists, or cluster-databases of them (Valkey 9.0+).
    s, t = (({**conf, "databases": conf.get("cluster-databases", "1")} if role in probe.clusters else conf)
            for role, conf in (("source", s), ("target", t)))
    highest = max(probe.source_keys.dbs, default=0)
    findings = [cmp(s, t, probe.source_keys.used_memory, highest) for cmp in COMPARISONS]
    if "target" in probe.clusters and findings[2].status != PASS:
        findings[2].note += " (in cluster mode: cluster-databases, which only Valkey 9.0+ has)"
        findings[2].fix = (f"set cluster-databases {max(int(s['databases'] or 1), highest + 1)} on every target node "
                           "(Valkey 9.0+; needs a restart), or move the data into database 0 first")
    if "target" in probe.clusters:  # each target shard holds a share: compared per shard in cluster.memory
        findings[0] = Finding("maxmemory", s.get("maxmemory", "?"), t.get("maxmemory", "?"), PASS,
                              "compared per target shard (Memory per target shard)")
    if (lack := _lacking(s, t)) is not None:
        findings.append(lack)
    findings += _across_nodes(probe)
    worst = min((f.status for f in findings), key=STATUSES.index)
    bad = [f for f in findings if f.status != PASS]
    data = {"settings": [f.to_json() for f in findings]}
    if not bad:
        return Check("config", "Configuration", PASS, f"{len(findings)} settings compared; no difference that matters",
                     "", data)
    return Check("config", "Configuration", worst,
                 "; ".join(f.describe() for f in bad),
                 "; ".join(f.fix for f in bad if f.fix), data)
