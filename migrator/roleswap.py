"""The write cutover's role swap in the replication strategy, its rollback, and ``complete``'s detach.

Forward (reads-on-target → writes-on-target), while every shim holds writes (the barrier):

1. protect the source against a full sync it cannot load: ``repl-diskless-load swapdb`` keeps the
   old dataset when loading fails (seen on Redis 6.2 and 7.0: "Can't handle RDB format version 11"
   leaves every key in place); the default, disk-based load flushes the data first and leaves
   the target's RDB as ``dump.rdb``, which that Redis then refuses to start with;
2. ``CLIENT PAUSE <ms> WRITE`` on the source, so writers that bypass the shims wait too. The pause
   lasts until the hold's deadline at most: a crash never leaves the source paused;
3. the offsets equal, read twice;
4. ``REPLICAOF NO ONE`` on the target (it keeps the source's replication id as ``master_replid2``);
5. ``REPLICAOF target`` on the source, verified: the target's ``sync_partial_ok`` went up and its
   ``sync_full`` did not, the source's link is up, the offsets are equal. The mirror's ``reverse``
   is then "replication": a write sent to the source gets READONLY;
6. otherwise (a full sync started, no resync within the budget, the source's REPLICAOF refused, or
   its data could not be protected): ``REPLICAOF NO ONE`` on the source again, its key counts
   compared with the target's, and ``reverse`` is "dual-write": the shims keep the source in step
   for the rollback window.

The source's pause is lifted once the new phase is recorded (``release``). Backward
(writes-on-target → reads-on-target) pauses the target's writes, waits for equal offsets, makes
the target a replica of the source while the source still replicates it (both are replicas for a
moment: every write is refused, none is lost), then promotes the source. With the target dead, the
source is promoted as it is. Every step reads the servers' roles first, so a run killed anywhere
in between is finished (or undone) by running the command again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator.action_types import ActionResult
from migrator.connect import make_client
from migrator.crash import crashpoint
from migrator.playbook import Endpoint, Playbook
from migrator.replication import (
    ReplStatus,
    keys_by_db,
    read,
    replica_settings,
    source_address,
    target_address,
)
from migrator.state import MirrorMode

POLL_S = 0.002
# Of the time left in the hold: what the wait for equal offsets may use before the target is
# promoted. What remains is for the resync (or the fallback) and recording the phase.
OFFSETS_SHARE = 0.3
KEEP_SECRET = "\x00secret"  # stands for a setting's earlier value migrator does not store (a password)


@dataclass
class Swap:
    ok: bool
    evidence: str
    # The servers' roles changed: write authority must move now (the phase is written even late).
    moved: bool = False
    reverse: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def client(ep: Endpoint, timeout: float) -> redis.Redis:
    """A client that gives up after one ``timeout`` (no retries): the swap works against a clock."""
    return make_client(ep, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def reachable(c: redis.Redis) -> str | None:
    """None if the server answers PING, else why not."""
    try:
        c.ping()
        return None
    except (redis.exceptions.RedisError, OSError) as e:
        return str(e) or type(e).__name__


def _offsets_equal(primary: redis.Redis, replica: redis.Redis, until: float) -> tuple[bool, int, int]:
    """Wait until the replica applied the primary's whole stream: equal offsets read twice in a row."""
    streak = 0
    p = r = -1
    while True:
        p = read(primary).master_repl_offset
        rs = read(replica)
        r = rs.replica_offset if rs.replica_offset is not None else -1
        streak = streak + 1 if p == r and rs.link_up else 0
        if streak >= 2:
            return True, p, r
        if time.monotonic() >= until:
            return False, p, r
        time.sleep(POLL_S)


def _pause_until_in_step(primary: redis.Redis, replica: redis.Redis, pause_ms: int, until: float,
                         data: dict[str, Any], crash: str) -> tuple[bool, int, int]:
    """Pause the primary's writes (every client's: those bypassing the shims too) for at most
    ``pause_ms`` and wait until the replica has its whole stream; unpause at once if it does not
    get there by ``until``. Returns (in step, primary offset, replica offset)."""
    data["paused_at"] = time.time()
    primary.execute_command("CLIENT", "PAUSE", str(pause_ms), "WRITE")
    data["pause_limit_ms"] = pause_ms
    crashpoint(crash)
    equal, p, r = _offsets_equal(primary, replica, until)
    if not equal:
        primary.execute_command("CLIENT", "UNPAUSE")
    return equal, p, r


