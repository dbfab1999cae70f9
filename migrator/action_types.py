"""What an action is handed and what it returns (``migrator.actions`` runs them by name).

Kept apart from the registry of actions so that the modules doing the work (the role swap, the
attach) can build results without importing the registry that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from migrator.playbook import Playbook
from migrator.state import State, StateStore


@dataclass
class ActionResult:
    name: str
    ok: bool
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.name, "ok": self.ok, "evidence": self.evidence, "data": self.data}


@dataclass
class ActionContext:
    playbook: Playbook
    store: StateStore
    state: State  # already holds the new phase and generation
    direction: str  # "advance" or "rollback"
    overrides: dict[str, str] = field(default_factory=dict)  # gate → reason, from --override
