"""Keep secrets out of everything migrator writes: output, logs, state, journal and reports.

Secrets are registered when a playbook is loaded (passwords from URLs and ``password_env``);
``redact`` replaces every registered secret in any string, and ``redact_url`` masks the
password part of a URL even when it was never registered.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]+)@", re.I)


def register_secret(value: str | None) -> None:
    """Remember a secret so that ``redact`` masks it wherever it appears."""
    if value and len(value) >= 3:
        with _lock:
            _secrets.add(value)


def redact_url(url: str) -> str:
    """Mask the password in ``scheme://user:password@host`` (and a lone ``:password@``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(value: Any) -> Any:
    """Return ``value`` with every registered secret and every URL password masked.

    Works on strings and, recursively, on lists, tuples and dicts (keys and values).
    """
    if isinstance(value, str):
        out = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", value)
        with _lock:
            secrets = sorted(_secrets, key=len, reverse=True)
        for s in secrets:
            if s in out:
                out = out.replace(s, MASK)
        return out
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