def _settings_for_target(pb: Playbook) -> list[tuple[str, str]]:
    """How the source protects its data and authenticates to the target while it replicates it."""
    return [("repl-diskless-load", "swapdb"), *replica_settings(pb.target)]


def protect(pb: Playbook, source: redis.Redis, mirror: MirrorMode, save: Callable[[], None]) -> str | None:
    """Set the source's replica settings, recording each earlier value first; None, or why it could not."""
    try:
        for name, value in _settings_for_target(pb):
            current = str(source.config_get(name).get(name, ""))
            if current == value:
                continue
            if name not in mirror.restore:
                mirror.restore[name] = KEEP_SECRET if name == "masterauth" and current else current
                save()  # before the change: a crash must not lose the value to put back
            source.config_set(name, value)
    except redis.exceptions.ResponseError as e:
        return f"CONFIG on the source refused ({str(e).splitlines()[0]})"
    return None


def restore(source: redis.Redis, mirror: MirrorMode) -> str:
    """Put back the source settings the role swap changed; says what it did."""
    if not mirror.restore:
        return "no source setting to restore"
    done, kept = [], []
    for name, value in list(mirror.restore.items()):
        if value == KEEP_SECRET:
            kept.append(name)
        else:
            source.config_set(name, value)
            done.append(f"{name} {value or '(empty)'}")
        del mirror.restore[name]
    out = "restored the source's " + ", ".join(done) if done else ""
    if kept:
        out += ("; " if out else "") + f"left {', '.join(kept)} as set (its earlier value was a secret migrator does not store)"
    return out


# --- forward: reads-on-target → writes-on-target -------------------------------------------------


def forward(pb: Playbook, source: redis.Redis, target: redis.Redis, mirror: MirrorMode, save: Callable[[], None],
            budget_s: float, pause_ms: int) -> Swap:
    """Make the target the primary and the source its replica (or fall back to dual-write)."""

    start = time.monotonic()
    deadline = start + budget_s
    th, tp = target_address(pb)
    sh, sp = source_address(pb)
    s, t = read(source), read(target)
    data: dict[str, Any] = {"target_address": f"{th}:{tp}", "source_role": s.role, "target_role": t.role}
    if s.replicates(th, tp) and not t.is_replica:
        # A run killed after the source's REPLICAOF: the swap is done on the servers; verify it.
        data["found"] = "source already replicates the target (an interrupted run swapped the roles)"
        return _verify_or_fall_back(pb, source, target, None, deadline, data)
    if not s.is_replica and not t.is_replica:
        return _reattach(pb, target, sh, sp, data)
    if not t.replicates(sh, sp) or s.is_replica:
        where = f"replicates {s.master_host}:{s.master_port}" if s.is_replica else "is a primary"
        twhere = f"replicates {t.master_host}:{t.master_port}" if t.is_replica else "is a primary"
        return Swap(False, f"unexpected roles: the source {where} and the target {twhere}, where the target should "
                           f"replicate the source at {sh}:{sp}; fix the roles (REPLICAOF) and run advance again", data=data)
    if not t.link_up or t.sync_in_progress:
        why = "a full sync is loading" if t.sync_in_progress else "its link to the source is down"
        return Swap(False, f"the target is not in step with the source ({why}); wait until `migrator status` shows the "
                           "replica in sync and run advance again", data=data)
    cannot = protect(pb, source, mirror, save)
    data["protected"] = cannot is None
    paused_at = time.monotonic()
    equal, so, to = _pause_until_in_step(source, target, pause_ms, start + OFFSETS_SHARE * budget_s, data,
                                         "swap-after-pause")
    data.update(source_offset=so, target_offset=to)
    if not equal:
        return Swap(False, f"the target did not reach the source's offset while writes were paused (source {so}, target "
                           f"{to}); nothing was changed: run advance again", data=data)
    target.execute_command("REPLICAOF", "NO", "ONE")
    crashpoint("swap-after-promote")
    before = read(target, with_stats=True)
    data["promoted_at_offset"] = before.master_repl_offset
    data["offsets_equal_ms"] = round((time.monotonic() - paused_at) * 1000, 1)
    if cannot is not None:
        return _fall_back(pb, source, target, f"the source's data could not be protected against a full sync ({cannot})",
                          data, before)
    try:
        source.execute_command("REPLICAOF", th, str(tp))
    except redis.exceptions.ResponseError as e:
        return _fall_back(pb, source, target, f"REPLICAOF {th}:{tp} refused by the source ({e})", data, before)
    crashpoint("swap-after-replicaof")
    return _verify_or_fall_back(pb, source, target, before, deadline, data)


