"""A real etcd cluster on free loopback ports for the tests (Debian's ``etcd-server``).

``EtcdCluster(size)`` starts ``size`` members with their own data folders (on ``/dev/shm`` when
it exists: etcd fsyncs every write), short heartbeats and elections so a killed leader is
replaced in well under a second, and stops them all (``stop``); ``kill(i)`` is kill -9 of one
member, ``restart(i)`` starts it again on its data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from migrator import servers

ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")


class EtcdCluster:
    def __init__(self, size: int = 3) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = Path(tempfile.mkdtemp(prefix="migrator-etcd-", dir=base))
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [servers.free_port() for _ in range(size)]
        self.peer_ports = [servers.free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen | None] = [None] * size
        self.initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        self.token = self.root.name
        self.auth: tuple[str, str] | None = None  # root credentials once auth is enabled
        for i in range(size):
            self._start(i)
        self.wait_healthy()

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    def _start(self, i: int) -> None:
        name = self.names[i]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the member's whole life
        cmd = [ETCD, "--name", name, "--data-dir", str(self.root / name),
               "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
               "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
               "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
               "--initial-cluster", self.initial, "--initial-cluster-state", "new",
               "--initial-cluster-token", self.token,
               "--heartbeat-interval", "50", "--election-timeout", "500",
               "--logger", "zap", "--log-level", "warn"]
        self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.close()

    def healthy(self, i: int) -> bool:
        with contextlib.suppress(requests.RequestException, ValueError):
            r = requests.get(f"{self.endpoints[i]}/health", timeout=1)
            return r.status_code == 200 and r.json().get("health") == "true"
        return False

    def wait_healthy(self, timeout: float = 20.0, members: list[int] | None = None) -> None:
        members = [i for i in range(len(self.names)) if self.procs[i] is not None] if members is None else members
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i in members):
            for i in members:
                p = self.procs[i]
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"etcd {self.names[i]} exited: {(self.root / f'{self.names[i]}.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster not healthy after {timeout}s")
            time.sleep(0.1)

    def kill(self, i: int) -> None:
        """kill -9 one member."""
        p = self.procs[i]
        if p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            self.procs[i] = None

    def kill_all(self) -> None:
        for i in range(len(self.names)):
            self.kill(i)

    def restart(self, i: int) -> None:
        self._start(i)

    def restart_all(self) -> None:
        for i in range(len(self.names)):
            if self.procs[i] is None:
                self._start(i)
        self.wait_healthy()

    def etcdctl(self, *args: str, auth: bool = True) -> str:
        cmd = [ETCDCTL, "--endpoints", ",".join(self.endpoints)]
        if auth and self.auth:
            cmd += ["--user", f"{self.auth[0]}:{self.auth[1]}"]
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, env=env, timeout=30).stdout

    def enable_auth(self, user: str, password: str, prefix: str) -> None:
        """Turn on authentication: ``user`` may read and write under ``prefix`` only."""
        root_pw = "root-" + self.token
        self.etcdctl("user", "add", f"root:{root_pw}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("user", "add", f"{user}:{password}")
        self.etcdctl("role", "add", "migrator")
        self.etcdctl("role", "grant-permission", "migrator", "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", user, "migrator")
        self.etcdctl("auth", "enable")
        self.auth = ("root", root_pw)

    def dump(self) -> list[tuple[str, str]]:
        """Every key and value in the cluster (as root when auth is on)."""
        out = self.etcdctl("get", "", "--prefix", "-w", "json")
        import base64
        import json

        kvs = json.loads(out).get("kvs") or []
        return [(base64.b64decode(kv["key"]).decode(errors="replace"), base64.b64decode(kv.get("value", "")).decode(errors="replace"))
                for kv in kvs]

    def logs(self) -> str:
        return "\n".join((self.root / f"{n}.log").read_text(errors="replace") for n in self.names
                         if (self.root / f"{n}.log").exists())

    def stop(self) -> None:
        self.kill_all()
        shutil.rmtree(self.root, ignore_errors=True)
