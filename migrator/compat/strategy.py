"""The mirror strategy for this pair: replication where the source allows it, else dual-write.

A Sentinel-managed or cluster deployment on either side is always dual-write: a replica of one
cluster node gets one shard, a cluster node cannot replicate outside its cluster, and a
Sentinel failover would leave the target replicating a demoted primary.

``mirror.strategy: auto`` becomes ``replication`` when the source lets the playbook's user run
PSYNC (the command exists, is not renamed away, and the ACL allows it) and the target loads the
source's RDB (the data-format check's canaries); otherwise ``dual-write``, saying why. An
explicit ``replication`` that cannot work fails the pre-flight. Probing is read-only: SYNC/PSYNC
are never sent (that would make the source fork for a BGSAVE).
"""

from __future__ import annotations

from migrator import replication
from migrator.compat import capabilities
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe

TITLE = "Mirror strategy"


def decision(probe: Probe) -> replication.Decision:
    requested = probe.playbook.mirror.strategy
    topology = probe.source.guard("INFO cluster", lambda: replication.topology_why(
        probe.playbook, probe.source.client, probe.target.client))
    subset = probe.source.guard("INFO keyspace", lambda: replication.subset_selected(probe.playbook, probe.source.client))
    allowed = probe.source.guard("COMMAND INFO", lambda: replication.source_allows_sync(
        probe.source.client, probe.playbook.source.user))
    prof = capabilities.profile_of(probe, "source")
    refused = (capabilities.replication_refused(prof) or capabilities.sync_refused(prof)
               or capabilities.attach_refused(capabilities.profile_of(probe, "target")))
    if allowed.allowed is not False and refused:
        # The capability probe saw the provider block replication (SYNC or PSYNC refused): never "works".
        allowed = replication.SyncAllowed(False, f"the source refuses replication: {refused}")
    loads, rdb_why = replication.rdb_loadable(probe.facts.get("copy_method"),
                                              (probe.facts.get("replication") or {}).get("target_replicates_source"))
    d = replication.decide(requested, allowed, loads, rdb_why, subset, topology)
    probe.facts["mirror"] = d.to_json()
    return d


def strategy_check(probe: Probe) -> Check:
    d = decision(probe)
    data = d.to_json()
    evidence = f"mirror.strategy {d.requested}: {d.strategy} — {d.why}"
    if not d.ok:
        return Check("mirror.strategy", TITLE, FAIL, evidence,
                     "set mirror.strategy: dual-write (or auto)" + ("" if d.topology else
                     ", or allow PSYNC and REPLCONF for migrator's source user (and use a target that loads the source's "
                     "RDB; migrate the whole keyspace)"), data)
    if d.unconfirmed:
        return Check("mirror.strategy", TITLE, WARN, evidence,
                     "let migrator's source user run ACL DRYRUN (or ACL GETUSER) so the pre-flight can confirm the "
                     "source allows PSYNC, or watch replica_in_sync once mirroring begins", data)
    return Check("mirror.strategy", TITLE, PASS, evidence, "", data)