def _verify_or_fall_back(pb: Playbook, source: redis.Redis, target: redis.Redis, before: ReplStatus | None,
                         deadline: float, data: dict[str, Any]) -> Swap:
    """Wait for the source's partial resync from the target; on any sign of a full sync, fall back at once."""
    t0 = time.monotonic()
    streak = 0
    while True:
        tt, ss = read(target, with_stats=True), read(source)
        full = before is not None and (tt.sync_full or 0) > (before.sync_full or 0)
        if ss.sync_in_progress or full:
            return _fall_back(pb, source, target, "the source needed a full sync from the target (it cannot load "
                              "the target's RDB); stopped before it loaded", data, before)
        partial = before is None or (tt.sync_partial_ok or 0) > (before.sync_partial_ok or 0)
        in_step = ss.link_up and ss.replica_offset == tt.master_repl_offset and ss.master_replid == tt.master_replid
        streak = streak + 1 if partial and in_step else 0
        if streak >= 2:
            how = ("by partial resync (target sync_partial_ok "
                   f"{before.sync_partial_ok}→{tt.sync_partial_ok}, sync_full {before.sync_full}→{tt.sync_full})"
                   if before is not None else "(found replicating after an interrupted run)")
            data.update(resync="partial" if before is not None else "found", resync_ms=round((time.monotonic() - t0) * 1000, 1),
                        offset=tt.master_repl_offset)
            return Swap(True, f"role swap: the target is the primary; the source replicates it {how}, link up, offsets "
                              f"equal at {tt.master_repl_offset}: a write sent to the source gets READONLY",
                        moved=True, reverse="replication", data=data)
        if time.monotonic() >= deadline:
            link = "up" if ss.link_up else "down"
            return _fall_back(pb, source, target, f"no partial resync within {(deadline - t0) * 1000:.0f} ms (link {link}, "
                              f"source offset {ss.replica_offset}, target {tt.master_repl_offset})", data, before)
        time.sleep(POLL_S)


def _fall_back(pb: Playbook, source: redis.Redis, target: redis.Redis, why: str, data: dict[str, Any],
               before: ReplStatus | None) -> Swap:
    """Detach the source again and check it still holds the data: the shims dual-write for the rollback window."""

    if read(source).is_replica:
        source.execute_command("REPLICAOF", "NO", "ONE")
    crashpoint("swap-after-fallback")
    src_keys, tgt_keys = keys_by_db(source), keys_by_db(target)
    data.update(resync="none", fallback=why, source_keys=src_keys, target_keys=tgt_keys)
    drift = pb.check.max_key_count_drift
    short = [db for db, n in tgt_keys.items() if src_keys.get(db, 0) < n - max(int(n * drift), 0)]
    if short:
        held = ", ".join(f"{db}: {src_keys.get(db, 0):,} of {tgt_keys[db]:,}" for db in short)
        note = (f"; the SOURCE LOST KEYS ({held}): a rollback is not safe until `migrator check --full --repair` "
                "has copied them from the target")
    else:
        total = sum(src_keys.values())
        note = f"; the source still holds its data ({total:,} keys, as the target)"
    return Swap(True, f"role swap fell back to dual-write: {why}; the target is the primary, the source a primary "
                      f"kept in step by the shims for the rollback window (writers that bypass the shims are not "
                      f"mirrored: point them at the shims){note}",
                moved=True, reverse="dual-write", data=data)


def _reattach(pb: Playbook, target: redis.Redis, sh: str, sp: int, data: dict[str, Any]) -> Swap:
    """Both are primaries in reads-on-target: an interrupted run promoted the target, and the source
    kept write authority since (shims released in the old phase wrote to it only)."""
    target.execute_command("REPLICAOF", sh, str(sp))
    data["reattached"] = True
    return Swap(False, "both servers are primaries: an interrupted write cutover had promoted the target while the "
                       f"source kept write authority; the target now replicates the source at {sh}:{sp} again (a full "
                       "sync: Valkey loads Redis's RDB). Run advance again once `migrator status` shows it in sync",
                data=data)


