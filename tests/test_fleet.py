"""The ledger at fleet scale: three shim processes (one with ``--workers 2``) on separate state folders
sharing a 3-member etcd cluster, writers that share keys through different shims, and writers straight
to the source, while the whole migration is walked through the CLI in the replication strategy with
rollbacks from reads-on-target and from writes-on-target; for Redis 7.0 → Valkey 9.1 / 8.1 and Redis
6.2 → Valkey 9.1, and once with the write cutover forced into its dual-write fallback.

The ledger (``migrator.shared_ledger``) makes "lost" well defined for shared keys: every
acknowledged write adds a unique element, so after the walk each one must be on the final side,
nothing may be there that nobody sent, and shared counters equal the acknowledged increments.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrator import servers
from migrator.shared_ledger import OPS, SharedWorkload
from tests.conftest import write_playbook
from tests.helpers import run_cli, wait_for

# Writes whose result does not depend on their order (each adds a unique element): what shims that
# dual-write shared keys can mirror without a divergence.
ORDER_FREE = ("set", "hash", "zset")
FLEET_PAIRS = [("redis-7.0", "valkey-9.1"), ("redis-7.0", "valkey-8.1"), ("redis-6.2", "valkey-9.1")]


class ShimFleet:
    """``migrator shim`` processes on their own ports (``workers`` each), stopped with SIGTERM."""

    def __init__(self, pb_paths: list[Path], logs: Path, workers: list[int]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.listens: list[str] = []
        self._logs = []
        for i, (pb_path, n) in enumerate(zip(pb_paths, workers, strict=True)):
            listen = f"127.0.0.1:{servers.free_port()}"
            log = (logs / f"shim{i + 1}.log").open("w")
            self._logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "migrator", "--log-format", "json", "-p", str(pb_path), "shim",
                 "--listen", listen, "--admin", "", "--workers", str(n)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            self.listens.append(listen)
        self.registrations = sum(workers)

    def urls(self) -> dict[str, str]:
        return {f"shim{i + 1}": f"redis://{listen}/0" for i, listen in enumerate(self.listens)}

    def stop(self) -> list[int | None]:
        codes = []
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=20))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        for log in self._logs:
            log.close()
        return codes


def cli(path: Path, *args: str, ok: bool = True) -> tuple[int, dict]:
    """Run one CLI command (JSON output when it takes ``--output``); with ``ok`` it must exit 0."""
    out = run_cli(*args, playbook=path, timeout=180)
    if ok:
        assert out.returncode == 0, f"migrator {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    data = json.loads(out.stdout) if "--output" in args and out.stdout.strip().startswith("{") else {}
    return out.returncode, data


def status(path: Path) -> dict:
    return cli(path, "status", "--output", "json")[1]


def live_shims(path: Path, phase: str | None = None) -> int:
    return sum(1 for s in status(path)["shims"] if s["liveness"] == "live" and (phase is None or s["applied_phase"] == phase))


def dirty_marks(path: Path) -> list[str]:
    """The shims' dirty marks (key, reason, command), read through the playbook's control plane."""
    from migrator import playbook
    from migrator.shim.dirty import list_dirty

    pb = playbook.load(path)
    return [f"{m.key!r} {m.reason} {m.command}" for m in list_dirty(pb.state_path)][:20]


def check_clean(path: Path, where: str) -> dict:
    """``check --full`` clean (no mismatch) and no dirty key: the evidence a cutover rests on."""
    code, report = cli(path, "check", "--full", "--output", "json", ok=False)
    assert code == 0, f"check --full at {where} exited {code}: {json.dumps(report)[:2000]}"
    st = status(path)
    assert st["dirty_keys"] == 0, f"{st['dirty_keys']} dirty key(s) at {where}: {dirty_marks(path)}"
    assert st["mirror"]["divergent"] == 0, f"divergences at {where}: {st['mirror']}"
    return report


def advance(path: Path, to: str) -> dict:
    _code, out = cli(path, "advance", "--yes", "--output", "json")
    assert out["to_phase"] == to, out
    return out


def rollback(path: Path, to: str) -> dict:
    _code, out = cli(path, "rollback", "--yes", "--output", "json")
    assert out["to_phase"] == to, out
    return out


def walk(path: Path, work: SharedWorkload, stop_direct_before_cutover: bool) -> dict:
    """The whole migration with a rollback from reads-on-target and one from writes-on-target."""
    evidence: dict = {}
    advance(path, "compatible")  # the real pre-flight (it decides the strategy under `auto`)
    advance(path, "mirroring")
    cli(path, "sync", "--wait")  # the server's own full sync: follows it, exit 0 once in sync
    check_clean(path, "the read cutover")
    advance(path, "reads-on-target")
    rollback(path, "mirroring")
    check_clean(path, "the read cutover, again")
    advance(path, "reads-on-target")
    check_clean(path, "the write cutover")
    if stop_direct_before_cutover:
        work.stop("direct")
    evidence["cutover"] = advance(path, "writes-on-target")
    evidence["mirror"] = [status(path).get("replication")]
    check_clean(path, "writes-on-target")
    evidence["rollback"] = rollback(path, "reads-on-target")
    evidence["mirror"].append(status(path).get("replication"))
    check_clean(path, "the write cutover, again")
    evidence["cutover2"] = advance(path, "writes-on-target")
    evidence["mirror"].append(status(path).get("replication"))
    # Completing detaches the source: writes straight to it afterwards would be the
    # application's (it must point at the target by then), so every writer stops first.
    work.stop()
    check_clean(path, "completion")
    advance(path, "completed")
    return evidence


def fleet_playbooks(tmp_path: Path, src, tgt, strategy: str, control: dict | None) -> tuple[Path, list[Path]]:
    """The operator's playbook and one per shim host. With a shared control plane (etcd) each host
    has a state folder of its own, as on separate machines; with the local one they share it."""
    sections = {"mirror": {"strategy": strategy}, **({"control": control} if control else {})}
    operator = write_playbook(tmp_path / "migrator.yaml", src.url, tgt.url, **sections)
    if not control:
        return operator, [operator] * 3
    hosts = []
    for i in range(3):
        d = tmp_path / f"host{i + 1}"
        d.mkdir()
        hosts.append(write_playbook(d / "migrator.yaml", src.url, tgt.url, **sections))
    return operator, hosts


def run_fleet(tmp_path: Path, src, tgt, strategy: str, control: dict | None = None, direct: bool = True,
              stop_direct_before_cutover: bool = False, ops: tuple[str, ...] = OPS) -> dict:
    path, hosts = fleet_playbooks(tmp_path, src, tgt, strategy, control)
    fleet = ShimFleet(hosts, tmp_path, workers=[1, 1, 2])
    work = None
    try:
        wait_for(lambda: live_shims(path) >= fleet.registrations, timeout=30, interval=0.3,
                 what=f"{fleet.registrations} shim registrations")
        urls = fleet.urls()
        if direct:
            urls["direct"] = src.url
        # Two writers per shim (the kernel spreads the --workers shim's connections), two straight to
        # the source; every one of them writes the same few keys.
        work = SharedWorkload(urls, per_url=2, keys=4, rate=60.0, seed=7, ops=ops).start()
        time.sleep(0.5)
        evidence = walk(path, work, stop_direct_before_cutover)
        audit = work.audit(tgt.client())
        evidence["audit"], evidence["ledgers"] = audit, work.ledgers
        assert audit.ops > 500, audit.summary()
        assert audit.lost == [], audit.lost[:10]
        assert audit.phantoms == [], audit.phantoms[:10]
        assert audit.problems == [], audit.problems[:10]
        assert audit.ryw_violations == [], audit.ryw_violations[:10]
        assert audit.errors == [], audit.errors[:5]
        # Only a writer that bypasses the shims may be refused (READONLY once the source is a replica).
        refused_via_shims = {led.name: dict(led.refused) for led in work.ledgers
                             if led.refused and not led.name.startswith("direct")}
        assert refused_via_shims == {}, refused_via_shims
    finally:
        if work is not None:
            work.stop()
        codes = fleet.stop()
    assert codes == [0, 0, 0], f"shims exited {codes}; see {tmp_path}/shim*.log"
    return evidence


def test_shared_ledger_audit_finds_a_lost_write_a_phantom_and_a_reordered_list(server_factory):
    """The shared-key audit reports an acknowledged element removed, an element nobody sent, and one writer's list elements out of order."""
    srv = server_factory("redis-7.0")
    work = SharedWorkload({"a": srv.url, "b": srv.url}, per_url=1, keys=1, rate=None, seed=3).start()
    time.sleep(0.5)
    work.stop()
    c = srv.client()
    clean = work.audit(c)
    assert clean.ok and clean.acked > 50 and clean.errors == [], clean.summary()
    led = work.ledgers[0]
    victim = next(u for u in led.acked[work.key("set", 0)])
    c.srem(work.key("set", 0), victim)
    c.sadd(work.key("set", 0), "nobody-1")
    lst = work.key("list", 0)
    mine = [e for e in c.lrange(lst, 0, -1) if e.decode().startswith(led.name + "-")]
    assert len(mine) >= 2
    c.lrem(lst, 1, mine[0])
    c.rpush(lst, mine[0])
    c.incr(work.key("counter", 0), 5)
    audit = work.audit(c)
    assert not audit.ok
    assert [x for x in audit.lost if victim in x], audit.lost
    assert [x for x in audit.phantoms if "nobody-1" in x], audit.phantoms
    assert any("not in the order" in p for p in audit.problems), audit.problems
    assert any("counter" in p and "acknowledged increments" in p for p in audit.problems), audit.problems


