import json
import socket

import pytest

from tests.helpers import run_cli


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_demo_walks_every_step_audits_and_cleans_up(tmp_path):
    """`migrator demo` completes the whole migration with a clean audit and leaves no server or shim running."""
    out = run_cli("demo", "--dir", str(tmp_path), "--keys", "600", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "Demo complete: every acknowledged write is on the Valkey." in out.stdout
    assert "writes-on-target → completed" in out.stdout
    assert "write pause" in out.stdout and "0 client error(s)" in out.stdout
    pb = json.loads((tmp_path / "migrator.yaml").read_text())
    ports = [int(pb[side]["url"].rsplit(":", 1)[1].split("/")[0]) for side in ("source", "target")]
    ports.append(int(pb["shim"]["listen"].rsplit(":", 1)[1]))
    assert not any(_port_open(p) for p in ports)
    assert list((tmp_path / "state" / "reports").glob("check-*.html"))
