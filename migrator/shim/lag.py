"""Replication lag, as the shim's core sees it: tracked offsets, and what a mismatch means.

In the replication strategy the second server is a replica: it applies the primary's writes a
little later. A read compared against it may differ only because it has not got there yet, so a
mismatch is not a divergence until it is *confirmed*: both sides read again, each with its
replication offset in the same transaction (``MULTI`` / the read / ``INFO replication`` /
``EXEC``), until the replica's offset equals the primary's (then a difference is real) or the
values agree (it was lag). The IO layer (``shim.replwatch``) does the reading; the decisions are
here, pure:

- ``OffsetTracker``: the last offsets read from both sides (polled often only while something
  waits on them), whether the replica is ready to be compared at all (link up, not loading a
  full sync, replicating this primary's history), and the lag.
- ``judge``: one round of a confirmation: "lag", "divergent", or "retry".
- ``Mismatch``: what a session hands over for confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrator.shim.commands import SIDE_NAMES

# Replies of a replica that cannot answer from its data yet: the read is not compared (skipped).
_UNREADY = (b"-LOADING", b"-MASTERDOWN")


def unready_reply(raw: object) -> bool:
    """The replica's reply says it has no data to answer from yet (loading a full sync, link down)."""
    return type(raw) is bytes and raw.startswith(_UNREADY)


@dataclass
class OffsetTracker:
    """The primary's and the replica's replication offsets, as last read (see ``shim.replwatch``).

    ``*_at`` are ``time.monotonic()`` values of when each reading was *sent*: a reading sent
    after a write was acknowledged has an offset that includes it.
    """

    primary: int | None = None  # the side that is the primary (None: no replication routing)
    replica: int | None = None
    primary_offset: int = -1
    primary_at: float = 0.0
    primary_replid: str = ""
    replica_offset: int = -1
    replica_at: float = 0.0
    replica_replid: str = ""
    replica_link_up: bool = False
    replica_loading: bool = False
    replica_of_primary: bool = False  # its primary is this primary (same replication id)
    why_unready: str = "not read yet"
    polls: int = 0
    demand_until: float = 0.0  # poll quickly until then (something waits on an offset)

    @property
    def ready(self) -> bool:
        """The replica can be compared against: in sync with this primary's history, link up, not loading."""
        return self.replica is not None and self.replica_link_up and not self.replica_loading and self.replica_of_primary

    @property
    def lag_bytes(self) -> int | None:
        if self.primary_offset < 0 or self.replica_offset < 0 or not self.replica_of_primary:
            return None
        return max(0, self.primary_offset - self.replica_offset)

    def demand(self, now: float, for_s: float = 1.0) -> None:
        """Something waits for the offsets: poll quickly for a while."""
        self.demand_until = max(self.demand_until, now + for_s)

    def caught_up(self, offset: int) -> bool:
        """The replica has applied the primary's stream up to ``offset``."""
        return self.ready and self.replica_offset >= offset

    def primary_offset_since(self, t: float) -> int | None:
        """The primary's offset from a reading sent after ``t`` (None: none yet)."""
        return self.primary_offset if self.primary_at > t else None

    def set_primary(self, offset: int, replid: str, at: float) -> None:
        self.primary_offset, self.primary_replid, self.primary_at = offset, replid, at
        self.polls += 1

    def set_replica(self, offset: int | None, replid: str, link_up: bool, loading: bool, is_replica: bool,
                    at: float) -> None:
        self.replica_offset = -1 if offset is None else offset
        self.replica_replid, self.replica_link_up, self.replica_loading = replid, link_up, loading
        self.replica_at = at
        self.replica_of_primary = is_replica and bool(replid) and replid == self.primary_replid
        if not is_replica:
            self.why_unready = "not a replica"
        elif loading:
            self.why_unready = "loading its initial sync"
        elif not link_up:
            self.why_unready = "link to its primary down"
        elif not self.replica_of_primary:
            self.why_unready = "replicates another history (replication ids differ)"
        else:
            self.why_unready = ""

    def reset(self, primary: int | None, replica: int | None) -> None:
        """Roles changed (a phase or mode applied): forget what was read."""
        if (primary, replica) == (self.primary, self.replica):
            return
        self.primary, self.replica = primary, replica
        self.primary_offset = self.replica_offset = -1
        self.primary_at = self.replica_at = 0.0
        self.primary_replid = self.replica_replid = ""
        self.replica_link_up = self.replica_loading = self.replica_of_primary = False
        self.why_unready = "not read yet"

    def to_json(self) -> dict:
        return {
            "primary": SIDE_NAMES[self.primary] if self.primary is not None else None,
            "replica": SIDE_NAMES[self.replica] if self.replica is not None else None,
            "primary_offset": self.primary_offset if self.primary_offset >= 0 else None,
            "replica_offset": self.replica_offset if self.replica_offset >= 0 else None,
            "lag_bytes": self.lag_bytes,
            "replica_ready": self.ready,
            "why_not_ready": self.why_unready or None,
            "polls": self.polls,
        }


@dataclass
class Mismatch:
    """A compared read whose two replies differed, waiting to be confirmed (or not) against offsets."""

    args: list[bytes]
    name: bytes
    keys: list[bytes]
    dbs: tuple[int, int]  # the database on each side (SOURCE, TARGET)
    kind: str  # what the first comparison found (the replies themselves are not kept: they are read again)
    queued_at: float = 0.0
    tries: int = field(default=0)


LAG, DIVERGENT, RETRY = "lag", "divergent", "retry"


def judge(same: bool, primary_offset: int, replica_offset: int) -> str:
    """One round of a confirmation, both sides read with their offsets (primary first, then replica).

    ``same``: the two values agree. Agreeing values were lag (or nothing). Differing values with
    the replica exactly at the primary's offset are a divergence; with the replica behind, or
    past it (the primary moved on between the two reads), the round proves nothing: retry.
    """
    if same:
        return LAG
    if replica_offset == primary_offset:
        return DIVERGENT
    return RETRY
