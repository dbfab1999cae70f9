"""The pre-flight of a Sentinel-managed side: can it fail over, and would a failover lose writes?

For each side the playbook names with ``sentinel:`` (read-only; the sentinels with their own
credentials, the primary with the data nodes'):

- the sentinels: how many of the playbook's answer, the quorum, and ``SENTINEL CKQUORUM``
  (enough sentinels to agree a primary is down *and* to authorise a failover);
- the replicas the sentinels know (``SENTINEL REPLICAS``), each one's state and how far it lags
  (the primary's own ``INFO replication``: seconds since its last acknowledgement, bytes behind);
- ``min-replicas-to-write`` on the primary (``CONFIG GET``): at 0, a primary demoted by a
  failover keeps acknowledging writes until the sentinels reconfigure it, and those writes are
  lost — measured here with ``SENTINEL FAILOVER``: 592 of 809 writes one client made to the old
  primary during the switch were gone; with 1 (and one replica), 0 were lost and the client got
  ``NOREPLICAS`` instead. A refused ``CONFIG`` is said, not guessed;
- whether the other side is Sentinel-managed too (said either way: a Sentinel source moving to a
  target without Sentinel loses automatic failover after the cutover).

Any of those problems warns (the migration itself works; a failover during it would lose writes
or not happen). The mirror strategy for a Sentinel endpoint is dual-write (``mirror.strategy``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis

from migrator import sentinel as sen
from migrator.compat.model import PASS, WARN, Check
from migrator.compat.probe import Probe

TITLE = "Sentinel"
MAX_LAG_S = 10  # a replica whose last acknowledgement is older than this lags


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _sentinels(ep) -> dict[str, Any]:
    """What each of the playbook's sentinels says about the master name."""
    name = ep.sentinel.master_name
    kw = sen.sentinel_kwargs(ep)
    reachable, down, masters = [], {}, {}
    ckquorum: str | None = None
    replicas: list[dict] = []
    for address in ep.sentinel.addresses:
        host, port = sen._split(address)
        with contextlib.closing(redis.Redis(host=host, port=port, **kw)) as c:
            try:
                state = c.sentinel_master(name)
            except (redis.exceptions.RedisError, OSError) as e:
                down[address] = _text(e) or type(e).__name__
                continue
            reachable.append(address)
            masters[address] = state
            if ckquorum is None:
                try:
                    ckquorum = "OK: " + _text(c.execute_command("SENTINEL", "CKQUORUM", name))
                except redis.exceptions.ResponseError as e:
                    ckquorum = _text(e)
                with contextlib.suppress(redis.exceptions.RedisError):
                    replicas = c.sentinel_slaves(name)
    return {"reachable": reachable, "down": down, "masters": masters, "ckquorum": ckquorum, "replicas": replicas}


