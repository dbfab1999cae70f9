"""Operator hooks: shell commands run before and after each step and rollback.

A failing ``before`` hook aborts the step before anything changes. An ``after`` hook runs once
the step is complete; its failure is reported and journaled but does not undo the step. Hooks
get the migration's name, step, direction, phases and endpoints (passwords masked) in
``MIGRATOR_*`` variables; their exit code and output tail go into the journal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from migrator.errors import RefusedError
from migrator.phases import Step
from migrator.playbook import Playbook
from migrator.redact import redact
from migrator.state import StateStore

OUTPUT_TAIL = 4000


@dataclass
class HookResult:
    when: str
    command: str
    exit_code: int | None
    seconds: float
    output_tail: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_json(self) -> dict:
        return {"hook": self.when, "command": self.command, "exit_code": self.exit_code,
                "seconds": round(self.seconds, 3), "output_tail": self.output_tail}


def hook_field(when: str, direction: str) -> str:
    """``before``/``after`` for advances, ``before_rollback``/``after_rollback`` for rollbacks."""
    return when if direction == "advance" else f"{when}_rollback"


def environment(pb: Playbook, step: Step, direction: str, from_phase: str, to_phase: str, when: str) -> dict[str, str]:
    return {
        "MIGRATOR_NAME": pb.name,
        "MIGRATOR_STEP": step.name,
        "MIGRATOR_DIRECTION": direction,
        "MIGRATOR_HOOK": hook_field(when, direction),
        "MIGRATOR_FROM_PHASE": from_phase,
        "MIGRATOR_TO_PHASE": to_phase,
        "MIGRATOR_SOURCE_URL": pb.source.display,
        "MIGRATOR_TARGET_URL": pb.target.display,
        "MIGRATOR_SHIM_LISTEN": pb.shim.listen,
        "MIGRATOR_STATE_DIR": str(pb.state_path),
        "MIGRATOR_PLAYBOOK": str(pb.path or ""),
    }


def run(pb: Playbook, store: StateStore, step: Step, direction: str, from_phase: str, to_phase: str,
        when: str) -> list[HookResult]:
    """Run the hooks for ``when`` (``before``/``after``); raise RefusedError if a ``before`` hook fails."""
    name = hook_field(when, direction)
    commands = pb.hooks.every_step.commands(name) + getattr(pb.hooks, step.name).commands(name)
    results: list[HookResult] = []
    env = {**os.environ, **environment(pb, step, direction, from_phase, to_phase, when)}
    cwd = pb.path.parent if pb.path else None
    for cmd in commands:
        result = _run_one(cmd, env, cwd, pb.hooks.timeout.total_seconds(), name)
        results.append(result)
        store.journal("hook", step=step.name, direction=direction, **{"from": from_phase}, to=to_phase, **result.to_json())
        if not result.ok:
            if when == "before":
                raise RefusedError(f"{name} hook failed (exit {result.exit_code}): {redact(cmd)}; the step was not taken. "
                                   f"Output: {result.output_tail.strip().splitlines()[-1] if result.output_tail.strip() else '(none)'}")
            break
    return results


def _run_one(cmd: str, env: dict[str, str], cwd, timeout: float, name: str) -> HookResult:
    start = time.monotonic()
    # Own process group, so a timeout kills what the shell started too.
    proc = subprocess.Popen(cmd, shell=True, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
        output = (output or "") + f"\n[killed after {timeout:.0f}s timeout]"
    return HookResult(name, cmd, code, time.monotonic() - start, redact((output or "")[-OUTPUT_TAIL:]))