# --- backward: writes-on-target → reads-on-target ----------------------------------------------


def backward(pb: Playbook, source: redis.Redis, target: redis.Redis | None, mirror: MirrorMode,
             budget_s: float, pause_ms: int, target_down: str | None = None, accept_source: bool = False) -> Swap:
    """Make the source the primary again and the target its replica (or promote the source alone)."""

    start = time.monotonic()
    deadline = start + budget_s
    th, tp = target_address(pb)
    sh, sp = source_address(pb)
    s = read(source)
    data: dict[str, Any] = {"source_role": s.role, "reverse": mirror.reverse}
    if mirror.reverse != "replication":
        if s.is_replica:
            return Swap(False, f"the source replicates {s.master_host}:{s.master_port} although the rollback window was "
                               "kept by dual-write: run REPLICAOF NO ONE on it after checking its data", data=data)
        note = restore(source, mirror)
        mirror.strategy, mirror.reverse = "dual-write", None
        mirror.why = ("rolled back from a write cutover whose rollback window was kept by dual-write: mirroring "
                      "continues by dual-write (no full sync, no stale reads); roll back to compatible and advance "
                      "again to return to replication")
        return Swap(True, f"the source was kept in step by the shims: mirroring continues by dual-write; {note}",
                    moved=True, data=data)
    if target is None:
        if s.is_replica:
            source.execute_command("REPLICAOF", "NO", "ONE")
            data.update(promoted_at_offset=s.replica_offset, link_down_s=s.link_down_since)
            how = (f"promoted the source at offset {s.replica_offset} (it applied the target's stream up to there; link "
                   f"down {s.link_down_since} s)")
        else:
            how = "the source is already a primary"
        note = restore(source, mirror)
        return Swap(True, f"the target is unreachable ({target_down}): {how}; {note}. When the target is back it is a "
                          f"stale primary: before it answers reads, make it a replica again (REPLICAOF {sh} {sp} on it: "
                          "a full sync), or first roll back to mirroring, where reads are served by the source",
                    moved=True, data=data)
    t = read(target)
    data["target_role"] = t.role
    broken = None
    if not s.is_replica and not t.is_replica:
        broken = "both servers are primaries while the target holds write authority"
    elif s.replicates(th, tp) and not t.is_replica and not s.link_up:
        broken = (f"the source's link to the target is down (for {s.link_down_since} s; a full sync it cannot load "
                  "loops once the replication backlog was exceeded: see its log)")
    if broken and not accept_source:
        return Swap(False, f"{broken}: the source may lack the writes made since. Run REPLICAOF NO ONE on the source, "
                           "`migrator check --full --repair` (it copies from the target), then `migrator rollback "
                           "--override source_keys --reason ...` (the source's data, as it is, becomes the truth)", data=data)
    if broken:
        data["accepted_source"] = broken
        if s.is_replica:
            source.execute_command("REPLICAOF", "NO", "ONE")
        # The target follows the source's data (a full sync Valkey loads), as the operator accepted.
        target.execute_command("REPLICAOF", sh, str(sp))
        s = read(source)
    if s.replicates(th, tp) and not t.is_replica:
        equal, to, so = _pause_until_in_step(target, source, pause_ms, start + OFFSETS_SHARE * budget_s, data,
                                             "back-after-pause")
        data.update(source_offset=so, target_offset=to)
        if not equal:
            return Swap(False, f"the source did not reach the target's offset while writes were paused (target {to}, "
                               f"source {so}); nothing was changed: run rollback again", data=data)
        # The target follows the source before the source is promoted: for a moment both are
        # replicas (every write refused), never both primaries (writes the other side misses).
        target.execute_command("REPLICAOF", sh, str(sp))
        crashpoint("back-after-target-replicaof")
        s = read(source)
    if s.is_replica:
        before = read(source, with_stats=True)
        source.execute_command("REPLICAOF", "NO", "ONE")
        crashpoint("back-after-source-promote")
    else:
        before = None
    how = _await_target(source, target, before, deadline)
    data["resync"] = how
    note = restore(source, mirror)
    return Swap(True, f"roles reversed: the source is the primary, the target replicates it ({how}); {note}",
                moved=True, data=data)