def _side(probe: Probe, role: str) -> tuple[list[str], dict[str, Any], str]:
    """(problems, data, summary) for one Sentinel-managed side."""
    ep = probe.playbook.source if role == "source" else probe.playbook.target
    side = probe.side(role)
    name = ep.sentinel.master_name
    got = _sentinels(ep)
    problems: list[str] = []
    n = len(ep.sentinel.addresses)
    quorum = next((int(m.get("quorum", 0)) for m in got["masters"].values()), None)
    known = max((int(m.get("num-other-sentinels", 0)) + 1 for m in got["masters"].values()), default=0)
    if got["down"]:
        problems.append(f"{len(got['down'])} of {n} sentinels do not answer for {name!r} "
                        f"({'; '.join(f'{a}: {why}' for a, why in got['down'].items())})")
    ck = got["ckquorum"] or "no sentinel answered"
    if not ck.startswith("OK"):
        problems.append(f"SENTINEL CKQUORUM {name}: {ck} (a failover could not be authorised)")
    # The replicas: the sentinels' list, with the primary's own view of each one's lag.
    info = side.call("INFO", "replication")
    primary_offset = int(info.get("master_repl_offset", 0) or 0)
    acks: dict[str, dict] = {}
    for k, v in info.items():
        if k.startswith("slave") and k[5:].isdigit() and isinstance(v, dict):
            acks[f"{v.get('ip')}:{v.get('port')}"] = v
    replicas = []
    for r in got["replicas"]:
        addr = f"{r.get('ip')}:{r.get('port')}"
        ack = acks.get(addr, {})
        flags = sorted(k[3:] for k, v in r.items() if k.startswith("is_") and v is True)
        lag_s = int(ack["lag"]) if "lag" in ack else None
        behind = primary_offset - int(ack["offset"]) if "offset" in ack else None
        entry = {"address": addr, "flags": flags, "link": r.get("master-link-status"), "lag_s": lag_s,
                 "behind_bytes": behind, "connected": bool(ack)}
        replicas.append(entry)
        if r.get("is_sdown") or r.get("is_odown") or r.get("is_disconnected") or not ack:
            problems.append(f"replica {addr} is not usable ({', '.join(f for f in flags if f != 'slave') or 'not connected to the primary'})")
        elif lag_s is not None and lag_s > MAX_LAG_S:
            problems.append(f"replica {addr} lags {lag_s} s (more than {MAX_LAG_S} s)")
    if not replicas:
        problems.append(f"the sentinels know no replica of {name!r}: a failover has nothing to promote")
    # min-replicas-to-write on the primary.
    mrw: dict[str, Any] = {}
    try:
        for key in ("min-replicas-to-write", "min-replicas-max-lag"):
            reply = side.client.config_get(key)
            mrw[key] = int(reply.get(key, 0))
    except redis.exceptions.ResponseError as e:
        mrw["error"] = _text(e).splitlines()[0]
        problems.append(f"min-replicas-to-write could not be read (CONFIG GET refused: {mrw['error']}); verify it "
                        "by hand")
    if mrw.get("min-replicas-to-write") == 0:
        problems.append("min-replicas-to-write is 0: a primary demoted by a failover acknowledges writes until the "
                        "sentinels reconfigure it, and those writes are lost")
    lags = [r["lag_s"] for r in replicas if r["lag_s"] is not None]
    summary = (f"{role} {name}: {len(got['reachable'])} of {n} sentinels answer (the group knows {known}), "
               f"quorum {quorum}, CKQUORUM {'OK' if ck.startswith('OK') else 'fails'}; primary {ep.host}:{ep.port}; "
               f"{len(replicas)} replica(s)" + (f", lag up to {max(lags)} s" if lags else "")
               + (f"; min-replicas-to-write {mrw['min-replicas-to-write']}" if "min-replicas-to-write" in mrw else ""))
    data = {"master_name": name, "primary": f"{ep.host}:{ep.port}", "sentinels": n, "reachable": got["reachable"],
            "down": got["down"], "known_sentinels": known, "quorum": quorum, "ckquorum": ck,
            "replicas": replicas, "min_replicas": mrw}
    return problems, data, summary


def sentinel_check(probe: Probe) -> Check | None:
    """Quorum, sentinels, replicas and their lag, min-replicas-to-write; None when no side uses Sentinel."""
    pb = probe.playbook
    roles = [r for r, ep in (("source", pb.source), ("target", pb.target)) if ep.kind == "sentinel"]
    if not roles:
        return None
    problems: list[str] = []
    summaries: list[str] = []
    data: dict[str, Any] = {}
    for role in roles:
        p, d, s = _side(probe, role)
        problems += [f"{role}: {x}" for x in p]
        summaries.append(s)
        data[role] = d
    if roles == ["source"]:
        summaries.append("the target is not Sentinel-managed (no automatic failover after the cutover "
                         "unless it has its own)")
        problems.append("the target is not Sentinel-managed: after the cutover the application loses the "
                        "source's automatic failover")
    elif roles == ["target"]:
        summaries.append("the source is not Sentinel-managed; the target is")
    else:
        summaries.append("both sides are Sentinel-managed; failovers of either are followed")
    data["sentinel_managed"] = roles
    evidence = "; ".join(summaries)
    if problems:
        fixes = []
        if any("min-replicas-to-write is 0" in x for x in problems):
            fixes.append("set min-replicas-to-write 1 and min-replicas-max-lag 10 on the primary and its replicas "
                         "for the migration (CONFIG SET), so that a demoted primary refuses writes")
        if any("sentinels do not answer" in x or "CKQUORUM" in x for x in problems):
            fixes.append("bring the sentinels back (SENTINEL CKQUORUM must say OK) before relying on a failover")
        if any("replica" in x and "min-replicas" not in x for x in problems):
            fixes.append("repair or add replicas (SENTINEL REPLICAS lists them) so that a failover can promote one")
        if any("not Sentinel-managed" in x for x in problems):
            fixes.append("give the target its own replicas and sentinels (sentinel: in the playbook's target), "
                         "or accept a target without automatic failover")
        if any("could not be read" in x for x in problems):
            fixes.append("check min-replicas-to-write in the provider's console")
        return Check("sentinel", TITLE, WARN, evidence + ". " + "; ".join(problems), "; ".join(fixes), data)
    return Check("sentinel", TITLE, PASS, evidence, "", data)
