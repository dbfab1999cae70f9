"""``migrator shim --workers N``: N shim processes on one port, one supervisor.

Each worker is a full shim (its own registry record, acknowledgements and counters, so the
gates and ``advance`` see N shims), listening with SO_REUSEPORT so the kernel spreads client
connections. The supervisor forwards SIGTERM/SIGINT, serves the admin endpoint with the
workers' numbers added up (read from the snapshots they write every heartbeat), and exits 0
when every worker drained and exited 0.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import sys
import time

from migrator import registry
from migrator.logs import get_logger
from migrator.playbook import Playbook, split_hostport
from migrator.shim import admin as admin_http
from migrator.shim import metrics
from migrator.errors import UsageError
from migrator.shim.io import bind_errors, new_loop
from migrator.shim.server import run, worker_stats_dir


def _worker_main(playbook: Playbook, listen: str | None, shim_id: str, index: int) -> None:
    # A fork shares the parent's signal dispositions; the worker installs its own handlers.
    try:
        code = run(playbook, listen=listen, admin="", shim_id=shim_id, reuse_port=True, worker=index)
    except UsageError as e:  # its address was taken after the supervisor's check: one line, as the CLI
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    os._exit(code)


def _check_listen(listen: str) -> None:
    """Bind the workers' address once, as they will (SO_REUSEPORT), before forking them: an
    address already taken is one line and exit 2 here, not N workers dying."""
    host, port = split_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with bind_errors(listen, "--listen", "shim.listen"):
        socket.create_server((host, port), family=family, reuse_port=True).close()


def _read_snapshots(playbook: Playbook, ids: list[str]) -> list[dict]:
    out = []
    for shim_id in ids:
        try:
            out.append(json.loads((worker_stats_dir(playbook.state_path) / f"{shim_id}.json").read_text()))
        except (OSError, ValueError):
            continue
    return out


def run_workers(playbook: Playbook, workers: int, *, listen: str | None = None, admin: str | None = None,
                shim_id: str | None = None, ready=None) -> int:
    listen = listen or playbook.shim.listen
    admin = playbook.shim.admin if admin is None else admin
    _host, port = split_hostport(listen)
    base = shim_id or f"{socket.gethostname()}-{port}-{os.getpid()}-{time.time_ns() // 1_000_000}"
    ids = [f"{base}-w{i}" for i in range(workers)]
    _check_listen(listen)
    log = get_logger("migrator.shim", shim=base)
    if workers > 1 and playbook.mirror.strategy != "replication":
        # Each worker sequences only its own connections' writes (docs/shim.md, "Ordering"); in the
        # replication strategy the source server orders them all, so there is nothing to warn of.
        log.warning("shim.workers_unordered", workers=workers,
                    hint="in dual-write, writes to one key from connections on different workers can be applied in "
                         "different orders on source and target; run a single shim process per migration for exact "
                         "ordering, or use mirror.strategy: replication")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker_main, args=(playbook, listen, ids[i], i), name=ids[i]) for i in range(workers)]
    for p in procs:
        p.start()
    log.info("shim.workers_started", workers=workers, listen=listen, admin=admin, pids=[p.pid for p in procs])

    loop = new_loop()
    asyncio.set_event_loop(loop)
    stopping = asyncio.Event()

    def merged() -> metrics.Stats:
        return metrics.Stats.merge(s["snapshot"] for s in _read_snapshots(playbook, ids))

    def extra() -> dict:
        """The workers' phase figures for /metrics: the laggard's applied generation, the newest
        generation any read, a side up only if every worker reaches it, the sum of their queue bounds."""
        statuses = [s["status"] for s in _read_snapshots(playbook, ids)]
        if len(statuses) < workers:  # a worker that has not reported has applied nothing yet
            return {"mirror_queue_limit": playbook.shim.mirror_queue_size * workers,
                    "replication": {"mode": "unknown"}}
        low = min(statuses, key=lambda x: x.get("applied_generation", -1))
        high = max(statuses, key=lambda x: x.get("generation", -1))
        sides = {name: all(x.get("sides", {}).get(name, {}).get("up", True) for x in statuses)
                 for name in ("source", "target")}
        return {"phase": low.get("applied_phase", ""), "generation": low.get("applied_generation", -1),
                "state_phase": high.get("phase", ""), "state_generation": high.get("generation", -1),
                "sides_up": sides, "mirror_queue_limit": playbook.shim.mirror_queue_size * workers,
                "control_up": all(x.get("control", {}).get("reachable", True) for x in statuses),
                "replication": low.get("replication")}  # (the laggard's mode and offsets)

    def status() -> dict:
        snaps = _read_snapshots(playbook, ids)
        st = metrics.Stats.merge(s["snapshot"] for s in snaps)
        records = {r.id: r for r in registry.read_all(playbook.state_path)}
        return {
            "id": base, "workers": workers, "listen": listen, "admin": admin,
            "applied": {i: (records[i].applied_phase, records[i].applied_generation) if i in records else None for i in ids},
            "connections": st.connections, "commands": sum(st.commands.values()), "compared": st.compared,
            "divergences": dict(st.divergences), "dirty_keys": st.dirty_keys, "mirror_queue": st.mirror_queue,
            "backpressure": st.backpressure, "side_restarts": dict(st.side_restarts),
            "topology_changes": dict(st.topology_changes),  # cluster sides: the most any worker noticed
            "replication": {"modes": sorted({s["status"].get("replication", {}).get("mode", "dual-write") for s in snaps}),
                            "skipped": st.lag_skipped, "lag_resolved": st.lag_resolved,
                            "unconfirmed": dict(st.lag_unconfirmed), "pending": st.lag_pending,
                            "read_your_writes_redirects": st.ryw_redirects,
                            "unready_redirects": st.unready_redirects},
            "worker_status": [s["status"] for s in snaps],
        }

    async def main() -> int:
        server = None
        if admin:
            ahost, aport = split_hostport(admin)
            try:
                with bind_errors(admin, "--admin", "shim.admin", "or --admin '' to disable it"):
                    server = await admin_http.start(ahost, aport, {
                        "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8", metrics.render(merged, extra)),
                        "/status": admin_http.json_route(status),
                    })
            except UsageError:
                for p in procs:  # started already: they must not outlive their supervisor
                    p.terminate()
                    p.join(30)
                raise
        if ready is not None:
            ready(listen, admin or None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        while not stopping.is_set() and all(p.is_alive() for p in procs):
            try:
                await asyncio.wait_for(stopping.wait(), timeout=0.5)
            except TimeoutError:
                pass
        if not stopping.is_set():
            log.error("shim.worker_died", exitcodes={p.name: p.exitcode for p in procs if not p.is_alive()})
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(1)
        if server is not None:
            server.close()
        codes = [p.exitcode for p in procs]
        log.info("shim.workers_stopped", exitcodes=codes)
        return 0 if stopping.is_set() and all(c == 0 for c in codes) else 1

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
