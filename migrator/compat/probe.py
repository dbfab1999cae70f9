"""Everything the checks read, gathered once: identities, the source's command history, samples.

``INFO commandstats`` is read first, before any check runs a command of its own on the source
(HTTL, DUMP...), and the calls earlier migrator runs made (``ownstats``) are subtracted from it,
so the commands compared are the application's, not migrator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import redis

from migrator.cluster import key_slot
from migrator.compat import cluster as cluster_probe
from migrator.compat import ownstats
from migrator.compat.ownstats import command_calls
from migrator.compat.identify import Identity, identify
from migrator.compat.rpc import Side, Unavailable
from migrator.compat.sample import KeyspaceSample, merge, sample
from migrator.playbook import Playbook


# What a cluster's replicas send its primaries (counted there, not sent by the application).
CLUSTER_REPLICATION = frozenset({"psync", "sync", "replconf"})


@dataclass
class Probe:
    playbook: Playbook
    source: Side
    target: Side
    source_id: Identity
    target_id: Identity
    _commandstats: dict[str, int] | Unavailable  # "client|setname" → the application's calls on the source
    source_keys: KeyspaceSample
    target_keys: KeyspaceSample
    # The source's statistics as read (migrator's own calls included), and those own calls.
    raw_commandstats: dict[str, int] = field(default_factory=dict)
    source_run_id: str = ""
    own_calls: dict[str, int] = field(default_factory=dict)
    # Results one check leaves for another (copy methods...) and cached replies.
    facts: dict[str, Any] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    # A cluster side ("source"/"target"): every node read (migrator.compat.cluster). The
    # commandstats and keyspace samples above are then aggregated over that side's primaries.
    clusters: dict[str, cluster_probe.ClusterView] = field(default_factory=dict)
    node_samples: dict[str, KeyspaceSample] = field(default_factory=dict)  # node id -> its sample
    source_crossslot_errors: int | None = None  # INFO errorstats CROSSSLOT, summed over the source primaries

    @classmethod
    def gather(cls, playbook: Playbook, source: Side, target: Side) -> "Probe":
        clusters: dict[str, cluster_probe.ClusterView] = {}
        try:
            for role, side in (("source", source), ("target", target)):
                if cluster_probe.side_is_cluster(side):
                    clusters[role] = cluster_probe.gather(role, side)
            if clusters:
                return cls._gather_cluster(playbook, source, target, clusters)
        except BaseException:
            for view in clusters.values():
                view.close()
            raise
        try:
            raw: dict[str, int] | Unavailable = command_calls(source.call("INFO", "commandstats"))
        except Unavailable as e:
            raw = e  # the command checks report it as could-not-check
        server = source.call("INFO", "server")
        stats, own, run_id = raw, {}, str(server.get("run_id", ""))
        if not isinstance(raw, Unavailable):
            stats, own = ownstats.application_calls(playbook.state_path, run_id, raw)
        source_id = identify({**server, **source.call("INFO", "replication")})
        target_id = identify({**target.call("INFO", "server"), **target.call("INFO", "replication")})
        return cls(playbook, source, target, source_id, target_id, stats, sample(source), sample(target),
                   raw_commandstats=raw if isinstance(raw, dict) else {}, source_run_id=run_id, own_calls=own,
                   source_crossslot_errors=_crossslot(source))

    @classmethod
    def _gather_cluster(cls, playbook: Playbook, source: Side, target: Side,
                        clusters: dict[str, cluster_probe.ClusterView]) -> "Probe":
        """A pair where one side (or both) is a cluster: the per-server facts come from every primary."""
        stats: dict[str, int] | Unavailable
        own: dict[str, int] = {}
        raw: dict[str, int] = {}
        crossslot: int | None = None
        run_id = ""
        replication_calls: dict[str, int] = {}
        view = clusters.get("source")
        if view is None:  # read first, before sampling sends SCAN and TYPE (as in gather)
            try:
                raw = command_calls(source.call("INFO", "commandstats"))
                run_id = str(source.call("INFO", "server").get("run_id", ""))
                stats, own = ownstats.application_calls(playbook.state_path, run_id, raw)
            except Unavailable as e:
                stats = e
            crossslot = _crossslot(source)
        else:
            # The application's calls summed over the source primaries, each less migrator's own
            # calls recorded for that node (ownstats keeps one ledger per node id).
            stats = {}
            for n in view.readable_primaries():
                if n.commandstats is None:
                    stats = Unavailable(n.side.role, "INFO commandstats", "refused")
                    break
                app, mine = ownstats.application_calls(playbook.state_path, n.run_id, n.commandstats, node=n.node.id)
                for name, calls in app.items():
                    stats[name] = stats.get(name, 0) + calls
                for name, calls in mine.items():
                    own[name] = own.get(name, 0) + calls
                for name, calls in n.commandstats.items():
                    raw[name] = raw.get(name, 0) + calls
                if n.crossslot_errors is not None:
                    crossslot = (crossslot or 0) + n.crossslot_errors
            if isinstance(stats, dict) and any(n.node.role == "replica" for n in view.nodes):
                # A cluster's own replicas sync from its primaries: their PSYNC/REPLCONF are not the application's.
                for name in CLUSTER_REPLICATION & set(stats):
                    replication_calls[name] = stats.pop(name)
        samples: dict[str, KeyspaceSample] = {}
        per_role: dict[str, KeyspaceSample] = {}
        for role, side in (("source", source), ("target", target)):
            view = clusters.get(role)
            if view is None:
                per_role[role] = sample(side)
                continue
            for n in view.readable_primaries():
                samples[n.node.id] = sample(n.side)
            per_role[role] = merge([samples[n.node.id] for n in view.readable_primaries()])
        ids = {}
        for role, side in (("source", source), ("target", target)):
            ids[role] = identify({**side.call("INFO", "server"), **side.call("INFO", "replication")})
        return cls(playbook, source, target, ids["source"], ids["target"], stats, per_role["source"],
                   per_role["target"], raw_commandstats=raw, source_run_id=run_id, own_calls=own, clusters=clusters,
                   node_samples=samples, source_crossslot_errors=crossslot,
                   facts={"cluster_replication_calls": replication_calls} if replication_calls else {})

    def key_client(self, role: str, db: int, key: bytes) -> redis.Redis:
        """A client that holds ``key``: the side's server, or on a cluster the primary owning its slot."""
        view = self.clusters.get(role)
        if view is None:
            return self.side(role).on_db(db)
        return view.side_for_slot(key_slot(key), self.side(role)).client

    def side_for_slot(self, role: str, slot: int) -> Side:
        """The side's server, or on a cluster the primary owning ``slot`` (for writes: canaries)."""
        view = self.clusters.get(role)
        return self.side(role) if view is None else view.side_for_slot(slot, self.side(role))

    def close(self) -> None:
        for view in self.clusters.values():
            view.close()

    def record_own_calls(self) -> None:
        """After the checks: what this run sent to the source goes into the ledger (``ownstats``)."""
        if isinstance(self._commandstats, Unavailable):
            return
        view = self.clusters.get("source")
        if view is not None:
            for n in view.readable_primaries():
                try:
                    run_id = str(n.side.call("INFO", "server").get("run_id", ""))
                    after = command_calls(n.side.call("INFO", "commandstats"))
                except Unavailable:
                    continue
                if run_id == n.run_id and n.commandstats is not None:
                    ownstats.record(self.playbook.state_path, run_id, n.commandstats, after, names=None,
                                    node=n.node.id)
            return
        try:
            run_id = str(self.source.call("INFO", "server").get("run_id", ""))
            after = command_calls(self.source.call("INFO", "commandstats"))
        except Unavailable:
            return
        if run_id == self.source_run_id:
            ownstats.record(self.playbook.state_path, run_id, self.raw_commandstats, after, names=None)

    @property
    def commandstats(self) -> dict[str, int]:
        """The source's executed commands; raises Unavailable if INFO commandstats was refused."""
        if isinstance(self._commandstats, Unavailable):
            raise self._commandstats
        return self._commandstats

    def side(self, role: str) -> Side:
        return self.source if role == "source" else self.target

    def identity(self, role: str) -> Identity:
        return self.source_id if role == "source" else self.target_id

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per run (a failure, e.g. Unavailable, is not cached and raises again)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


def _crossslot(side: Side) -> int | None:
    """``errorstat_CROSSSLOT`` count (Redis 6.2+); None where the server does not report error statistics."""
    try:
        errors = side.call("INFO", "errorstats")
    except (Unavailable, redis.exceptions.ResponseError):
        return None
    cross = errors.get("errorstat_CROSSSLOT")
    return int(cross.get("count", 0)) if isinstance(cross, dict) else 0
