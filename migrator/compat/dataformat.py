"""Data format: can each data type in use be copied to the target, and back for a rollback?

For each core type present in the source (all of them when the source is empty), a canary is
DUMPed on one server and RESTOREd on the other; where RESTORE refuses the payload, a
type-aware copy is tried instead. That decides ``copy_method`` (sync) and
``rollback_copy_method`` (target → source), which the sync code reads from the report, and
predicts whether native replication works in each direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrator.compat import capabilities, rdb
from migrator.compat.canary import Canaries, Transfer
from migrator.compat.commands import command_table, lookup
from migrator.compat.config import read_config
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rdb import accepts, written_version
from migrator.compat.rpc import Unavailable
from migrator.compat.typecopy import CORE_TYPES

DUMP_RESTORE, TYPE_AWARE = "dump-restore", "type-aware"


@dataclass
class Direction:
    src: str
    dst: str
    transfers: list[Transfer] = field(default_factory=list)
    unavailable: str = ""  # why the canaries could not run (a restricted command)

    @property
    def confirmed(self) -> bool:
        return not self.unavailable

    @property
    def method(self) -> str | None:
        """The copy method that carried every type, preferring DUMP/RESTORE; None if a type failed both
        (or the canaries could not run)."""
        kinds = {t.kind for t in self.transfers}
        ok = {t.kind for t in self.transfers if t.ok}
        if not self.confirmed or not kinds or kinds - ok:
            return None
        return TYPE_AWARE if any(t.method == TYPE_AWARE for t in self.transfers) else DUMP_RESTORE

    @property
    def payload_version(self) -> int | None:
        return next((t.payload_version for t in self.transfers if t.payload_version is not None), None)

    def failed(self, method: str) -> list[Transfer]:
        return [t for t in self.transfers if t.method == method and not t.ok]

    def to_json(self) -> dict:
        return {"confirmed": self.confirmed, "method": self.method, "payload_version": self.payload_version,
                "unavailable": self.unavailable, "transfers": [t.to_json() for t in self.transfers]}


def types_to_test(probe: Probe) -> list[str]:
    present = probe.source_keys.types()
    return [t for t in CORE_TYPES if t in present] or list(CORE_TYPES)


def copy(can: Canaries, src: str, dst: str, kinds: list[str]) -> Direction:
    d = Direction(src, dst)
    try:
        for kind in kinds:
            key = can.make(src, kind)
            t = can.dump_restore(src, dst, kind, key)
            d.transfers.append(t)
            if not t.ok:
                d.transfers.append(can.type_aware(src, dst, kind, key))
    except Unavailable as e:
        d.unavailable = str(e)
    return d


def _relaxed(probe: Probe) -> bool:
    try:
        return read_config(probe, "target").get("rdb-version-check") == "relaxed"
    except Unavailable:
        return False


def _versions(probe: Probe, fwd: Direction, back: Direction) -> tuple[int | None, int | None]:
    """The RDB version each server writes: measured from a canary DUMP, else from the table."""
    return (fwd.payload_version or written_version(probe.source_id),
            back.payload_version or written_version(probe.target_id))


def _describe(d: Direction, versions: tuple, probe: Probe, relaxed: bool) -> tuple[str, str | None]:
    """(evidence, method) for one direction; the method is predicted where canaries could not run."""
    arrow = f"{d.src}→{d.dst}"
    if not d.confirmed:
        src_v, dst_v = versions if d.src == "source" else versions[::-1]
        if src_v is None or dst_v is None:
            return f"{arrow}: canary not run ({d.unavailable}); RDB versions unknown", None
        ok, why = accepts(probe.identity(d.dst), dst_v, src_v, relaxed and d.dst == "target")
        method = DUMP_RESTORE if ok else TYPE_AWARE
        return f"{arrow}: canary not run ({d.unavailable}); predicted {method}: {why}", method
    kinds = ", ".join(sorted({t.kind for t in d.transfers}))
    text = f"{arrow}: DUMP/RESTORE of {kinds}: {_outcome(d.failed(DUMP_RESTORE))}"
    if d.failed(DUMP_RESTORE):
        text += f", type-aware copy {_outcome(d.failed(TYPE_AWARE))}"
    return text, d.method


def _outcome(failed: list[Transfer]) -> str:
    if not failed:
        return "ok"
    return f"failed for {', '.join(t.kind for t in failed)} ({failed[0].error})"


def _replication(probe: Probe, method: str | None, rollback: str | None, predicted: bool) -> dict[str, str]:
    """Whether native replication would work each way: it needs the same RDB compatibility as RESTORE."""
    refused = (capabilities.replication_refused(capabilities.profile_of(probe, "source"))
               or capabilities.attach_refused(capabilities.profile_of(probe, "target")))
    try:
        psync = lookup(probe.memo("commands:source", lambda: command_table(probe.source)), "psync") is not None
    except Unavailable:
        psync = None  # COMMAND refused: the capability probe (wrong-arity PSYNC, ACL DRYRUN) decides
    if refused:
        psync = False
    if method != DUMP_RESTORE:
        forward = "does not work: the target cannot load the source's RDB format"
    elif psync is False or refused:
        forward = f"does not work: {refused or 'PSYNC is not available on the source'}"
    elif psync is None:
        forward = "unknown: the source's COMMAND is refused and the capability probe could not tell whether PSYNC is"
    else:
        forward = "works (full sync)"
    if forward.startswith("works") and (sync := capabilities.sync_refused(capabilities.profile_of(probe, "source"))):
        forward = (f"unknown: PSYNC is present but {sync}, which managed services do when they accept no replicas; "
                   "replica_in_sync shows whether the link comes up")
    back_refused = (capabilities.replication_refused(capabilities.profile_of(probe, "target"))
                    or capabilities.attach_refused(capabilities.profile_of(probe, "source")))
    reverse = (f"does not work: {back_refused}" if back_refused else "works (full sync)" if rollback == DUMP_RESTORE else
               "full sync does not work (the source cannot load the target's RDB format); a partial resync works "
               "only right after promoting the target with REPLICAOF NO ONE, within the replication backlog")
    note = " (predicted from RDB versions)" if predicted else ""
    return {"target_replicates_source": forward + note, "source_replicates_target": reverse + note}


def data_format_check(probe: Probe) -> Check:
    kinds = types_to_test(probe)
    with Canaries(probe.source, probe.target, route=probe.side_for_slot) as can:
        fwd = copy(can, "source", "target", kinds)
        back = copy(can, "target", "source", kinds)
    relaxed = _relaxed(probe)
    versions = _versions(probe, fwd, back)
    fwd_text, method = _describe(fwd, versions, probe, relaxed)
    back_text, rollback = _describe(back, versions, probe, relaxed)
    replication = _replication(probe, method, rollback, not (fwd.confirmed and back.confirmed))
    probe.facts.update(copy_method=method, rollback_copy_method=rollback, replication=replication,
                       rdb_versions={"source": versions[0], "target": versions[1]})
    data = {"types": kinds, "rdb_versions": {"source": versions[0], "target": versions[1]},
            "rdb_version_check": "relaxed" if relaxed else "strict", "copy_method": method,
            "rollback_copy_method": rollback, "replication": replication,
            "forward": fwd.to_json(), "rollback": back.to_json()}
    evidence = (f"source writes RDB {versions[0]}, target RDB {versions[1]}"
                f"{' (rdb-version-check relaxed)' if relaxed else ''}; {fwd_text}; {back_text}; "
                f"sync copies {method or 'nothing: no method works'}, rollback copies {rollback or 'nothing: no method works'}; "
                f"replication target←source {replication['target_replicates_source']}")
    status, fix = _status(fwd, back, method, rollback)
    evidence, fix, blocked = _pair_plans(probe, relaxed, data, evidence, fix)
    if blocked and status == PASS:  # the data.types check fails on that data; here the method has exceptions
        status, fix = WARN, (f"{', '.join(blocked)} cannot reach this target by any method: see the data.types "
                             "check for what to do")
    return Check("data.format", "Data format and copy method", status, evidence, fix, data)


def _in_use(probe: Probe) -> set[str]:
    """Data in use on the source that some RDB loaders cannot read (see ``rdb.unreadable``)."""
    from migrator.compat.modules import count_field_ttls

    types = {t.lower() for t in probe.source_keys.types()}
    out = {rdb.VECTOR_SETS} if "vectorset" in types else set()
    if types - set(CORE_TYPES) - {"vectorset"}:
        out.add(rdb.MODULE_DATA)
    if probe.source_id.at_least("redis", 7, 4) or probe.source_id.at_least("valkey", 9, 0):
        try:
            count = probe.memo("field_ttls", lambda: count_field_ttls(probe))
            if count.hashes or count.fields:
                out.add(rdb.FIELD_TTL_HASHES)
        except Unavailable:
            pass
    return out


def _pair_plans(probe: Probe, relaxed: bool, data: dict, evidence: str, fix: str) -> tuple[str, str, tuple]:
    """The RDB decision table's view of the pair (``rdb.plan_pair``), each way: what
    ``rdb-version-check relaxed`` would change, and replication that the canaries (core types
    only) cannot show failing on data of a type the other side's loader lacks."""
    in_use = _in_use(probe)
    fwd = rdb.plan_pair(probe.source_id, probe.target_id, relaxed, in_use)
    back = rdb.plan_pair(probe.target_id, probe.source_id, False, in_use)
    data["pair_plan"] = {"in_use": sorted(in_use), "forward": fwd.to_json(), "rollback": back.to_json()}
    replication = data["replication"]
    for direction, key, other in (("forward", "target_replicates_source", probe.target_id),
                                  ("rollback", "source_replicates_target", probe.source_id)):
        src, dst = (probe.source_id, probe.target_id) if direction == "forward" else (probe.target_id, probe.source_id)
        foreign = rdb.unreadable(src, dst, in_use)
        if foreign and replication[key].startswith("works"):
            was = replication[key]
            replication[key] = (f"does not work: {', '.join(foreign)} in use cannot be loaded by {other.label}'s "
                                "RDB reader (a full sync would fail on them)")
            evidence = evidence.replace(f"replication target←source {was}", f"replication target←source {replication[key]}")
    probe.facts.update(replication=replication)
    if fwd.relaxed:
        evidence += f"; rdb-version-check relaxed on the target {fwd.relaxed}"
        if fwd.relaxed.startswith("would help") and data["copy_method"] != DUMP_RESTORE:
            fix = (fix + "; " if fix else "") + ("for DUMP/RESTORE and native replication, set rdb-version-check "
                                                 "relaxed on the target (CONFIG SET rdb-version-check relaxed)")
    if fwd.blocked:
        evidence += f"; {', '.join(fwd.blocked)} in use: no copy method carries them to this target (see data.types)"
    elif in_use & {rdb.FIELD_TTL_HASHES, rdb.VECTOR_SETS}:
        evidence += f"; {', '.join(sorted(in_use))} in use: copied {fwd.copy_method}"
    return evidence, fix, fwd.blocked


def _status(fwd: Direction, back: Direction, method: str | None, rollback: str | None) -> tuple[str, str]:
    outcomes = {
        "fwd-none": (FAIL, "a data type in use cannot be copied to the target by any method: use a target version "
                           "that reads the source's data (see the RDB versions above)"),
        "back-none": (FAIL, "a data type in use cannot be copied back to the source, so a rollback after the write "
                            "cutover would lose data: fix the error shown, or accept no rollback by design"),
        "unknown": (UNKNOWN, "allow DUMP/RESTORE and writes under __migrator:* on both servers, or verify by hand that "
                             "the target RESTOREs the source's DUMP payloads"),
        "typed": (WARN, "sync will copy type-aware (slower than DUMP/RESTORE, same result); nothing to do unless a "
                        "faster initial sync is needed, which needs a target that reads the source's RDB version"),
    }
    if fwd.confirmed and method is None:
        key = "fwd-none"
    elif back.confirmed and rollback is None:
        key = "back-none"
    elif not (fwd.confirmed and back.confirmed):
        key = "unknown"
    elif method == TYPE_AWARE:
        key = "typed"
    else:
        return PASS, ""
    return outcomes[key]
