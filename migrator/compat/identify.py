"""Which server is which: Redis or Valkey, its version, and whether it runs standalone.

Valkey keeps ``redis_version:7.2.4`` pinned for client compatibility, so the kind comes from
``server_name``/``valkey_version`` and never from ``redis_version`` alone. Valkey 8 renamed
``redis_mode`` to ``server_mode``; both are read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from migrator.compat.model import FAIL, PASS, WARN, Check


@dataclass(frozen=True)
class Identity:
    kind: str  # "redis" or "valkey"
    version: str  # "9.1.2"
    mode: str  # "standalone", "cluster" or "sentinel"
    role: str  # "master" or "slave"
    redis_version: str  # what INFO says under that name (7.2.4 on every Valkey)
    master: str = ""  # host:port of its primary, when it is a replica

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split(".") if p.isdigit())

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def label(self) -> str:
        return f"{self.kind} {self.version}"

    def at_least(self, kind: str, *version: int) -> bool:
        return self.kind == kind and self.version_tuple >= version

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def identify(info: dict[str, Any]) -> Identity:
    """An Identity from a parsed ``INFO`` reply (server and replication sections)."""
    valkey = str(info.get("server_name", "")).lower() == "valkey" or "valkey_version" in info
    version = str(info.get("valkey_version") if valkey else info.get("redis_version", "0.0.0"))
    mode = str(info.get("server_mode") or info.get("redis_mode") or "standalone")
    return Identity(
        kind="valkey" if valkey else "redis",
        version=version,
        mode=mode,
        role=str(info.get("role", "master")),
        redis_version=str(info.get("redis_version", "")),
        master=f"{info.get('master_host')}:{info.get('master_port')}" if str(info.get("role")) == "slave" else "",
    )


def identity_check(source: Identity, target: Identity) -> Check:
    """Both servers identified; a target that is not Valkey, or older than a Valkey source, warns."""
    evidence = f"source {source.label} ({source.mode}), target {target.label} ({target.mode})"
    data = {"source": source.to_json(), "target": target.to_json()}
    if target.kind != "valkey":
        return Check("identity", "Identity and versions", WARN, evidence + "; the target is not Valkey",
                     "check the target URL: migrator is built to move Redis to Valkey", data)
    if source.kind == "valkey" and source.version_tuple > target.version_tuple:
        return Check("identity", "Identity and versions", WARN,
                     evidence + "; the target is an older Valkey than the source (a downgrade)",
                     f"use a Valkey {source.major_minor} or newer target, or expect the data-format and command checks to fail",
                     data)
    return Check("identity", "Identity and versions", PASS, evidence, "", data)


def topology_check(source: Identity, target: Identity, source_address: str | None = None) -> Check:
    """A URL pointing at a sentinel process, or a read-only replica as the target, fails; a
    cluster on either side is judged by ``cluster_topology_check``.

    ``source_address`` (host:port as the target reaches the source) is given where the mirror
    strategy may be replication: a target replicating exactly that source is then the
    strategy's own mirror, not a misconfiguration.
    """
    problems, fixes = [], []
    own_mirror = bool(source_address) and target.role != "master" and target.master == source_address
    if "cluster" in (source.mode, target.mode) and "sentinel" not in (source.mode, target.mode):
        return cluster_topology_check(source, target)  # a replica node of a cluster is fine: its primaries are found
    for role, ident in (("source", source), ("target", target)):
        if ident.mode not in ("standalone", "cluster"):  # a cluster is read node by node (compat.cluster)
            problems.append(f"the {role} runs in {ident.mode} mode")
            fixes.append(f"the {role} URL points at a sentinel: use `sentinel:` in the playbook "
                         "(addresses and master_name, docs/topologies.md) so the primary is found and followed")
    if target.role != "master" and not own_mirror:
        problems.append("the target is a replica (read-only), so nothing can be written to it")
        fixes.append("run REPLICAOF NO ONE on the target, or point the target URL at its primary")
    modes = {"source": {"mode": source.mode, "role": source.role}, "target": {"mode": target.mode, "role": target.role}}
    if problems:
        return Check("topology", "Standalone servers", FAIL,
                     "; ".join(problems) + ": migrator reads and writes the data nodes (a primary, a cluster's "
                     "nodes, or the primary a `sentinel:` endpoint resolves to), not a sentinel or a replica",
                     "; ".join(fixes), modes)
    if own_mirror:
        return Check("topology", "Standalone servers", PASS, f"both servers are standalone; the target replicates this "
                     f"source ({source_address}), as the replication mirror strategy makes it", "", modes)
    return Check("topology", "Standalone servers", PASS, "both servers are standalone; the target is a primary", "", modes)


def cluster_topology_check(source: Identity, target: Identity) -> Check:
    """A cluster on either side: both clusters pass (the slot layouts may differ); a standalone server on
    one side and a cluster on the other is a legitimate migration (the data moves key by key), which
    warns what the application must change at the cutover."""
    modes = {"source": {"mode": source.mode, "role": source.role}, "target": {"mode": target.mode, "role": target.role}}
    if source.mode == target.mode == "cluster":
        return Check("topology", "Topology", PASS, "source and target are clusters: keys move slot by slot to "
                     "whichever target shard owns them, so the shard counts and slot layouts may differ "
                     "(every node is checked below)", "", modes)
    if target.mode == "cluster":
        return Check("topology", "Topology", WARN, "the source is one server and the target a cluster: after "
                     "the cutover the application needs a cluster-aware client, keys used together in one command "
                     "must share a hash slot, and only database 0 exists unless the target sets cluster-databases (Valkey 9.0+) "
                     "(see Multi-key commands and slots)",
                     "switch the application to a cluster client and give keys used together one hash tag "
                     "({user42}:cart) before the read cutover; mirroring counts the commands that would fail "
                     "with CROSSSLOT on the target", modes)
    if target.role != "master":
        return Check("topology", "Topology", FAIL, "the source is a cluster and the target a replica (read-only), "
                     "so nothing can be written to it", "run REPLICAOF NO ONE on the target, or point the target URL "
                     "at its primary", modes)
    return Check("topology", "Topology", WARN, "the source is a cluster and the target one server: after the "
                 "cutover the application must use a standalone client (the target refuses CLUSTER commands "
                 "and sends no MOVED); all slots land in the target's one keyspace",
                 "plan the client change for the cutover: a cluster client configured with the target's address "
                 "fails on CLUSTER SLOTS", modes)