def _await_target(source: redis.Redis, target: redis.Redis, before: ReplStatus | None, until: float) -> str:
    """How the target resumed replicating the source, waiting until ``until`` at most."""
    while True:
        ss, tt = read(source, with_stats=True), read(target)
        if before is not None and (ss.sync_full or 0) > (before.sync_full or 0):
            return ("full sync under way: Valkey loads Redis's RDB; reads stay with the target's data as of the switch "
                    "until it finishes (`migrator status` shows it)")
        if tt.link_up and not tt.sync_in_progress and tt.replica_offset == ss.master_repl_offset:
            if before is None:
                return f"in step at offset {ss.master_repl_offset}"
            ok = (ss.sync_partial_ok or 0) - (before.sync_partial_ok or 0)
            if ok > 0:
                return f"partial resync, source sync_partial_ok +{ok}, in step at offset {ss.master_repl_offset}"
            # (The target reconnected before ``before`` was read, or kept its stream through the
            # source's promotion: no resync of either kind was counted, and none was needed.)
            return (f"in step at offset {ss.master_repl_offset}, link up, no full sync (no resync counted on the "
                    "source since the swap began)")
        if time.monotonic() >= until:
            return (f"link {'up' if tt.link_up else 'not up yet'}, target at {tt.replica_offset} of "
                    f"{ss.master_repl_offset}: it catches up in the background")
        time.sleep(POLL_S)


# --- complete -------------------------------------------------------------------------------------


def detach(pb: Playbook, source: redis.Redis, mirror: MirrorMode | None) -> str:
    """Stop the source replicating the target and put back the settings the swap changed."""
    th, tp = target_address(pb)
    s = read(source)
    if s.replicates(th, tp):
        source.execute_command("REPLICAOF", "NO", "ONE")
        what = f"detached the source (REPLICAOF NO ONE at offset {s.replica_offset}; it keeps its data)"
    elif s.is_replica:
        what = f"the source replicates {s.master_host}:{s.master_port}, not the target: left as it is"
    else:
        what = "the source is not a replica"
    return f"{what}; {restore(source, mirror) if mirror else 'no source setting to restore'}"


# --- what the phase machine runs (thin wrappers in migrator.actions) ------------------------------

SWAP_EVENT = "role-swap"
BEGUN_EVENT = "role-swap-begun"
SWAP_MARGIN = 0.25  # of max_pause, kept free before the hold's deadline (command.SWITCH_MARGIN is 0.2)


def _replicating(ctx: Any) -> bool:
    m = ctx.state.mirror
    return m is not None and m.strategy == "replication"


def _budget(ctx: Any) -> tuple[float, int]:
    """Seconds the swap may take, and the pause to ask for (until the hold's deadline: it expires by itself)."""
    from migrator.state import now, parse_iso

    max_pause = ctx.playbook.steps.write_cutover.max_pause.total_seconds()
    b = ctx.state.barrier
    left = (parse_iso(b.deadline) - now()).total_seconds() if b is not None else max_pause
    return left - SWAP_MARGIN * max_pause, max(1, int(left * 1000))


def run_swap(ctx: Any) -> Any:
    """The role_swap / role_swap_back action: swap the servers' roles while the shims hold writes."""

    name = "role_swap" if ctx.direction == "advance" else "role_swap_back"
    if not _replicating(ctx):
        return ActionResult(name, True, "mirror strategy dual-write: no server roles to change", {})
    pb, mirror = ctx.playbook, ctx.state.mirror
    budget, pause_ms = _budget(ctx)
    if budget <= 0:
        return ActionResult(name, False, "no time left in the hold for the role swap: raise steps.write_cutover.max_pause", {})
    timeout = min(1.0, max(0.05, budget))
    ctx.store.journal(BEGUN_EVENT, direction=ctx.direction)  # a run killed from here on changed the servers' roles
    source, target = client(pb.source, timeout), client(pb.target, timeout)
    try:
        if (down := reachable(source)) is not None:
            return ActionResult(name, False, f"the source {pb.source.display} does not answer ({down}): nothing was changed", {})
        target_down = reachable(target)
        try:
            if ctx.direction == "advance":
                if target_down is not None:
                    return ActionResult(name, False, f"the target {pb.target.display} does not answer ({target_down}): "
                                                     "nothing was changed", {})
                swap = forward(pb, source, target, mirror, lambda: ctx.store.save(ctx.state), budget, pause_ms)
            else:
                swap = backward(pb, source, None if target_down else target, mirror, budget, pause_ms, target_down,
                                accept_source="source_keys" in ctx.overrides)
        except (redis.exceptions.RedisError, OSError) as e:
            return ActionResult(name, False, f"the role swap stopped on a server error ({e}); running the command again "
                                             "reads the servers' roles and finishes or undoes it", {"authority_moved": False})
    finally:
        source.close()
        target.close()
    data = {**swap.data, "authority_moved": swap.moved}
    if swap.ok and ctx.direction == "advance":
        mirror.reverse, mirror.reverse_why = swap.reverse, swap.evidence
    ctx.store.journal(SWAP_EVENT, direction=ctx.direction, ok=swap.ok, reverse=mirror.reverse, evidence=swap.evidence, data=data)
    ctx.store.save(ctx.state)
    return ActionResult(name, swap.ok, swap.evidence, data)