@pytest.fixture
def etcd_cluster():
    """A 3-member etcd cluster on loopback, stopped (and its data removed) after the test."""
    from tests.etcd_cluster import ETCD, EtcdCluster

    if ETCD is None:
        pytest.skip("etcd is not installed (Debian etcd-server; CI installs it)")
    cluster = EtcdCluster(3)
    yield cluster
    cluster.stop()


def etcd_control(cluster) -> dict:
    # A short lease: a shim that died would be noticed within 3 s (nothing dies here).
    return {"etcd": {"endpoints": cluster.endpoints, "lease_ttl": "3s"}}


def replicating_pair(server_factory, source_label: str, target_label: str, target_conf: list[str] | None = None):
    # Redis waits repl-diskless-sync-delay (5 s by default) for more replicas before a full sync;
    # the rollback of the write cutover has the target full-sync from the source again.
    fast = {"repl-diskless-sync-delay": "0"}
    return (server_factory(source_label, config=fast),
            server_factory(target_label, config=fast, conf_lines=target_conf))


@pytest.mark.slow
@pytest.mark.parametrize("source_label,target_label", FLEET_PAIRS, ids=lambda x: x)
def test_fleet_replication_on_etcd_loses_no_acknowledged_write(server_factory, etcd_cluster, tmp_path, source_label,
                                                               target_label):
    """Three shims (one --workers 2) on separate state folders sharing etcd, writers sharing keys through them and straight to the source: through the replication strategy's whole walk with two rollbacks, no acknowledged write is lost, check --full is clean and no key dirty at every cutover, and the writer that bypasses the shims is refused (READONLY) once the source replicates the target, never silently dropped."""
    src, tgt = replicating_pair(server_factory, source_label, target_label)
    evidence = run_fleet(tmp_path, src, tgt, "replication", control=etcd_control(etcd_cluster))
    audit = evidence["audit"]
    print(audit.summary())
    for m in evidence["mirror"]:
        print("mirror:", json.dumps(m, default=str)[:600])
    # Every pair here resumes by partial resync after the swap: the rollback window is kept by replication.
    swaps = [evidence["mirror"][0], evidence["mirror"][2]]
    for m in swaps:
        assert m["strategy"] == "replication" and m["reverse"] == "replication", m
        assert "partial resync" in m["reverse_why"] and "READONLY" in m["reverse_why"], m
    assert evidence["mirror"][1]["reverse"] is None and evidence["mirror"][1]["in_sync"], evidence["mirror"][1]
    direct = [led for led in evidence["ledgers"] if led.name.startswith("direct")]
    assert sum(led.refused["READONLY"] for led in direct) > 0, "the writer straight to the source was never refused"
    assert sum(led.ops for led in direct) > 100


