"""The user's own tests (``steps.compatibility.test_command``) against a scratch Valkey."""

from __future__ import annotations

from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.scratch import ScratchError, provide
from migrator.compat.testrun import describe, run_command, seed

TITLE = "Your tests against the target's version"


def tests_check(probe: Probe) -> Check:
    step = probe.playbook.steps.compatibility
    if not step.test_command:
        return Check("tests", TITLE, WARN, "steps.compatibility.test_command is not set: no application test ran "
                     "against Valkey", "set steps.compatibility.test_command to a command that runs your "
                     "application's tests against $REDIS_URL", {"configured": False})
    if "target" in probe.clusters and step.scratch not in ("local", "docker"):
        return Check("tests", TITLE, UNKNOWN, "skipped: the target is a cluster, and the scratch mode "
                     f"{step.scratch or 'unset'} would run the tests against one of its nodes (MOVED for the keys "
                     "of every other shard)", "set steps.compatibility.scratch: local or docker (a standalone Valkey "
                     "of the target's version; the tests then do not exercise cluster routing)",
                     {"configured": True, "skipped": "cluster target"})
    try:
        with provide(step.scratch, probe.target, probe.target_id) as scratch:
            seeded = seed(probe, scratch, step.scratch_seed) if step.scratch_seed else None
            run = run_command(step.test_command, scratch.url, step.test_timeout)
    except ScratchError as e:
        return Check("tests", TITLE, FAIL, str(e), "choose a scratch mode that works here "
                     "(steps.compatibility.scratch: local, docker or target)", {"configured": True, "error": str(e)})
    data = {"configured": True, "scratch": {"mode": scratch.mode, "url": scratch.display, "version": scratch.version,
                                            "note": scratch.note}, "seed": seeded, "run": run.to_json()}
    where = f"on scratch {scratch.mode} ({scratch.version}{'; ' + scratch.note if scratch.note else ''})"
    seeded_text = f", seeded with {seeded['copied']} of {seeded['requested']} sampled keys" if seeded else ""
    evidence = f"{describe(run)} {where}{seeded_text}"
    if run.exit_code != 0:
        last = run.tail.strip().splitlines()[-1] if run.tail.strip() else "no output"
        return Check("tests", TITLE, FAIL, f"{evidence}; last line: {last}",
                     "fix the failures (full output tail in the report) or raise steps.compatibility.test_timeout "
                     "if it timed out", data)
    if scratch.note and scratch.mode == "local":
        return Check("tests", TITLE, WARN, evidence, f"install a {probe.target_id.kind} {probe.target_id.major_minor} "
                     "binary (or use scratch: docker) to test against the target's exact version", data)
    return Check("tests", TITLE, PASS, evidence, "", data)
