"""Sentinel-managed endpoints against real sentinels (tests/topologies.py): resolution, following a
failover in every component (clients, shim, sync, check), the pre-flight's report, and the
playbook's validation of the ``sentinel:`` fields."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from migrator import playbook, sentinel, servers
from migrator.connect import connect, make_client
from migrator.errors import PlaybookError, UnreachableError
from migrator.phases import Phase
from tests.helpers import run_cli, wait_for

PASSWORD = "s3ntinel-data-pw"
SENTINEL_PASSWORD = "s3ntinel-own-pw"


def _endpoint(group, monkeypatch, *, sentinel_password: bool = False) -> playbook.Endpoint:
    """The group's playbook endpoint, loaded as a playbook would load it (passwords from the environment)."""
    doc = group.endpoint(password_env="S14_DATA_PW" if group.password else None,
                         sentinel_password_env="S14_SENTINEL_PW" if sentinel_password else None)
    if group.password:
        monkeypatch.setenv("S14_DATA_PW", group.password)
    if sentinel_password:
        monkeypatch.setenv("S14_SENTINEL_PW", group.sentinel_password)
    ep = playbook.Endpoint.model_validate(doc)
    ep.sentinel._password = group.password
    ep.sentinel._sentinel_password = group.sentinel_password if sentinel_password else None
    return ep


def _start_rogue_sentinel(binary_label: str, master_name: str, host: str, port: int, tmp_path: Path,
                          password: str | None = None):
    """A sentinel of its own that monitors ``host:port`` (a replica) under ``master_name``: it names a
    server whose ROLE is not master."""
    from tests import topologies

    d = tmp_path / "rogue-sentinel"
    d.mkdir()
    conf = d / "sentinel.conf"
    lines = [f"sentinel monitor {master_name} {host} {port} 1", f"sentinel down-after-milliseconds {master_name} 60000"]
    if password:
        lines.append(f"sentinel auth-pass {master_name} {password}")
    conf.write_text("\n".join(lines) + "\n")
    return topologies._start_sentinel(servers.find(binary_label), d, conf, None)


# --- resolution -------------------------------------------------------------------------------


def test_resolve_names_the_primary_with_auth_on_both_levels(sentinel_factory, monkeypatch):
    """The sentinels (with their own password) name the primary (with the data nodes' password), recorded on the endpoint."""
    g = sentinel_factory("redis-7.0", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)
    ep = _endpoint(g, monkeypatch, sentinel_password=True)
    assert sentinel.resolve(ep) == g.primary_address()
    assert (ep.host, ep.port) == g.primary_address()
    c = connect(ep, "source")
    try:
        assert c.set("k", "v") and c.get("k") == b"v"
        assert c.execute_command("ROLE")[0] == b"master"
    finally:
        c.close()


def test_a_sentinel_naming_a_replica_is_not_trusted(sentinel_factory, monkeypatch, tmp_path):
    """A sentinel (asked first) that names a server whose ROLE is slave is skipped: the next sentinel's primary is used."""
    g = sentinel_factory("redis-7.0", sentinels=1)
    replica = g.replicas()[0]
    rogue = _start_rogue_sentinel("redis-7.0", g.master_name, replica.host, replica.port, tmp_path)
    try:
        wait_for(lambda: rogue.client(socket_timeout=1).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                                        g.master_name), what="rogue sentinel ready")
        doc = {"sentinel": {"addresses": [f"{rogue.host}:{rogue.port}", *g.addresses], "master_name": g.master_name}}
        ep = playbook.Endpoint.model_validate(doc)
        assert sentinel.resolve(ep) == g.primary_address()
        # Only the rogue sentinel: no primary, and the error says why.
        only = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"{rogue.host}:{rogue.port}"],
                                                              "master_name": g.master_name}})
        with pytest.raises(UnreachableError) as e:
            sentinel.resolve(only, "source")
        assert f"{replica.host}:{replica.port}, whose ROLE is slave" in str(e.value)
        assert g.master_name in str(e.value)
    finally:
        rogue.stop()


def test_no_sentinel_answers_names_master_and_sentinels(tmp_path):
    """With every sentinel down, resolution fails with UnreachableError naming the master name and each sentinel tried."""
    ports = [servers.free_port(), servers.free_port()]
    ep = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"127.0.0.1:{p}" for p in ports],
                                                        "master_name": "orders"}})
    t = time.monotonic()
    with pytest.raises(UnreachableError) as e:
        sentinel.resolve(ep, "source")
    assert time.monotonic() - t < 10
    msg = str(e.value)
    assert "'orders'" in msg and all(f"127.0.0.1:{p}" in msg for p in ports) and msg.startswith("source sentinel://")
    assert e.value.exit_code == 3


def test_a_client_made_before_a_failover_reaches_the_new_primary(sentinel_factory, monkeypatch):
    """A client from connect() keeps working across SENTINEL FAILOVER and writes to the new primary, not the demoted one."""
    g = sentinel_factory("redis-7.0", password=PASSWORD)
    ep = _endpoint(g, monkeypatch)
    c = connect(ep, "source")
    try:
        c.set("before", "1")
        old = g.primary_address()
        new = g.failover()
        time.sleep(sentinel.RECHECK + 0.1)  # the client re-asks the sentinels at most every RECHECK
        t = time.monotonic()
        c.set("after", "2")
        took = time.monotonic() - t
        assert (ep.host, ep.port) == new != old
        with contextlib.closing(g.node(new).client()) as nc:
            assert nc.get("after") == b"2" and nc.get("before") == b"1"
        assert took < 5
    finally:
        c.close()


def test_make_client_is_lazy_and_fails_as_unreachable(tmp_path):
    """make_client() for a Sentinel endpoint with no sentinel up raises a redis ConnectionError on use (as a down server does)."""
    ep = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"127.0.0.1:{servers.free_port()}"],
                                                        "master_name": "m"}})
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    c = make_client(ep, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        c.ping()
    c.close()
