import io
import json

from migrator import logs, servers
from migrator.redact import register_secret


def test_json_logs_are_redacted():
    """JSON log lines carry the event and never a registered secret or a URL password."""
    register_secret("very-secret-pw")
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    logs.get_logger("t").info("connecting", url="redis://u:inline-pw@h:1", note="pw is very-secret-pw")
    line = json.loads(buf.getvalue().strip())
    assert line["event"] == "connecting" and line["level"] == "info"
    assert "inline-pw" not in buf.getvalue() and "very-secret-pw" not in buf.getvalue()


def test_log_level_filters():
    """Below the configured level nothing is written."""
    buf = io.StringIO()
    logs.configure("json", "warning", stream=buf)
    logs.get_logger().info("quiet")
    assert buf.getvalue() == ""


def test_harness_finds_and_runs_every_server_kind(server_factory):
    """Each discovered binary starts on a free port, identifies itself, and is stopped afterwards."""
    found = {b.label for b in servers.discover()}
    assert {"redis-6.2", "redis-7.0", "valkey-8.1", "valkey-9.1"} <= found, found
    started = []
    for label in sorted(found):
        s = server_factory(label)
        info = s.client().info("server")
        kind = "valkey" if info.get("server_name") == "valkey" else "redis"
        assert kind == s.binary.kind
        started.append(s)
    s = started[0]
    s.stop()
    assert not s.alive() and not s.dir.exists()


def test_conf_lines_reach_the_server(server_factory):
    """Multi-word directives can be given as config-file lines (here: CONFIG disabled, as on managed services)."""
    import pytest
    import redis

    s = server_factory("valkey-8.1", conf_lines=['rename-command CONFIG ""'])
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        s.client().config_get("maxmemory")


def test_free_port_respects_an_upper_bound():
    """A port for a cluster node leaves room for its bus port (port + 10000)."""
    assert all(servers.free_port(highest=55535) <= 55535 for _ in range(50))
