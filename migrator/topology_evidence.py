"""Evidence against topology changes: which reshards and failovers happened after a report began.

Shared by the gates of ``migrator.gates`` and ``migrator.data.gates`` (so neither imports the
other); ``migrator.topology_watch`` holds the pure diff, ``migrator.sides`` the live views.
"""

from __future__ import annotations

from typing import Any

from migrator import sides, topology_watch


def topology_since(ctx: Any, report: dict | None, began: str | None) -> tuple[list[dict], list[tuple[int, int]]]:
    """The cluster topology changes (reshards, failovers) after a report began, and the slots they moved.

    Two sources, so that neither a change nobody journaled nor one that was undone (a failover
    and a failback) escapes: the report's recorded topology against the sides now, and every
    change journaled at or after the report began (``migrator.gates.topology_since_recorded``).
    """
    if report is None:
        return [], []
    changes = [c.to_json() for c in sides.topology_changes(ctx.current_sides(), sides.recorded(report))]
    texts = {c["text"] for c in changes}
    then = sides.recorded(report)
    if began and ctx.store.exists():
        for e in topology_watch.journaled_changes(ctx.store.read_journal(), after=began):
            for c in e.get("changes", []):
                role = c.get("role")
                seen = ((e.get("views") or {}).get(role) or {}).get("signature")
                had = ((then.get(role).cluster or {}).get("view") or {}).get("signature") if then.get(role) else None
                # Seen late, but the report already ran on the layout the change produced.
                if (seen and seen == had) or c.get("text") in texts:
                    continue
                changes.append(c)
                texts.add(c.get("text"))
    return changes, topology_watch.changed_slots(changes)
