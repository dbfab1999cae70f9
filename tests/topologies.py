"""Real local topologies for tests: a Sentinel-managed primary and a Redis/Valkey Cluster.

Built from the same binaries as every other test server (``migrator.servers``), on free
loopback ports, in temporary folders; ``stop()`` stops every process it started. Used as
context managers or through the ``sentinel_factory`` / ``cluster_factory`` fixtures.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from migrator import servers

SLOTS = 16384


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (redis.exceptions.RedisError, OSError) as e:  # a node still starting or failing over
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout}s" + (f" (last error: {last})" if last else ""))


# --------------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------------
@dataclass
class SentinelGroup:
    """A primary, its replicas and N sentinels watching it under ``master_name``."""

    label: str
    master_name: str
    data: list[servers.RunningServer]  # data nodes: [0] was the first primary
    sentinels: list[servers.RunningServer]
    password: str | None = None
    sentinel_password: str | None = None

    @property
    def addresses(self) -> list[str]:
        """The sentinels' ``host:port`` addresses, for the playbook's ``sentinel.addresses``."""
        return [f"{s.host}:{s.port}" for s in self.sentinels]

    def endpoint(self, *, db: int = 0, password_env: str | None = None,
                 sentinel_password_env: str | None = None) -> dict:
        """The playbook's endpoint mapping for this group (passwords only by environment variable:
        set them in the environment of whatever loads the playbook)."""
        sen: dict = {"addresses": self.addresses, "master_name": self.master_name}
        if password_env:
            sen["password_env"] = password_env
        if sentinel_password_env:
            sen["sentinel_password_env"] = sentinel_password_env
        return {"sentinel": sen, "db": db}

    def sentinel_client(self, i: int = 0) -> redis.Redis:
        s = self.sentinels[i]
        return redis.Redis(host=s.host, port=s.port, password=self.sentinel_password, decode_responses=True,
                           socket_timeout=5, socket_connect_timeout=2)

    def primary_address(self) -> tuple[str, int]:
        """Where the sentinels say the primary is now."""
        with contextlib.closing(self.sentinel_client()) as c:
            host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return host, int(port)

    def node(self, address: tuple[str, int]) -> servers.RunningServer:
        return next(s for s in self.data if (s.host, s.port) == (address[0], int(address[1])))

    def primary(self) -> servers.RunningServer:
        return self.node(self.primary_address())

    def replicas(self) -> list[servers.RunningServer]:
        p = self.primary_address()
        return [s for s in self.data if (s.host, s.port) != p]

    def client(self, **kw) -> redis.Redis:
        """A client of the current primary (resolved now; it does not follow a later failover)."""
        host, port = self.primary_address()
        return redis.Redis(host=host, port=port, password=self.password, **kw)

    def failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """``SENTINEL FAILOVER`` and wait until every sentinel names a new primary that accepts writes."""
        before = self.primary_address()
        with contextlib.closing(self.sentinel_client()) as c:
            _wait(lambda: c.execute_command("SENTINEL", "FAILOVER", self.master_name), 10,
                  "SENTINEL FAILOVER accepted")  # refused with NOGOODSLAVE until a replica is known

        def switched():
            addrs = set()
            for i in range(len(self.sentinels)):
                with contextlib.closing(self.sentinel_client(i)) as c:
                    host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
                addrs.add((host, int(port)))
            if len(addrs) != 1 or before in addrs:
                return None
            new = addrs.pop()
            node = self.node(new)
            with contextlib.closing(node.client(socket_timeout=2)) as nc:
                role = nc.execute_command("ROLE")[0]
            return new if role in (b"master", "master") else None

        return _wait(switched, timeout, f"failover of {self.master_name} away from {before}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every sentinel knows the primary, its replicas and the other sentinels."""
        want_replicas = len(self.data) - 1
        want_sentinels = len(self.sentinels) - 1

        def ready():
            for i in range(len(self.sentinels)):
                with contextlib.closing(self.sentinel_client(i)) as c:
                    info = c.sentinel_master(self.master_name)  # parsed: numbers are ints, flags a set
                    if int(info["num-slaves"]) < want_replicas or int(info["num-other-sentinels"]) < want_sentinels:
                        return False
                    if info.get("is_sdown") or info.get("is_odown"):
                        return False
            p = self.primary()
            with contextlib.closing(p.client(socket_timeout=2)) as pc:
                info = pc.info("replication")
            return info.get("connected_slaves", 0) >= want_replicas and all(
                info.get(f"slave{i}", {}).get("state") == "online" for i in range(want_replicas))

        _wait(ready, timeout, f"sentinel group {self.master_name} ready", interval=0.1)

    def stop(self) -> None:
        for s in [*self.sentinels, *self.data]:
            with contextlib.suppress(Exception):
                s.stop()

    def __enter__(self) -> "SentinelGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_sentinel_group(label: str, *, master_name: str = "mymaster", replicas: int = 1, sentinels: int = 3,
                         quorum: int = 2, password: str | None = None, sentinel_password: str | None = None,
                         down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                         config: dict[str, str] | None = None) -> SentinelGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels from the ``label`` binary.

    ``password`` protects the data nodes (requirepass and masterauth; sentinels use it as
    ``auth-pass``); ``sentinel_password`` protects the sentinels themselves.
    """
    binary = servers.find(label)
    if binary is None:
        raise FileNotFoundError(f"no server binary for {label!r}")
    data: list[servers.RunningServer] = []
    sents: list[servers.RunningServer] = []
    group = SentinelGroup(label, master_name, data, sents, password, sentinel_password)
    try:
        base = {"repl-diskless-sync-delay": "0", **(config or {})}
        if password:
            base["masterauth"] = password
        primary = servers.start(binary, password=password, config=base)
        data.append(primary)
        for _ in range(replicas):
            r = servers.start(binary, password=password,
                              config={**base, "replicaof": f"{primary.host} {primary.port}"})
            data.append(r)
        for _ in range(sentinels):
            d = Path(tempfile.mkdtemp(prefix=f"migrator-sentinel-{label}-"))
            lines = [
                f"sentinel monitor {master_name} {primary.host} {primary.port} {quorum}",
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master_name} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {master_name} {password}")
            if sentinel_password:
                lines.append(f"requirepass {sentinel_password}")
            conf = d / "sentinel.conf"  # sentinel rewrites its config file: it must be its own
            conf.write_text("\n".join(lines) + "\n")
            sents.append(_start_sentinel(binary, d, conf, sentinel_password))
        group.wait_ready()
        return group
    except BaseException:
        group.stop()
        raise


def _start_sentinel(binary: servers.ServerBinary, d: Path, conf: Path, password: str | None) -> servers.RunningServer:
    import subprocess

    last: Exception | None = None
    for _ in range(5):
        port = servers.free_port()
        args = [str(binary.path), str(conf), "--sentinel", "--port", str(port), "--bind", "127.0.0.1",
                "--dir", str(d), "--logfile", str(d / "server.log"), "--daemonize", "no", "--protected-mode", "no"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        s = servers.RunningServer(binary=binary, port=port, dir=d, proc=proc, password=password, _owns_dir=False)
        try:
            _wait(lambda: s.client(socket_timeout=1, socket_connect_timeout=0.5).ping(), 15, "sentinel PING")
            s._owns_dir = True
            return s
        except Exception as e:  # noqa: BLE001 - a port taken between probe and bind: retry
            last = e
            s.stop()
    raise RuntimeError(f"sentinel did not start: {last}")


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------
@dataclass
class LocalCluster:
    """Cluster-enabled nodes with all 16384 slots assigned: ``primaries`` shards, each with replicas."""

    label: str
    nodes: list[servers.RunningServer] = field(default_factory=list)
    password: str | None = None

    @property
    def seeds(self) -> list[str]:
        return [f"{n.host}:{n.port}" for n in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one node: enough for migrator to discover the rest."""
        n = self.nodes[0]
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{n.host}:{n.port}/0"

    def endpoint(self) -> dict:
        """The playbook's endpoint mapping: one node's URL and two more seeds."""
        return {"url": self.url, "seeds": self.seeds[1:3]}

    def node_client(self, node: servers.RunningServer, **kw) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, password=self.password, **kw)

    def cluster_client(self, **kw) -> redis.RedisCluster:
        n = self.nodes[0]
        return redis.RedisCluster(host=n.host, port=n.port, password=self.password, **kw)

    def node_by_address(self, host: str, port: int) -> servers.RunningServer:
        return next(n for n in self.nodes if (n.host, n.port) == (host, int(port)))

    def shards(self) -> list[dict]:
        """``[{"primary": node, "replicas": [node...], "slots": [(lo, hi), ...]}]`` as the cluster says now."""
        alive = next(n for n in self.nodes if n.alive())
        with contextlib.closing(self.node_client(alive, decode_responses=True)) as c:
            raw = c.execute_command("CLUSTER", "NODES")
        text = raw if isinstance(raw, str) else raw.decode() if isinstance(raw, bytes) else "\n".join(raw)
        by_id: dict[str, dict] = {}
        for line in text.strip().splitlines():
            parts = line.split()
            nid, addr, flags, master = parts[0], parts[1], parts[2].split(","), parts[3]
            host, rest = addr.rsplit(":", 1)
            port = int(rest.split("@")[0])
            slots = []
            for s in parts[8:]:
                if s.startswith("["):
                    continue
                lo, _, hi = s.partition("-")
                slots.append((int(lo), int(hi or lo)))
            by_id[nid] = {"id": nid, "host": host or "127.0.0.1", "port": port, "flags": flags, "master": master,
                          "slots": slots}
        out = []
        for nid, n in by_id.items():
            if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]:
                out.append({
                    "id": nid,
                    "primary": self.node_by_address(n["host"], n["port"]),
                    "replicas": [self.node_by_address(r["host"], r["port"]) for r in by_id.values()
                                 if r["master"] == nid and "fail" not in r["flags"]],
                    "slots": sorted(n["slots"]),
                })
        return sorted(out, key=lambda s: s["slots"][0])

    def primaries(self) -> list[servers.RunningServer]:
        return [s["primary"] for s in self.shards()]

    def owner(self, slot: int) -> servers.RunningServer:
        for s in self.shards():
            if any(lo <= slot <= hi for lo, hi in s["slots"]):
                return s["primary"]
        raise KeyError(slot)

    def node_id(self, node: servers.RunningServer) -> str:
        with contextlib.closing(self.node_client(node, decode_responses=True)) as c:
            return c.execute_command("CLUSTER", "MYID")

    def migrate_slot(self, slot: int, dest: servers.RunningServer, *, batch: int = 100) -> None:
        """Move one slot and its keys to ``dest`` the way ``redis-cli --cluster reshard`` does."""
        src = self.owner(slot)
        if src is dest:
            return
        src_id, dest_id = self.node_id(src), self.node_id(dest)
        with contextlib.closing(self.node_client(src)) as sc, contextlib.closing(self.node_client(dest)) as dc:
            dc.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            sc.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dest_id)
            while True:
                keys = sc.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                args = ["MIGRATE", dest.host, dest.port, "", 0, 5000]
                if self.password:
                    args += ["AUTH", self.password]
                sc.execute_command(*args, "KEYS", *keys)
            for n in self.primaries():
                with contextlib.closing(self.node_client(n)) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dest_id)

    def failover(self, primary: servers.RunningServer, timeout: float = 30.0) -> servers.RunningServer:
        """``CLUSTER FAILOVER`` on a replica of ``primary``; returns the node that is primary now."""
        shard = next(s for s in self.shards() if s["primary"] is primary)
        replica = shard["replicas"][0]
        with contextlib.closing(self.node_client(replica)) as c:
            c.execute_command("CLUSTER", "FAILOVER")

        def promoted():
            with contextlib.closing(self.node_client(replica, decode_responses=True)) as c:
                if c.execute_command("ROLE")[0] != "master":
                    return False
            return all(self._agrees(n) for n in self.nodes if n.alive())

        _wait(promoted, timeout, f"failover of {primary.port} to {replica.port}")
        return replica

    def _agrees(self, node: servers.RunningServer) -> bool:
        with contextlib.closing(self.node_client(node, decode_responses=True)) as c:
            info = c.execute_command("CLUSTER", "INFO")
            text = info if isinstance(info, str) else info.decode()
        return "cluster_state:ok" in text

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every node says cluster_state:ok and agrees on the slot owners."""
        def ok():
            if not all(self._agrees(n) for n in self.nodes if n.alive()):
                return False
            views = set()
            for n in self.nodes:
                if not n.alive():
                    continue
                with contextlib.closing(self.node_client(n)) as c:
                    views.add(tuple(sorted((int(r[0]), int(r[1]), r[2][1]) for r in c.execute_command("CLUSTER", "SLOTS"))))
            return len(views) == 1
        _wait(ok, timeout, f"{self.label} cluster ok", interval=0.1)

    def stop(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def slot_ranges(shards: int) -> list[tuple[int, int]]:
    """16384 slots split into ``shards`` contiguous ranges, as ``redis-cli --cluster create`` does."""
    per = SLOTS / shards
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(shards)]


def start_cluster(label: str, *, primaries: int = 3, replicas: int = 1, password: str | None = None,
                  config: dict[str, str] | None = None, timeout: float = 60.0) -> LocalCluster:
    """A cluster of ``primaries`` shards with ``replicas`` replicas each, every slot assigned."""
    binary = servers.find(label)
    if binary is None:
        raise FileNotFoundError(f"no server binary for {label!r}")
    cl = LocalCluster(label, password=password)
    try:
        base = {"cluster-enabled": "yes", "cluster-node-timeout": "2000", "repl-diskless-sync-delay": "0",
                "cluster-require-full-coverage": "yes", **(config or {})}
        if password:
            base["masterauth"] = password
        for _ in range(primaries * (1 + replicas)):
            n = servers.start(binary, password=password,
                              config={**base, "cluster-config-file": "nodes.conf"})
            cl.nodes.append(n)
        first = cl.nodes[0]
        for n in cl.nodes[1:]:
            with contextlib.closing(cl.node_client(n)) as c:
                c.execute_command("CLUSTER", "MEET", first.host, first.port)
        prim = cl.nodes[:primaries]
        for node, (lo, hi) in zip(prim, slot_ranges(primaries)):
            with contextlib.closing(cl.node_client(node)) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)

        def everyone_known():
            for n in cl.nodes:
                with contextlib.closing(cl.node_client(n, decode_responses=True)) as c:
                    txt = c.execute_command("CLUSTER", "NODES")
                    txt = txt if isinstance(txt, str) else txt.decode()
                    if len(txt.strip().splitlines()) < len(cl.nodes) or "handshake" in txt:
                        return False
            return True

        _wait(everyone_known, timeout, "cluster nodes meet", interval=0.1)
        prim_ids = [cl.node_id(p) for p in prim]
        for i in range(replicas):
            for j, pid in enumerate(prim_ids):
                r = cl.nodes[primaries + i * primaries + j]
                _wait(lambda r=r, pid=pid: cl.node_client(r).execute_command("CLUSTER", "REPLICATE", pid), 20,
                      "CLUSTER REPLICATE")
        cl.wait_ok(timeout)

        def replicas_online():
            for p in prim:
                with contextlib.closing(cl.node_client(p)) as c:
                    info = c.info("replication")
                if info.get("connected_slaves", 0) < replicas or any(
                        info.get(f"slave{i}", {}).get("state") != "online" for i in range(replicas)):
                    return False
            return True

        _wait(replicas_online, timeout, "cluster replicas online", interval=0.1)

        def every_view_has_the_replicas():  # gossip spreads the roles a moment after REPLICATE
            for n in cl.nodes:
                with contextlib.closing(cl.node_client(n, decode_responses=True)) as c:
                    txt = c.execute_command("CLUSTER", "NODES")
                    txt = txt if isinstance(txt, str) else txt.decode()
                if sum(" slave " in f" {ln.split()[2].replace(',', ' ')} " for ln in txt.strip().splitlines()) \
                        < primaries * replicas:
                    return False
            return True

        _wait(every_view_has_the_replicas, timeout, "every node knows the replicas", interval=0.1)
        return cl
    except BaseException:
        cl.stop()
        raise
