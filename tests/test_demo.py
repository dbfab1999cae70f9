import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from migrator import servers
from tests.helpers import run_cli, wait_for


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ports_in(output: str) -> list[int]:
    """The source, target and shim ports the demo printed."""
    m = re.search(r"Seeded the source \(:(\d+)\).*the target listens on :(\d+)", output)
    shim = re.search(r"Shim listening on 127\.0\.0\.1:(\d+)", output)
    assert m and shim, output[-3000:]
    return [int(m.group(1)), int(m.group(2)), int(shim.group(1))]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (e.g. a work folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.slow
def test_demo_walks_every_step_audits_and_cleans_up(tmp_path):
    """`migrator demo --dir` completes the migration with a clean audit, links the migration report it wrote, names the binaries it ran, shows its waits, and leaves no server or shim running."""
    out = run_cli("demo", "--dir", str(tmp_path), "--keys", "600", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "Demo complete: every acknowledged write is on the Valkey." in out.stdout
    assert "writes-on-target → completed" in out.stdout
    assert "write pause" in out.stdout and "0 client error(s)" in out.stdout
    pb = json.loads((tmp_path / "migrator.yaml").read_text())
    ports = [int(pb[side]["url"].rsplit(":", 1)[1].split("/")[0]) for side in ("source", "target")]
    ports.append(int(pb["shim"]["listen"].rsplit(":", 1)[1]))
    assert not any(_port_open(p) for p in ports)

    # The printed link is the migration report the completion wrote, not a check report.
    link = re.search(r"final migration report \((pass|warn)\): (\S+\.html)", out.stdout)
    assert link, out.stdout[-2000:]
    html_path = Path(link.group(2))
    assert html_path.parent == tmp_path / "state" / "reports" and html_path.exists()
    report = json.loads(html_path.with_suffix(".json").read_text())
    assert report["kind"] == "migration" and report["steps"]

    # Which binaries ran, by version and path.
    src, tgt = servers.preferred("redis"), servers.preferred("valkey")
    assert f"Source {src.kind} {src.version} ({src.path})" in out.stdout
    assert f"Target {tgt.kind} {tgt.version} ({tgt.path})" in out.stdout

    # The waits say what they wait for, with the gate's evidence as it changes.
    assert re.search(r"… waiting for gate mirror_duration: mirror has run \d+s of 4s", out.stdout), out.stdout[-3000:]
    assert "… waiting for the shim" in out.stdout and "… sync: copying" in out.stdout


@pytest.mark.slow
def test_demo_without_dir_removes_its_temporary_folder(tmp_path):
    """Without --dir the demo works in a temporary folder and removes it when it ends, saying the report went with it."""
    out = run_cli("demo", "--keys", "300", env={"TMPDIR": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "removed with the temporary folder" in out.stdout
    assert list(tmp_path.iterdir()) == []
    assert not any(_port_open(p) for p in _ports_in(out.stdout))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_demo_interrupted_stops_everything_and_removes_its_folder(tmp_path, how):
    """Ctrl-C in the middle of the demo (SIGINT to its process group, as a terminal sends it), or SIGTERM to it alone, stops its servers and shim and removes its temporary folder."""
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "demo", "--keys", "300"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("waiting for gate mirror_duration" in x for x in lines), timeout=120,
                 what="the demo to wait for the mirror's duration")
        work = next(p for p in tmp_path.iterdir() if p.name.startswith("migrator-demo-"))
        assert _processes_mentioning(str(work))  # its servers and shim run from there
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=60) != 0
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert list(tmp_path.iterdir()) == [], output[-3000:]
    assert f"Removed the temporary folder {work}" in output
    assert not any(_port_open(p) for p in _ports_in(output))
    assert _processes_mentioning(str(work)) == []


@pytest.mark.slow
def test_demo_on_a_terminal_shows_a_spinner_with_what_it_waits_for(tmp_path):
    """On a terminal (a pseudo-terminal here) the demo completes and shows its waits as a live status line with the gate's evidence."""
    master, replica = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "demo", "--keys", "300", "--dir", str(tmp_path)],
                            stdin=replica, stdout=replica, stderr=replica, start_new_session=True,
                            env={**os.environ, "TERM": "xterm", "COLUMNS": "160"})
    os.close(replica)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the demo closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "Demo complete: every acknowledged write is on the Valkey." in screen, screen[-3000:]
    assert re.search(r"waiting for gate mirror_duration: mirror has run \d+s of 4s", screen)


def test_readme_quick_start_uses_a_venv_and_ci_runs_its_test_command():
    """The README's quick start is two commands that install into a virtual environment (never a global pip), and .ci/run runs its test command verbatim."""
    root = Path(__file__).resolve().parent.parent
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", (root / "README.md").read_text(), re.S)
    assert block
    install, test = block.group(1).strip().splitlines()
    assert "python3-venv" in install and "python3 -m venv .venv" in install
    assert ".venv/bin/pip install -e '.[test]'" in install and install.endswith(".venv/bin/migrator demo")
    assert not re.search(r"(^|&&\s*)(python3? -m )?pip3? install", install)
    assert test == ".venv/bin/python -m pytest"
    assert test in (root / ".ci" / "run").read_text().splitlines()
