"""The pre-flight: connect, gather, run every check, write the report.

Each check is a function of the gathered ``Probe``. A check that meets a restricted command
(``Unavailable``) or an unexpected server error becomes "could not check" with what to verify
by hand; only a lost connection (``UnreachableError``) stops the run.
"""

from __future__ import annotations

import time
from typing import Callable

import redis

from migrator.compat import acl, capabilities, commands, config, dataformat, functions, identify, keyspace, modules, strategy, suite
from migrator.compat import search
from migrator.compat import sentinel as sentinel_checks
from migrator.compat.model import FAIL, UNKNOWN, Check, CompatResult, verdict
from migrator.compat.probe import Probe
from migrator.compat import report as report_files
from migrator.compat import cluster as cluster_checks
from migrator.compat.rpc import Unavailable, first_line
from migrator import replication
from migrator.errors import RefusedError
from migrator.playbook import Playbook

CheckFn = Callable[[Probe], Check | None]  # None: the check does not apply to these endpoints

# (name, title, function, what to verify by hand when it cannot run); in the order they run.
CHECKS: tuple[tuple[str, str, CheckFn, str], ...] = (
    ("identity", "Identity and versions", lambda p: identify.identity_check(p.source_id, p.target_id),
     "compare the server versions in the provider's console"),
    ("topology", "Standalone servers", lambda p: identify.topology_check(p.source_id, p.target_id, _replicating(p)),
     "confirm both servers run standalone"),
    ("keyspace", "Keyspace", keyspace.keyspace_check, "run INFO keyspace on the target and confirm it is empty"),
    ("provider", capabilities.TITLE, capabilities.provider_check,
     "compare the provider's list of blocked commands with docs/compatibility.md (Managed services)"),
    ("sentinel", sentinel_checks.TITLE, sentinel_checks.sentinel_check,
     "run SENTINEL CKQUORUM and SENTINEL REPLICAS on a sentinel, and CONFIG GET min-replicas-to-write on the primary"),
    ("data.format", "Data format and copy method", dataformat.data_format_check,
     "DUMP a key on the source and RESTORE it on the target under a test name"),
    ("mirror.strategy", strategy.TITLE, strategy.strategy_check,
     "check that the source runs PSYNC for migrator's user (ACL DRYRUN <user> PSYNC ? -1) and that the target "
     "reads the source's RDB version"),
    ("data.types", "Data the target cannot hold", modules.data_types_check,
     "look for module types, vector sets and hash field TTLs on the source"),
    ("modules", "Modules", modules.modules_check, "compare the modules loaded on both servers in the provider's console"),
    ("search.indexes", search.TITLE, search.search_indexes_check,
     "run FT._LIST and FT.INFO on the source and recreate each index on the target with FT.CREATE"),
    ("commands.missing", "Commands the target lacks", commands.missing_commands_check,
     "compare INFO commandstats on the source with COMMAND on the target"),
    ("commands.behaviour", "Commands that behave differently", commands.behaviour_check,
     "compare INFO commandstats on the source with the differences in docs/compatibility.md"),
    ("config", "Configuration", config.config_check, "compare the two servers' settings in the provider's console"),
    ("acl", "ACL users", acl.acl_check, "compare ACL LIST on both servers (or the provider's user settings)"),
    ("auth", "Password (requirepass)", acl.auth_check, "confirm both servers require a password, or neither does"),
    ("functions", "Lua functions", functions.functions_check, "compare FUNCTION LIST on both servers"),
    ("scripts", "Lua scripts (EVAL)", functions.scripts_check, "check whether the application runs EVAL scripts"),
    ("tests", suite.TITLE, suite.tests_check, "run the application's tests against a Valkey of the target's version"),
)

# Checks that write (canaries, test data) are skipped when the topology is wrong: a replica
# refuses writes and a cluster slot nobody owns answers CLUSTERDOWN, which would only add noise.
# (On a healthy cluster they write to the primary owning their slot.)
_WRITES = frozenset({"data.format", "tests"})


def _replicating(probe: Probe) -> str | None:
    """host:port of the source as the target reaches it, where the mirror strategy may be replication."""
    if probe.playbook.mirror.strategy == "dual-write":
        return None
    host, port = replication.source_address(probe.playbook)
    return f"{host}:{port}"


def run_check(name: str, title: str, fn: CheckFn, manual: str, probe: Probe) -> Check | None:
    try:
        return fn(probe)
    except Unavailable as e:
        return Check(name, title, UNKNOWN, f"could not check: {e}",
                     f"enable {e.command} for migrator's user on the {e.role}, or {manual}", {"unavailable": str(e)})
    except redis.exceptions.ResponseError as e:
        return Check(name, title, UNKNOWN, f"could not check: a server answered {first_line(e)!r}",
                     manual, {"error": str(e)})


def checks_for(probe: Probe) -> tuple[tuple[str, str, CheckFn, str], ...]:
    """Every check in order; with a cluster on either side, the cluster checks follow the topology check."""
    if not probe.clusters:
        return CHECKS
    at = next(i for i, c in enumerate(CHECKS) if c[0] == "topology") + 1
    return CHECKS[:at] + cluster_checks.CHECKS + CHECKS[at:]


# A failure of one of these means a write would meet the wrong server (a replica, a cluster
# slot nobody owns or one being moved): the writing checks are skipped, saying which.
_BLOCKS_WRITES = {"topology": "the topology check failed", "cluster.slots": "the cluster slot coverage check failed"}


def run_checks(probe: Probe) -> list[Check]:
    checks: list[Check] = []
    for name, title, fn, manual in checks_for(probe):
        blocked = [why for c in checks if c.status == FAIL and (why := _BLOCKS_WRITES.get(c.name))]
        if name in _WRITES and blocked:
            checks.append(Check(name, title, UNKNOWN, f"skipped: {blocked[0]}",
                                "fix the topology, then run migrator compat again"))
            continue
        check = run_check(name, title, fn, manual, probe)
        if check is not None:
            checks.append(check)
    return checks


def run(playbook: Playbook, *, write_report: bool = True) -> CompatResult:
    """Run the whole pre-flight against the playbook's servers; raises UnreachableError if one is down."""
    started = time.monotonic()
    source = cluster_checks.open_side("source", playbook.source)
    try:
        target = cluster_checks.open_side("target", playbook.target)
    except BaseException:
        source.close()
        raise
    try:
        try:
            probe = Probe.gather(playbook, source, target)
        except Unavailable as e:
            raise RefusedError(f"cannot run the compatibility checks: {e}; "
                               "grant INFO, SCAN and TYPE to migrator's user") from None
        try:
            checks = run_checks(probe)
            probe.record_own_calls()
        finally:
            probe.close()
    finally:
        source.close()
        target.close()
    facts = {k: probe.facts.get(k) for k in ("copy_method", "rollback_copy_method", "replication", "rdb_versions",
                                            "mirror", "capabilities")}
    data = {
        "source": {"url": playbook.source.display, **probe.source_id.to_json()},
        "target": {"url": playbook.target.display, **probe.target_id.to_json()},
        **facts,
        "keyspace": {"source": probe.source_keys.to_json(), "target": probe.target_keys.to_json()},
        "clusters": {role: view.to_json() for role, view in probe.clusters.items()},
        "duration_s": round(time.monotonic() - started, 3),
    }
    result = CompatResult(verdict(checks), checks, None, data)
    if write_report:
        result.report_id = report_files.write(playbook, result).id
    return result
