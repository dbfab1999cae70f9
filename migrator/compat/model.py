"""What a compatibility run produces: checks with a status, evidence and a remediation line."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, WARN, FAIL, UNKNOWN = "pass", "warn", "fail", "could-not-check"
STATUSES = (FAIL, WARN, UNKNOWN, PASS)  # most severe first: the order reports list them in


@dataclass
class Check:
    """One finding. ``name`` is stable (``data.canary``) so reports can be compared run to run."""

    name: str
    title: str
    status: str
    evidence: str
    remediation: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")
        if self.status in (FAIL, WARN, UNKNOWN) and not self.remediation:
            raise ValueError(f"check {self.name} is {self.status} but says nothing about what to do")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def verdict(checks: list[Check]) -> str:
    """``fail`` if anything failed; ``warn`` if anything warned or could not be checked; else ``pass``."""
    statuses = {c.status for c in checks}
    if FAIL in statuses:
        return "fail"
    if statuses & {WARN, UNKNOWN}:
        return "warn"
    return "pass"


def counts(checks: list[Check]) -> dict[str, int]:
    return {s: sum(1 for c in checks if c.status == s) for s in (PASS, WARN, FAIL, UNKNOWN)}


def summary(checks: list[Check]) -> str:
    n = counts(checks)
    text = f"{n[PASS]} pass, {n[WARN]} warn, {n[FAIL]} fail"
    return text + (f", {n[UNKNOWN]} could not be checked" if n[UNKNOWN] else "")


def ordered(checks: list[Check]) -> list[Check]:
    """Failures first, then warnings, could-not-check, passes; stable within a status."""
    return sorted(checks, key=lambda c: STATUSES.index(c.status))


@dataclass
class CompatResult:
    """The outcome of ``migrator.compat.run``: the verdict, every check, and the report's id."""

    verdict: str
    checks: list[Check]
    report_id: str | None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return summary(self.checks)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary, "report_id": self.report_id,
                "checks": [c.to_json() for c in self.checks], **self.data}