def release(ctx: Any) -> Any:
    """The release_pause action: lift the role swap's CLIENT PAUSE once the new phase is recorded."""

    mirror = ctx.state.mirror
    if ctx.direction == "rollback" and mirror is not None and mirror.reverse is not None:
        # Back in reads-on-target the source is the primary again: no reverse mirroring is in effect.
        mirror.reverse, mirror.reverse_why = None, ""
        ctx.store.save(ctx.state)
    swap = _swap_of_this_step(ctx)
    if swap is None:
        return ActionResult("release_pause", True, "no server was paused by this step (no role swap)", {})
    pb = ctx.playbook
    lifted, down = [], []
    for role, ep in (("source", pb.source), ("target", pb.target)):
        c = client(ep, min(1.0, ep.connect_timeout.total_seconds()))
        try:
            c.execute_command("CLIENT", "UNPAUSE")
            lifted.append(role)
        except (redis.exceptions.RedisError, OSError) as e:
            down.append(f"{role}: {e}")  # a pause expires by itself at the hold's deadline
        finally:
            c.close()
    data: dict[str, Any] = {"unpaused": lifted, "unreachable": down}
    paused_at = (swap.get("data") or {}).get("paused_at")
    if paused_at:
        data["server_pause_ms"] = round((time.time() - float(paused_at)) * 1000, 1)
        ev = f"server writes paused {data['server_pause_ms']:.1f} ms (CLIENT PAUSE WRITE until UNPAUSE)"
    else:  # no pause in this run (already swapped by a killed run, or dual-write): lift any a killed run left
        ev = "no server was paused in this run; CLIENT UNPAUSE sent to both servers"
    if down:
        ev += f"; not reached: {'; '.join(down)} (its pause expires by itself)"
    return ActionResult("release_pause", True, ev, data)


def begun_after(entries: list[dict[str, Any]], start: dict[str, Any]) -> bool:
    """Whether a role swap began after the journal entry ``start`` (a step's ``transition-started``)."""
    seen = False
    for e in entries:
        if e is start or (e.get("event") == start.get("event") and e.get("id") == start.get("id")):
            seen = True
        elif seen and e.get("event") == BEGUN_EVENT:
            return True
    return False


def _swap_of_this_step(ctx: Any) -> dict[str, Any] | None:
    """The role swap journaled by the transition in progress (its start is journaled with its id)."""
    t = ctx.state.transition
    found = None
    started = False
    for e in ctx.store.read_journal():
        if e.get("event") == "transition-started":
            started = t is not None and e.get("id") == t.id
        elif started and e.get("event") == SWAP_EVENT and e.get("ok"):
            found = e
    return found


def run_detach(ctx: Any) -> Any:
    """The detach_source action (complete): the source stops replicating the target."""

    mirror = ctx.state.mirror
    if mirror is None or mirror.strategy != "replication":
        return ActionResult("detach_source", True, "mirror strategy dual-write: the source replicates nothing", {})
    pb = ctx.playbook
    source = client(pb.source, pb.source.connect_timeout.total_seconds())
    try:
        if (down := reachable(source)) is not None:
            todo = ", ".join(f"{k} {v or '(empty)'}" for k, v in mirror.restore.items() if v != KEEP_SECRET)
            return ActionResult("detach_source", True, f"the source does not answer ({down}): before reusing it run "
                                f"REPLICAOF NO ONE on it{' and CONFIG SET ' + todo if todo else ''}", {"detached": False})
        ev = detach(pb, source, mirror)
    finally:
        source.close()
    ctx.store.save(ctx.state)
    ctx.store.journal("source-detached", evidence=ev)
    return ActionResult("detach_source", True, ev, {"detached": True})
