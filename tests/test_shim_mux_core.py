"""The shared connection's bookkeeping without sockets: replies split back to their users in order.

``mux.SharedLink`` is pure: a recording transport and recording users drive it. Hypothesis
generates interleavings of users sending commands (each owing some replies), the reply stream cut
at arbitrary byte boundaries, users going deaf (a timed-out share) and the connection being lost.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.phases import Phase
from migrator.shim.mux import UP, Mux, SharedLink, VirtualConn
from migrator.shim.resp import encode
from migrator.shim.routing import ROUTES


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    close = abort

    def get_write_buffer_size(self) -> int:
        return 0


class Stats:
    def __init__(self) -> None:
        self.latency = [None, None]


class Shim:
    """The little of the shim a Mux reads."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.routes = ROUTES[Phase.MIRRORING]
        self.endpoints = (type("E", (), {"password": None, "user": None})(),) * 2
        self.endpoint_dbs = (0, 0)
        self.failed: list[tuple[int, str]] = []

    def entry_finished(self, gen: int, count: int = 1) -> None:
        pass

    def side_failed(self, side: int, reason: str) -> None:
        self.failed.append((side, reason))

    def side_ok(self, side: int) -> None:
        pass


class User:
    """A recording user of a shared link (what a session's share or a multiplexed client is to it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[bytes] = []
        self.done = 0
        self.lost = 0
        self.closed: str | None = None

    def shared_replies(self, frames: list[bytes], n: int, token) -> None:
        assert len(frames) == n
        self.got.extend(frames)

    def shared_done(self, token) -> None:
        self.done += 1

    def shared_lost(self, n: int, token) -> None:
        self.lost += n

    def shared_closed(self, reason: str) -> None:
        self.closed = reason


def up_link() -> tuple[SharedLink, Transport, list]:
    soon: list = []
    mux = Mux(Shim(), 1, soon.append, lambda link, attempt: None)
    link = mux.links[(0, 2)][0]
    link.connect()
    t = Transport()
    assert link.connected(t, link.attempt)
    assert t.written == [encode([b"CLIENT", b"SETNAME", b"migrator-shim-shared"])]
    link.data(b"+OK\r\n")  # the handshake's reply: checked, not forwarded
    return link, t, soon


def reply(user: str, i: int) -> bytes:
    body = f"{user}:{i}".encode()
    return b"$%d\r\n%s\r\n" % (len(body), body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=30),
       st.lists(st.integers(1, 40), min_size=1, max_size=200))
def test_replies_reach_their_users_in_order_however_the_stream_is_cut(sends, cuts):
    """Users send in any interleaving, each owing 1-5 replies per send; the replies come back as
    one stream cut anywhere: each user receives exactly its replies, in its order, and is told
    'done' once per send."""
    link, t, soon = up_link()
    users = [User(f"u{i}") for i in range(4)]
    expected: dict[str, list[bytes]] = {u.name: [] for u in users}
    stream = b""
    counters = [0] * 4
    for who, n in sends:
        u = users[who]
        link.send(u, b"*1\r\n$4\r\nPING\r\n" * n, n, None)
        for _ in range(n):
            r = reply(u.name, counters[who])
            counters[who] += 1
            expected[u.name].append(r)
            stream += r
    for f in soon:
        f()
    # The handshake; the first send at once (the connection was idle); all the others of this
    # turn of the loop in one write.
    assert len(t.written) == (2 if len(sends) == 1 else 3)
    assert b"".join(t.written[1:]).count(b"PING") == sum(n for _w, n in sends)
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        link.data(stream[pos:pos + step])
        pos += step
        k += 1
    for u in users:
        assert b"".join(u.got) == b"".join(expected[u.name])
        assert u.done == sum(1 for who, _n in sends if users[who] is u)
    assert not link.waiting and link.state is UP


def test_a_deaf_share_has_its_replies_read_and_dropped_and_the_others_stay_in_step():
    """A session's share that timed out (aborted) still owes replies: they are consumed and
    dropped, and the next user's replies are its own."""
    link, _t, soon = up_link()

    class Session:
        def __init__(self) -> None:
            self.data: list[bytes] = []
            self.lost: list[str] = []

        def on_upstream_frames(self, side, frames):
            self.data.extend(frames)

        def on_upstream_lost(self, side, transport, reason):
            self.lost.append(reason)

    a, b = Session(), Session()
    va, vb = VirtualConn(link, a, 0), VirtualConn(link, b, 0)
    va.send(b"x", 2)
    vb.send(b"y", 1)
    va.abort()
    link.data(b":1\r\n:2\r\n:3\r\n")
    assert a.data == [] and b.data == [b":3\r\n"]
    assert not link.waiting


def test_a_lost_shared_connection_tells_every_user_with_replies_owed_once():
    """The connection is lost with two users owing replies: each is told what it lost and that
    the connection closed, once; a user with nothing owed is not told."""
    link, _t, _soon = up_link()
    u1, u2, idle = User("a"), User("b"), User("idle")
    link.send(u1, b"a", 2, None)
    link.send(u2, b"b", 1, None)
    link.send(u1, b"c", 1, None)
    link.data(b":1\r\n")  # one of u1's first two
    link.lost(_t, "connection reset")
    assert (u1.lost, u2.lost, idle.lost) == (2, 1, 0)
    assert u1.closed and u2.closed and idle.closed is None
    assert link.state == "down" and not link.waiting


def test_a_refused_handshake_fails_the_connection_not_the_side():
    """An error to the shim's own handshake (AUTH refused) fails the connection for its users,
    without declaring the side down for everyone."""
    soon: list = []
    shim = Shim()
    shim.endpoints = (type("E", (), {"password": "pw", "user": None})(),) * 2
    mux = Mux(shim, 1, soon.append, lambda link, attempt: None)
    link = mux.links[(0, 2)][0]
    u = User("u")
    link.send(u, b"*1\r\n$4\r\nPING\r\n", 1, None)  # queued while connecting
    t = Transport()
    assert link.connected(t, link.attempt)
    link.data(b"-WRONGPASS invalid username-password pair\r\n")
    assert u.closed and "handshake refused" in u.closed and shim.failed == []
