"""Shared by the data benchmarks: fast server-side loading, playbooks, and measuring a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

# Keys of mixed types, created server-side in slices (a Lua call per slice keeps the load fast
# without blocking the server for long): strings, hashes, lists, sets, sorted sets, 1 in 7 expiring.
_LOAD_MIXED = r"""
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = first, last do
  local k = 'key:' .. i
  local kind = i % 5
  if kind == 0 then redis.call('SET', k, 'value-' .. i)
  elseif kind == 1 then redis.call('HSET', k, 'f1', i, 'f2', 'x', 'f3', 'yz')
  elseif kind == 2 then redis.call('RPUSH', k, i, i + 1, i + 2)
  elseif kind == 3 then redis.call('SADD', k, i, 'a', 'b')
  else redis.call('ZADD', k, i, 'm1', i + 0.5, 'm2') end
  if i % 7 == 0 then redis.call('EXPIRE', k, 86400) end
end
return last - first + 1
"""

_LOAD_ZSET = r"""
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = first, last do redis.call('ZADD', KEYS[1], i * 1.5, 'member:' .. i) end
return last - first + 1
"""


def load_mixed(client: redis.Redis, n: int, slice_: int = 20_000, *also: redis.Redis) -> None:
    """Load the mixed data set; into ``also`` too, slice by slice, so expiries match within ms."""
    scripts = [c.register_script(_LOAD_MIXED) for c in (client, *also)]
    for first in range(0, n, slice_):
        for script in scripts:
            script(args=[first, min(n, first + slice_) - 1])


def load_zset(client: redis.Redis, n: int, key: str = "bigzset", slice_: int = 20_000) -> None:
    script = client.register_script(_LOAD_ZSET)
    for first in range(0, n, slice_):
        script(keys=[key], args=[first, min(n, first + slice_) - 1])


def write_playbook(dir_: Path, source_url: str, target_url: str, **extra) -> Path:
    doc = {"version": 1, "name": "bench", "source": {"url": source_url}, "target": {"url": target_url},
           "state_dir": str(dir_ / "state"), "shim": {"shadow_timeout": "200ms"}, **extra}
    path = dir_ / "migrator.yaml"
    path.write_text(json.dumps(doc))
    return path


def run_measured(args: list[str], show_output: bool = False, cpu: bool = False) -> tuple:
    """Run a child process; (wall seconds, peak RSS in MiB, exit code), peak RSS from wait4, and
    with ``cpu`` its CPU seconds (user + system) too.

    Output goes to a temporary file, not a pipe: a pipe nobody reads until the end would block
    a child that prints more than the pipe holds.
    """
    with tempfile.TemporaryFile() as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL, env={**os.environ})
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if show_output:
            out.seek(0)
            sys.stdout.write(out.read().decode(errors="replace"))
    if cpu:
        return wall, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime
    return wall, usage.ru_maxrss / 1024, proc.returncode


def native_full_sync(primary, replica) -> float:
    """Seconds for ``replica`` to complete a REPLICAOF full sync of ``primary`` (then detached)."""
    r = replica.client()
    t0 = time.monotonic()
    r.replicaof(primary.host, primary.port)
    while True:
        info = r.info("replication")
        if info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"):
            break
        time.sleep(0.005)
    wall = time.monotonic() - t0
    r.replicaof("no", "one")
    return wall
