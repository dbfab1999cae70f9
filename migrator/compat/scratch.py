"""Scratch servers for the user's tests: a throwaway Valkey that ``test_command`` may write to.

Modes (``steps.compatibility.scratch``):

- ``local``: a valkey-server binary found by ``migrator.servers``, the one matching the
  target's major.minor version if there is one; stopped and its directory removed afterwards.
- ``docker``: the ``valkey/valkey:<target version>`` image through the Docker SDK; the
  container is removed afterwards.
- ``target``: the real target, only while it holds no key; FLUSHALL afterwards.
- unset: as ``target`` when the target is empty; refused otherwise, because the tests would
  write into a target that already holds data.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import redis

from migrator import servers
from migrator.compat.identify import Identity
from migrator.compat.rpc import Side
from migrator.compat.sample import keyspace_counts
from migrator.errors import MigratorError

DOCKER_START_TIMEOUT = 60.0


class ScratchError(MigratorError):
    """No scratch server could be provided (the check fails with this message)."""


@dataclass
class Scratch:
    mode: str
    url: str  # may carry the target's password: handed to the test command, never written unredacted
    display: str
    version: str  # "valkey 9.1.2"
    client: redis.Redis
    note: str = ""


def pick_binary(target: Identity) -> tuple[servers.ServerBinary, str]:
    """The local binary for the target: same kind and major.minor if possible, else the closest."""
    of_kind = [b for b in servers.discover() if b.kind == target.kind]
    if not of_kind:
        raise ScratchError(f"scratch: local: no {target.kind}-server binary found here; install {target.kind} "
                           f"{target.major_minor} or use scratch: docker")
    exact = [b for b in of_kind if b.major_minor == target.major_minor]
    if exact:
        return exact[-1], ""
    want = target.version_tuple[:2]
    best = min(of_kind, key=lambda b: (abs(_mm(b)[0] - want[0]) * 100 + abs(_mm(b)[1] - want[1]), -_mm(b)[1]))
    return best, f"no local {target.kind} {target.major_minor} binary: using {best.kind} {best.version} instead"


def _mm(b: servers.ServerBinary) -> tuple[int, int]:
    major, minor = b.major_minor.split(".")
    return int(major), int(minor)


@contextlib.contextmanager
def local(target: Identity) -> Iterator[Scratch]:
    binary, note = pick_binary(target)
    try:
        server = servers.start(binary)
    except (RuntimeError, OSError) as e:
        raise ScratchError(f"scratch: local: {binary.label} did not start: {str(e).splitlines()[0]}") from None
    try:
        yield Scratch("local", server.url, server.url, f"{binary.kind} {binary.version}", server.client(), note)
    finally:
        server.stop()


@contextlib.contextmanager
def docker(target: Identity) -> Iterator[Scratch]:
    try:
        import docker as docker_sdk  # imported here: only this mode needs it
    except ImportError:
        raise ScratchError("scratch: docker: the docker Python package is not installed (pip install docker)") from None

    try:
        engine = docker_sdk.from_env(timeout=10)
        engine.ping()
    except docker_sdk.errors.DockerException as e:
        raise ScratchError(f"scratch: docker: no Docker engine is reachable ({str(e).splitlines()[0]}); "
                           "start Docker, set DOCKER_HOST, or use scratch: local") from None
    image = f"{target.kind}/{target.kind}:{target.version}" if target.kind == "valkey" else f"redis:{target.version}"
    try:
        container = engine.containers.run(image, ["--save", "", "--appendonly", "no"], detach=True,
                                          ports={"6379/tcp": ("127.0.0.1", None)}, labels={"migrator": "scratch"})
    except docker_sdk.errors.DockerException as e:
        raise ScratchError(f"scratch: docker: cannot run {image}: {str(e).splitlines()[0]}") from None
    try:
        client, url = _wait_for_container(container)
        yield Scratch("docker", url, url, f"{target.kind} {target.version} ({image})", client)
    finally:
        with contextlib.suppress(docker_sdk.errors.DockerException):
            container.remove(force=True)


def _wait_for_container(container) -> tuple[redis.Redis, str]:
    deadline = time.monotonic() + DOCKER_START_TIMEOUT
    while time.monotonic() < deadline:
        container.reload()
        ports = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("6379/tcp")
        if ports:
            port = int(ports[0]["HostPort"])
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    return client, f"redis://127.0.0.1:{port}/0"
        if container.status == "exited":
            raise ScratchError(f"scratch: docker: the container exited: {container.logs(tail=5).decode(errors='replace')}")
        time.sleep(0.2)
    raise ScratchError(f"scratch: docker: the server did not answer within {DOCKER_START_TIMEOUT:.0f}s")


def target_keys(target: Side) -> int:
    """Keys on the target outside migrator's own prefix (read fresh: the tests must start on an empty target)."""
    total = 0
    for db, stats in keyspace_counts(target).items():
        n = int(stats.get("keys", 0))
        if n:
            ours = sum(1 for _ in target.on_db(db).scan_iter(match="__migrator:*", count=1000)) if n <= 10000 else 0
            total += n - ours
    return total


@contextlib.contextmanager
def on_target(target: Side, identity: Identity, mode: str) -> Iterator[Scratch]:
    held = target_keys(target)
    if held:
        raise ScratchError(
            f"scratch: {mode}: refused: the target holds {held} key(s) and the tests would write into it; "
            "use scratch: local or scratch: docker, or empty the target"
        )
    try:
        yield Scratch(mode, target.endpoint.url, target.endpoint.display, identity.label, target.client,
                      "ran against the real target, which was emptied (FLUSHALL) afterwards")
    finally:
        target.client.flushall()


def provide(mode: str | None, target: Side, identity: Identity) -> contextlib.AbstractContextManager[Scratch]:
    if mode == "local":
        return local(identity)
    if mode == "docker":
        return docker(identity)
    return on_target(target, identity, mode or "unset (the empty target)")
