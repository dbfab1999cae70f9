"""The shim's numbers: plain counters on the hot path, exported to Prometheus at scrape time.

Incrementing a prometheus-client metric takes a lock per call; at hundreds of thousands of
commands a second that is measurable, so the hot path bumps plain ints and a custom collector
turns them into metric families when ``/metrics`` is read. Several worker processes each keep
their own ``Stats`` and the supervisor adds their snapshots (``Stats.merge``).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from migrator.shim.commands import SIDE_NAMES

# Latency buckets (seconds): a local Redis answers in tens of microseconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        """``n`` commands answered together (a pipelined batch) after ``seconds``."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += n
        self.sum += seconds * n
        self.count += n

    def quantile(self, q: float) -> float | None:
        """An upper bound of the q-quantile from the buckets (None without observations)."""
        if not self.count:
            return None
        target = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")

    def estimate(self, q: float) -> float | None:
        """The q-quantile, linearly interpolated inside its bucket (as Prometheus' ``histogram_quantile``).

        Its resolution is the bucket's width: under 0.1 ms anything from 0 to 0.1 ms, then
        0.1–0.25, 0.25–0.5, 0.5–1, 1–2.5, 2.5–5 ms and so on (``BUCKETS``). A quantile in the
        overflow bucket (over 2.5 s) is ``inf``. None without observations.
        """
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i == len(BUCKETS):
                    return float("inf")
                lo = BUCKETS[i - 1] if i else 0.0
                return lo + (BUCKETS[i] - lo) * max(rank - seen, 0.0) / c
            seen += c
        return float("inf")  # pragma: no cover - the counts add up to ``count``

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum, "count": self.count}

    def add(self, other: dict[str, Any]) -> None:
        for i, c in enumerate(other.get("counts", [])):
            if i < len(self.counts):
                self.counts[i] += c
        self.sum += other.get("sum", 0.0)
        self.count += other.get("count", 0)


