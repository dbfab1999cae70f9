"""Fixtures that start real Redis and Valkey servers on free loopback ports and stop them.

- ``server_factory(label, **kw)``: start a server (``redis-7.0``, ``valkey-9.1``, ...); every
  server it started is stopped when the test ends.
- ``pair``: a (source, target) pair of running servers, parametrized across
  ``migrator.servers.PAIRS`` (those whose binaries exist here); the test id names the pair.
- ``make_playbook(source, target, **sections)``: writes a playbook for two servers into the
  test's temp dir and returns its path.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from migrator import servers

# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored across exec: every CLI the tests start would then ignore the Ctrl-C that
# the terminal tests send it. Ctrl-C reaches a CLI at a real terminal, so the tests' children
# get the default (a handler set here becomes the default in an exec'd child).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config):
    return "servers: " + ", ".join(f"{b.label} ({b.version}, {b.path})" for b in servers.discover())


@pytest.fixture
def server_factory():
    started: list[servers.RunningServer] = []

    def start(label: str, **kw) -> servers.RunningServer:
        if servers.find(label) is None:
            pytest.skip(f"no {label} binary here")
        s = servers.start(label, **kw)
        started.append(s)
        return s

    yield start
    for s in reversed(started):
        s.stop()


@pytest.fixture
def sentinel_factory():
    """Start Sentinel groups (tests/topologies.py); every process is stopped afterwards."""
    from tests import topologies

    started: list[topologies.SentinelGroup] = []

    def start(label: str, **kw) -> topologies.SentinelGroup:
        if servers.find(label) is None:
            pytest.skip(f"no {label} binary here")
        g = topologies.start_sentinel_group(label, **kw)
        started.append(g)
        return g

    yield start
    for g in reversed(started):
        g.stop()


@pytest.fixture
def cluster_factory():
    """Start local clusters (tests/topologies.py); every node is stopped afterwards."""
    from tests import topologies

    started: list[topologies.LocalCluster] = []

    def start(label: str, **kw) -> topologies.LocalCluster:
        if servers.find(label) is None:
            pytest.skip(f"no {label} binary here")
        c = topologies.start_cluster(label, **kw)
        started.append(c)
        return c

    yield start
    for c in reversed(started):
        c.stop()


def _pair_ids(p):
    return f"{p[0]}->{p[1]}"


@pytest.fixture(params=servers.PAIRS, ids=_pair_ids)
def pair(request, server_factory):
    source_label, target_label = request.param
    return server_factory(source_label), server_factory(target_label)


def write_playbook(path: Path, source_url: str, target_url: str, /, **sections) -> Path:
    """A playbook for two servers (JSON is YAML); ``sections`` override top-level fields."""
    doc = {
        "version": 1,
        "name": "test-migration",
        "source": {"url": source_url},
        "target": {"url": target_url},
        "shim": {"listen": f"127.0.0.1:{servers.free_port()}", "admin": f"127.0.0.1:{servers.free_port()}"},
        "state_dir": str(path.parent / "state"),
        "steps": {
            # Tests send little traffic; the divergence gate's minimum is tested on its own. On a
            # loaded test machine a p99 over a few hundred replies is one scheduling hiccup: the
            # latency gate's defaults are tested on their own (tests/test_latency_gates.py).
            "mirror": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
            "read_cutover": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
            "write_cutover": {"rollback_window": "0s"},
        },
        # The suite written for dual-write pins it; tests of the replication strategy (and of
        # ``auto``) pass their own ``mirror`` section.
        "mirror": {"strategy": "dual-write"},
    }
    for key, value in sections.items():
        if key in ("source", "target"):  # a whole endpoint (a Sentinel or cluster mapping)
            doc[key] = value
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


@pytest.fixture
def make_playbook(tmp_path):
    def make(source, target, /, **sections) -> Path:
        # A SentinelGroup or LocalCluster (tests/topologies.py) gives its own endpoint mapping.
        for role, side in (("source", source), ("target", target)):
            if hasattr(side, "endpoint") and role not in sections:
                sections[role] = side.endpoint()
        s = source.url if hasattr(source, "url") else source if isinstance(source, str) else ""
        t = target.url if hasattr(target, "url") else target if isinstance(target, str) else ""
        return write_playbook(tmp_path / "migrator.yaml", s, t, **sections)

    return make


@pytest.fixture
def make_env(make_playbook):
    """Makes shims in front of two servers (``tests.test_shim_e2e.ShimEnv``); closes them after the test."""
    from tests.test_shim_e2e import ShimEnv

    made: list = []

    def make(source, target, **sections):
        env = ShimEnv(source, target, make_playbook(source, target, **sections))
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


@pytest.fixture
def envs(make_env):
    """The same as ``make_env`` (the name the fault tests use)."""
    return make_env
