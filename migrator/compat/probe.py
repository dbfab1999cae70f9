"""Everything the checks read, gathered once: identities, the source's command history, samples.

``INFO commandstats`` is read first, before any check runs a command of its own on the source
(HTTL, DUMP...), and the calls earlier migrator runs made (``ownstats``) are subtracted from it,
so the commands compared are the application's, not migrator's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from migrator.compat import ownstats
from migrator.compat.ownstats import command_calls
from migrator.compat.identify import Identity, identify
from migrator.compat.rpc import Side, Unavailable
from migrator.compat.sample import KeyspaceSample, sample
from migrator.playbook import Playbook


@dataclass
class Probe:
    playbook: Playbook
    source: Side
    target: Side
    source_id: Identity
    target_id: Identity
    _commandstats: dict[str, int] | Unavailable  # "client|setname" → the application's calls on the source
    source_keys: KeyspaceSample
    target_keys: KeyspaceSample
    # The source's statistics as read (migrator's own calls included), and those own calls.
    raw_commandstats: dict[str, int] = field(default_factory=dict)
    source_run_id: str = ""
    own_calls: dict[str, int] = field(default_factory=dict)
    # Results one check leaves for another (copy methods...) and cached replies.
    facts: dict[str, Any] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def gather(cls, playbook: Playbook, source: Side, target: Side) -> "Probe":
        try:
            raw: dict[str, int] | Unavailable = command_calls(source.call("INFO", "commandstats"))
        except Unavailable as e:
            raw = e  # the command checks report it as could-not-check
        server = source.call("INFO", "server")
        stats, own, run_id = raw, {}, str(server.get("run_id", ""))
        if not isinstance(raw, Unavailable):
            stats, own = ownstats.application_calls(playbook.state_path, run_id, raw)
        source_id = identify({**server, **source.call("INFO", "replication")})
        target_id = identify({**target.call("INFO", "server"), **target.call("INFO", "replication")})
        return cls(playbook, source, target, source_id, target_id, stats, sample(source), sample(target),
                   raw_commandstats=raw if isinstance(raw, dict) else {}, source_run_id=run_id, own_calls=own)

    def record_own_calls(self) -> None:
        """After the checks: what this run sent to the source goes into the ledger (``ownstats``)."""
        if isinstance(self._commandstats, Unavailable):
            return
        try:
            run_id = str(self.source.call("INFO", "server").get("run_id", ""))
            after = command_calls(self.source.call("INFO", "commandstats"))
        except Unavailable:
            return
        if run_id == self.source_run_id:
            ownstats.record(self.playbook.state_path, run_id, self.raw_commandstats, after, names=None)

    @property
    def commandstats(self) -> dict[str, int]:
        """The source's executed commands; raises Unavailable if INFO commandstats was refused."""
        if isinstance(self._commandstats, Unavailable):
            raise self._commandstats
        return self._commandstats

    def side(self, role: str) -> Side:
        return self.source if role == "source" else self.target

    def identity(self, role: str) -> Identity:
        return self.source_id if role == "source" else self.target_id

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per run (a failure, e.g. Unavailable, is not cached and raises again)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]