class Stats:
    """Everything ``/metrics`` and ``/status`` report for one shim process."""

    def __init__(self) -> None:
        self.started = time.time()
        self.commands: Counter = Counter()  # (class, side name) -> n
        self.latency = [Histogram(), Histogram()]  # per side
        self.divergences: Counter = Counter()  # kind -> n
        self.compared = 0
        self.dirty_marked: Counter = Counter()  # reason -> n
        self.unknown: Counter = Counter()  # (side name, command) -> n
        self.shadow_failures: Counter = Counter()  # (side name, reason) -> n
        self.refused: Counter = Counter()  # reason -> n (unsupported commands, auth, limits)
        self.connections = 0
        self.connections_total = 0
        self.mirror_queue = 0
        self.dirty_keys = 0
        self.script_heals = 0
        self.backpressure = 0  # times a client was no longer read (too much of it in flight)
        self.side_restarts: Counter = Counter()  # side name -> restarts seen (a new run_id)
        # A cluster side (shim.clusterside): slot-map changes noticed, redirects followed, CROSSSLOT refusals.
        self.topology_changes: Counter = Counter()  # side name -> n
        self.cluster_redirects: Counter = Counter()  # (side name, moved|ask|tryagain|clusterdown) -> n
        self.crossslot: Counter = Counter()  # side name -> n
        self.shared_clients = 0  # clients on the shared upstream connections now (multiplexed, or sessions' shares)
        self.pinned: Counter = Counter()  # command (or reason) -> clients it moved to connections of their own
        self.pool_reused = 0  # upstream connections taken from the pool instead of connecting
        # The replication strategy (see shim.lag): compared reads not compared (the replica loading
        # or its link down), mismatches found to be lag, mismatches that could not be confirmed
        # either way (by reason), mismatches waiting for confirmation now; reads of a connection
        # after its own write answered by the primary (read-your-writes).
        self.lag_skipped = 0
        self.lag_resolved = 0
        self.lag_unconfirmed: Counter = Counter()
        self.lag_pending = 0
        self.ryw_redirects = 0
        self.unready_redirects = 0  # reads the replica would have answered, answered by the primary

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "commands": [[c, s, n] for (c, s), n in self.commands.items()],
            "latency": [h.to_json() for h in self.latency],
            "divergences": dict(self.divergences),
            "compared": self.compared,
            "dirty_marked": dict(self.dirty_marked),
            "unknown": [[s, c, n] for (s, c), n in self.unknown.items()],
            "shadow_failures": [[s, r, n] for (s, r), n in self.shadow_failures.items()],
            "refused": dict(self.refused),
            "connections": self.connections,
            "connections_total": self.connections_total,
            "mirror_queue": self.mirror_queue,
            "dirty_keys": self.dirty_keys,
            "script_heals": self.script_heals,
            "backpressure": self.backpressure,
            "side_restarts": dict(self.side_restarts),
            "topology_changes": dict(self.topology_changes),
            "cluster_redirects": [[s, k, n] for (s, k), n in self.cluster_redirects.items()],
            "crossslot": dict(self.crossslot),
            "shared_clients": self.shared_clients,
            "pinned": dict(self.pinned),
            "pool_reused": self.pool_reused,
            "lag_skipped": self.lag_skipped,
            "lag_resolved": self.lag_resolved,
            "lag_unconfirmed": dict(self.lag_unconfirmed),
            "lag_pending": self.lag_pending,
            "ryw_redirects": self.ryw_redirects,
            "unready_redirects": self.unready_redirects,
        }

    @classmethod
    def merge(cls, snapshots: Iterable[dict[str, Any]]) -> Stats:
        """The sum of several processes' snapshots (gauges add up too: they are per process)."""
        out = cls()
        for s in snapshots:
            out.started = min(out.started, s.get("started", out.started))
            for c, side, n in s.get("commands", []):
                out.commands[(c, side)] += n
            for i, h in enumerate(s.get("latency", [])[:2]):
                out.latency[i].add(h)
            out.divergences.update(s.get("divergences", {}))
            out.compared += s.get("compared", 0)
            out.dirty_marked.update(s.get("dirty_marked", {}))
            for side, c, n in s.get("unknown", []):
                out.unknown[(side, c)] += n
            for side, r, n in s.get("shadow_failures", []):
                out.shadow_failures[(side, r)] += n
            out.refused.update(s.get("refused", {}))
            out.side_restarts.update(s.get("side_restarts", {}))
            for side, n in s.get("topology_changes", {}).items():  # each process notices the same change
                out.topology_changes[side] = max(out.topology_changes[side], n)
            out.crossslot.update(s.get("crossslot", {}))
            for side, k, n in s.get("cluster_redirects", []):
                out.cluster_redirects[(side, k)] += n
            out.pinned.update(s.get("pinned", {}))
            out.lag_unconfirmed.update(s.get("lag_unconfirmed", {}))
            for g in ("connections", "connections_total", "mirror_queue", "script_heals", "backpressure",
                      "shared_clients", "pool_reused", "lag_skipped", "lag_resolved", "lag_pending", "ryw_redirects", "unready_redirects"):
                setattr(out, g, getattr(out, g) + s.get(g, 0))
            out.dirty_keys = max(out.dirty_keys, s.get("dirty_keys", 0))  # shared state, not per process
        return out