@pytest.mark.slow
def test_fleet_dual_write_fallback_says_so_and_loses_nothing(server_factory, etcd_cluster, tmp_path):
    """A target that refuses PSYNC makes the write cutover's role swap fall back to dual-write for the rollback window: the evidence says so, and through the rest of the walk (the rollback keeps mirroring by dual-write) no acknowledged write of three shims sharing keys is lost."""
    src, tgt = replicating_pair(server_factory, "redis-7.0", "valkey-9.1", target_conf=['rename-command PSYNC ""'])
    # In the fallback the source is a primary again, written by the shims alone: a writer that
    # bypasses them would write the source only, so it stops before the cutover (docs/deploy.md).
    # Dual-writing shims do not agree on the order of writes to a shared key: order-free writes only.
    evidence = run_fleet(tmp_path, src, tgt, "replication", control=etcd_control(etcd_cluster),
                         stop_direct_before_cutover=True, ops=ORDER_FREE)
    print(evidence["audit"].summary())
    first = evidence["mirror"][0]
    print("mirror:", json.dumps(first, default=str)[:800])
    assert first["reverse"] == "dual-write", first
    assert "fell back to dual-write" in first["reverse_why"] and "the source still holds its data" in first["reverse_why"]
    assert evidence["mirror"][1]["strategy"] == "dual-write"  # the rollback kept mirroring by dual-write


def test_workers_warn_of_unordered_writes_only_in_dual_write(server_factory, tmp_path):
    """`migrator shim --workers 2` warns that workers do not order each other's writes in dual-write, and not when the playbook uses the replication strategy (the source server orders them)."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    outputs = {}
    for strategy in ("dual-write", "replication"):
        d = tmp_path / strategy
        d.mkdir()
        path = write_playbook(d / "migrator.yaml", src.url, tgt.url, mirror={"strategy": strategy})
        fleet = ShimFleet([path], d, workers=[2])
        try:
            wait_for(lambda p=path: live_shims(p) >= 2, timeout=30, interval=0.3, what="2 workers registered")
        finally:
            assert fleet.stop() == [0]
        outputs[strategy] = (d / "shim1.log").read_text()
    assert "shim.workers_unordered" in outputs["dual-write"]
    assert "shim.workers_unordered" not in outputs["replication"], outputs["replication"][-2000:]