class StatsCollector:
    """A prometheus-client collector reading ``get_stats()`` at scrape time."""

    def __init__(self, get_stats, get_extra=dict) -> None:
        self.get_stats = get_stats
        self.get_extra = get_extra

    def collect(self):
        st: Stats = self.get_stats()
        extra = self.get_extra()
        c = CounterMetricFamily("migrator_shim_commands", "Commands forwarded, by class and side", labels=["class", "side"])
        for (cls, side), n in sorted(st.commands.items()):
            c.add_metric([cls, side], n)
        yield c
        h = HistogramMetricFamily("migrator_shim_latency_seconds", "Time from sending a command to its reply, per side",
                                  labels=["side"])
        for i, hist in enumerate(st.latency):
            buckets, acc = [], 0
            for bound, n in zip(BUCKETS, hist.counts):
                acc += n
                buckets.append((repr(bound), acc))
            buckets.append(("+Inf", hist.count))
            h.add_metric([SIDE_NAMES[i]], buckets, hist.sum)
        yield h
        d = CounterMetricFamily("migrator_shim_divergences", "Compared replies that differed, by kind", labels=["kind"])
        for kind, n in sorted(st.divergences.items()):
            d.add_metric([kind], n)
        yield d
        yield CounterMetricFamily("migrator_shim_compared", "Replies compared between the two sides", value=st.compared)
        dm = CounterMetricFamily("migrator_shim_dirty_marks", "Writes the shadow side did not apply, by reason", labels=["reason"])
        for reason, n in sorted(st.dirty_marked.items()):
            dm.add_metric([reason], n)
        yield dm
        yield GaugeMetricFamily("migrator_shim_dirty_keys", "Keys currently dirty (awaiting repair)", value=st.dirty_keys)
        u = CounterMetricFamily("migrator_shim_unknown_commands", "Commands a side does not know", labels=["side", "command"])
        for (side, cmd), n in sorted(st.unknown.items()):
            u.add_metric([side, cmd], n)
        yield u
        f = CounterMetricFamily("migrator_shim_shadow_failures", "Shadow-side failures, by side and reason", labels=["side", "reason"])
        for (side, reason), n in sorted(st.shadow_failures.items()):
            f.add_metric([side, reason], n)
        yield f
        r = CounterMetricFamily("migrator_shim_refused", "Commands or clients refused by the shim", labels=["reason"])
        for reason, n in sorted(st.refused.items()):
            r.add_metric([reason], n)
        yield r
        yield GaugeMetricFamily("migrator_shim_mirror_queue_depth", "Commands sent to the shadow side awaiting its reply",
                                value=st.mirror_queue)
        yield GaugeMetricFamily("migrator_shim_connections", "Client connections open", value=st.connections)
        yield CounterMetricFamily("migrator_shim_connections_accepted", "Client connections accepted",
                                  value=st.connections_total)
        yield CounterMetricFamily("migrator_shim_script_heals", "Scripts loaded on the shadow side before an EVALSHA",
                                  value=st.script_heals)
        yield CounterMetricFamily("migrator_shim_backpressure", "Times a client was no longer read: too much of it in flight",
                                  value=st.backpressure)
        sr = CounterMetricFamily("migrator_shim_side_restarts", "Restarts of a side seen (a new run_id) in a two-sided phase",
                                 labels=["side"])
        for side, n in sorted(st.side_restarts.items()):
            sr.add_metric([side], n)
        yield sr
        tc = CounterMetricFamily("migrator_shim_cluster_topology_changes", "Changes of a cluster side's slot map "
                                 "noticed (a reshard or a failover)", labels=["side"])
        for side, n in sorted(st.topology_changes.items()):
            tc.add_metric([side], n)
        yield tc
        cr = CounterMetricFamily("migrator_shim_cluster_redirects", "MOVED/ASK/TRYAGAIN/CLUSTERDOWN replies from a "
                                 "cluster side's nodes followed by the shim", labels=["side", "kind"])
        for (side, kind), n in sorted(st.cluster_redirects.items()):
            cr.add_metric([side, kind], n)
        yield cr
        cx = CounterMetricFamily("migrator_shim_crossslot", "Commands refused with CROSSSLOT by a cluster side "
                                 "(keys in several slots)", labels=["side"])
        for side, n in sorted(st.crossslot.items()):
            cx.add_metric([side], n)
        yield cx
        yield GaugeMetricFamily("migrator_shim_shared_clients", "Clients on the shared upstream connections now "
                                "(multiplexed, or sessions riding on shares)", value=st.shared_clients)
        pn = CounterMetricFamily("migrator_shim_pinned", "Clients moved from the shared upstream connections to "
                                 "connections of their own, by the command (or reason) that needed it", labels=["reason"])
        for reason, n in sorted(st.pinned.items()):
            pn.add_metric([reason], n)
        yield pn
        yield CounterMetricFamily("migrator_shim_pool_reused", "Upstream connections taken from the pool (reset) "
                                  "instead of a new connection", value=st.pool_reused)
        yield CounterMetricFamily("migrator_shim_lag_skipped", "Reads not compared: the replica was loading its "
                                  "initial sync or its link was down (replication strategy)", value=st.lag_skipped)
        yield CounterMetricFamily("migrator_shim_lag_resolved", "Compared reads that differed only because the "
                                  "replica had not caught up (replication strategy)", value=st.lag_resolved)
        lu = CounterMetricFamily("migrator_shim_lag_unconfirmed", "Compared reads that differed and could not be "
                                 "confirmed either way within shim.replica_lag_timeout, by reason", labels=["reason"])
        for reason, n in sorted(st.lag_unconfirmed.items()):
            lu.add_metric([reason], n)
        yield lu
        yield GaugeMetricFamily("migrator_shim_lag_pending", "Differing reads waiting to be confirmed against the "
                                "replication offsets", value=st.lag_pending)
        yield CounterMetricFamily("migrator_shim_read_your_writes_redirects", "Reads answered by the primary instead "
                                  "of the replica: the connection's own write was not on the replica yet",
                                  value=st.ryw_redirects)
        yield CounterMetricFamily("migrator_shim_replica_unready_redirects", "Reads answered by the primary instead "
                                  "of the replica: the replica was not known to be in step (restarted, not a replica, "
                                  "loading, link down)", value=st.unready_redirects)
        repl = extra.get("replication")
        if repl:
            mode = GaugeMetricFamily("migrator_shim_mirror_mode", "1 for the routing mode the shim applies",
                                     labels=["mode"])
            mode.add_metric([repl["mode"]], 1)
            yield mode
            for name, key, doc in (("migrator_shim_replication_primary_offset", "primary_offset",
                                    "The primary's replication offset, as last read (NaN: no replica tracked)"),
                                   ("migrator_shim_replication_replica_offset", "replica_offset",
                                    "The replica's replication offset, as last read (NaN: no replica tracked)"),
                                   ("migrator_shim_replication_lag_bytes", "lag_bytes",
                                    "How far the replica is behind the primary, in bytes of its stream (NaN: "
                                    "no replica tracked)")):
                value = repl.get(key)
                yield GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)
            yield GaugeMetricFamily("migrator_shim_replica_ready", "1 if the replica is compared against (link up, "
                                    "not loading, replicating this primary)", value=1 if repl.get("replica_ready") else 0)
        g = GaugeMetricFamily("migrator_shim_applied_generation", "Phase generation the shim applies", labels=["phase"])
        if "phase" in extra:
            g.add_metric([extra["phase"]], extra.get("generation", 0))
        yield g
        sg = GaugeMetricFamily("migrator_shim_state_generation",
                               "Newest phase generation the shim has read from the state file", labels=["phase"])
        if "state_phase" in extra:
            sg.add_metric([extra["state_phase"]], extra.get("state_generation", 0))
        yield sg
        up = GaugeMetricFamily("migrator_shim_side_up", "1 if the shim reaches the side, 0 if its connections or "
                               "its probe fail", labels=["side"])
        for side, ok in sorted(extra.get("sides_up", {}).items()):
            up.add_metric([side], 1 if ok else 0)
        yield up
        cu = GaugeMetricFamily("migrator_shim_control_up", "1 if the shim reaches the control plane (state folder "
                               "or etcd), 0 while it keeps routing its last applied phase without it", labels=[])
        if "control_up" in extra:
            cu.add_metric([], 1 if extra["control_up"] else 0)
        yield cu
        if "mirror_queue_limit" in extra:
            yield GaugeMetricFamily("migrator_shim_mirror_queue_limit", "Bound of the mirror queue "
                                    "(shim.mirror_queue_size): at it, clients that mirror are no longer read",
                                    value=extra["mirror_queue_limit"])


def render(get_stats, get_extra=dict) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(get_stats, get_extra))
    return generate_latest(registry)
