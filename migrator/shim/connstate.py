"""Connection state a client sets (database, protocol, name, READONLY, AUTH), tracked and replayed.

What the client sets is applied at once and undone if the server's answer says it was not
(``_state_change`` / ``_state_settled``); each new upstream connection is opened with it
replayed before anything else (``_connect``). AUTH and QUIT are answered by the shim itself,
except with ``shim.auth: passthrough``: then the client's own AUTH / HELLO AUTH goes to the
servers as that user (``_forward_login``), is replayed on every upstream connection opened later
in place of the playbook's credentials, and a login only one side accepts is refused with a
clear error and closes the connection (``_login_settled``). Passwords a server accepted are
registered as secrets (``migrator.redact``); only user names are ever logged.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

import hiredis

from migrator.redact import register_secret
from migrator.shim.commands import SIDE_NAMES, Classified, Cls
from migrator.shim.entry import CONNECTING, Entry, internal_entry
from migrator.shim.resp import OK, Framer, error_reply, is_error, parse

PER_SIDE_STATE = frozenset({b"readonly", b"readwrite"})  # kept per side (see _readonly_settled)
LOGIN_NAMES = frozenset({b"auth", b"hello"})  # what may carry a client's login (shim.auth: passthrough)
_QUEUED = b"+QUEUED\r\n"


def _state_changes(args: list[bytes], name: bytes) -> dict[str, Any]:
    """The connection state SELECT or CLIENT SETNAME sets if the server accepts it."""
    if name == b"select" and len(args) == 2:
        try:
            return {"db": int(args[1])}
        except ValueError:
            return {}  # both sides reject it the same way
    if name == b"client" and len(args) == 3 and args[1].lower() == b"setname":
        return {"name": args[2]}
    return {}


def tx_state_changes(tx: list[list[bytes]], result: list | None = None) -> dict[str, Any]:
    """The connection state a transaction's SELECT / CLIENT SETNAME set (``result``: only those that succeeded)."""
    changes: dict[str, Any] = {}
    for i, args in enumerate(tx):
        name = args[0].lower()
        if name not in (b"select", b"client"):
            continue
        if result is not None and (i >= len(result) or isinstance(result[i], hiredis.ReplyError)):
            continue
        changes.update(_state_changes(args, name))
    return changes


def login_in(args: list[bytes]) -> tuple[bytes | None, bytes] | None:
    """The (user, password) an AUTH or HELLO ... AUTH carries (user None: ``AUTH password``), or None."""
    name = args[0].lower()
    if name == b"auth":
        return (args[1] if len(args) == 3 else None, args[-1]) if len(args) in (2, 3) else None
    if name == b"hello":
        for i in range(2, len(args) - 2):
            if args[i].lower() == b"auth":
                return args[i + 1], args[i + 2]
    return None


class ConnState:
    """The session's connection state: AUTH/QUIT answered here, SELECT/HELLO/CLIENT SETNAME/READONLY tracked and replayed."""

    def _local(self, args: list[bytes], c: Classified | None, reply: bytes, close_after: bool = False) -> None:
        e = Entry(args, args[0].lower(), c, self.shim.generation)
        e.local = reply
        e.close_after = close_after
        self.inflight.append(e)
        self.inflight_n += 1

    def _check_password(self, password: bytes) -> bool:
        expected = self.shim.password
        return expected is not None and hmac.compare_digest(password, expected)

    def _handle_local(self, args: list[bytes], name: bytes, c: Classified) -> None:
        if name == b"quit":
            self._local(args, c, OK, close_after=True)
            return
        # AUTH is the client's credential for the shim; the upstream connections authenticate
        # with the playbook's credentials, so it is never forwarded.
        if len(args) not in (2, 3):
            self._local(args, c, error_reply("ERR wrong number of arguments for 'auth' command"))
            return
        if self.shim.passthrough:
            self._forward_login(args, name, c, {}, (args[1] if len(args) == 3 else None, args[-1]))
            return
        if self.shim.password is None:
            self._local(args, c, OK)
            return
        if self._check_password(args[-1]):
            self.authed = True
            self._local(args, c, OK)
        else:
            self.shim.stats.refused["wrong-password"] += 1
            self._local(args, c, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")

    def _handle_connection(self, args: list[bytes], name: bytes, c: Classified) -> None:
        plan = self.shim.routes[Cls.CONNECTION]
        if name == b"hello":
            forward = [args[0]]
            if len(args) > 1:
                try:
                    proto = int(args[1])
                except ValueError:
                    self._local(args, c, error_reply("ERR Protocol version is not an integer or out of range"))
                    return
                if proto not in (2, 3):
                    self._local(args, c, b"-NOPROTO unsupported protocol version\r\n")
                    return
                forward.append(args[1])
                i, setname, auth_ok, login = 2, None, None, None
                while i < len(args):
                    opt = args[i].lower()
                    if opt == b"auth" and i + 2 < len(args):
                        auth_ok = self.shim.password is None or self._check_password(args[i + 2])
                        login = (args[i + 1], args[i + 2])
                        i += 3
                    elif opt == b"setname" and i + 1 < len(args):
                        setname = args[i + 1]
                        i += 2
                    else:
                        self._local(args, c, error_reply(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
                        return
                if auth_ok is False:
                    self.shim.stats.refused["wrong-password"] += 1
                    self._local(args, c, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
                    return
                if auth_ok:
                    self.authed = True
                if not self.authed:
                    self._local(args, c, b"-NOAUTH HELLO must be called with the client already authenticated, "
                                         b"otherwise the HELLO <proto> AUTH <user> <pass> option can be used to "
                                         b"authenticate the client and select the RESP protocol version at the same time\r\n")
                    return
                changes: dict[str, Any] = {"proto": proto}
                if setname is not None:
                    forward += [b"SETNAME", setname]
                    changes["name"] = setname
                if login is not None and self.shim.passthrough:
                    self._forward_login([*forward, b"AUTH", *login], name, c, changes, login)
                    return
                self._state_change(self._dispatch(forward, name, c, plan), changes)
                return
            elif not self.authed:
                self._local(args, c, b"-NOAUTH Authentication required.\r\n")
                return
            self._dispatch(forward, name, c, plan)
            return
        e = self._dispatch(args, name, c, plan)
        changes = _state_changes(args, name)
        if changes:
            self._state_change(e, changes)

    def _forward_login(self, args: list[bytes], name: bytes, c: Classified, changes: dict[str, Any],
                       login: tuple[bytes | None, bytes]) -> None:
        """``shim.auth: passthrough``: the client's AUTH / HELLO AUTH goes to the sides the phase uses.

        In a two-sided phase the client's reply waits for both (``wait_shadow``): a login one side
        refuses is settled by ``_login_settled``. The login is connection state: replayed on every
        upstream connection opened later (``_connect``), the other side's included when a phase
        starts using it.
        """
        e = self._dispatch(args, name, c, self.shim.routes[Cls.CONNECTION])
        if e.shadow is not None:
            e.wait_shadow = True
        self._state_change(e, {**changes, "login": login})

    def _login_reply(self, e: Entry, side: int) -> bool:
        """``side`` answered a forwarded login: an accepted password becomes a secret to mask
        (only accepted ones: a client trying passwords must not grow the list every log line is
        checked against); with both answers in, ``_login_settled``. True: the client is refused."""
        raw = e.rep[side]
        login = login_in(e.args)
        if login is None:
            return False
        if type(raw) is bytes and not is_error(raw):
            register_secret(login[1].decode(errors="replace"))
        if e.shadow is None or e.rep[e.shadow] is None or e.rep[e.answer] is None:
            return False
        return self._login_settled(e, login[0] or b"default")

    def _login_settled(self, e: Entry, user: bytes) -> bool:
        """Both sides answered a forwarded login: if only one accepted it, the client is refused.

        One server has the connection logged in as the user and the other does not, so nothing
        after it could run as one user on both: the client gets a WRONGPASS naming the user and
        the side that refused (never the password), and the connection is closed after it.
        True if so (the entry's reply is replaced).
        """
        ans, sh = e.rep[e.answer], e.rep[e.shadow]
        if type(ans) is not bytes or type(sh) is not bytes or is_error(ans) == is_error(sh):
            return False
        refused = e.shadow if is_error(sh) else e.answer
        raw = e.rep[refused]
        uname = user.decode(errors="replace")
        err = raw[1:].split(b"\r\n", 1)[0].decode(errors="replace")[:200]
        code = err.split(" ", 1)[0] if err[:1].isupper() else "WRONGPASS"
        self.login = None  # the client is not logged in as the user anywhere it could use it
        shim = self.shim
        shim.stats.refused["login-one-side"] += 1
        shim.log.warning("shim.login_refused", user=uname, refused_by=SIDE_NAMES[refused],
                         accepted_by=SIDE_NAMES[1 - refused], phase=str(getattr(shim, "applied_phase", "")),
                         error=err, peer=self.client.peer)
        e.local = error_reply(
            f"{code} migrator shim: user '{uname}' was refused by the {SIDE_NAMES[refused]} ({err}) and accepted "
            f"by the {SIDE_NAMES[1 - refused]}; in this phase the shim logs in to both servers, so the user must "
            "exist with the same password on both (see the acl check of migrator compat); connection closed")
        e.close_after = f"login of user '{uname}' refused by the {SIDE_NAMES[refused]}"
        return True

    def _login_lost(self, side: int, raw: bytes) -> None:
        """A replayed login (a new upstream connection, or a phase that starts using a side) was
        refused: the client cannot go on as its user on both sides; it is disconnected (logged)."""
        uname = (self.login[0] or b"default").decode(errors="replace") if self.login else "default"
        err = raw[1:].split(b"\r\n", 1)[0].decode(errors="replace")[:200]
        self.shim.stats.refused["login-one-side"] += 1
        self.shim.log.warning("shim.login_refused", user=uname, refused_by=SIDE_NAMES[side], error=err,
                              peer=self.client.peer, replayed=True)
        self.login = None
        self.close(f"login of user '{uname}' refused by the {SIDE_NAMES[side]} ({err})")

    def _state_change(self, e: Entry, changes: dict[str, Any]) -> None:
        """``e`` changes the connection state: applied now, undone if its answer says it did not.

        Applied at once so that the commands after it are keyed, marked dirty and replayed on a
        new upstream connection with the state the server will have when it runs them; a SELECT
        the server refuses (SELECT 99) must not stay in it, or every later connection would be
        refused.
        """
        e.cstate = {f: (getattr(self, f), v) for f, v in changes.items()}
        for f, v in changes.items():
            setattr(self, f, v)
        self.conn_pending.append(e)

    def _state_settled(self, e: Entry, raw: bytes) -> None:
        """``e``'s answer is in: keep what it did, undo what it did not do."""
        cstate, e.cstate = e.cstate, None
        pending = self.conn_pending
        try:
            i = pending.index(e)
        except ValueError:
            return
        del pending[i]
        if e.tx is not None:
            result = parse(raw)
            done = tx_state_changes(e.tx, result) if isinstance(result, list) else {}
        else:
            done = {} if is_error(raw) else {f: after for f, (_, after) in cstate.items()}
        for f, (before, after) in cstate.items():
            got = done.get(f, before)
            if got == after:
                continue
            # Not what was assumed: the next pending change of the field starts from what it is,
            # or, if none, the connection is in that state now.
            later = next((x for x in list(pending)[i:] if x.cstate is not None and f in x.cstate), None)
            if later is not None:
                later.cstate[f] = (got, later.cstate[f][1])
            else:
                setattr(self, f, got)

    def _readonly_settled(self, e: Entry, side: int, raw) -> None:
        """READONLY / READWRITE: what each side accepted is what a new connection to it replays.

        A side that refused READONLY (a server without cluster mode) is never sent it again: its
        refusal concerns this connection's command, not the side.
        """
        if (e.name == b"readonly" or e.name == b"readwrite") and type(raw) is bytes and not is_error(raw) \
                and raw != _QUEUED:
            self.readonly[side] = e.name == b"readonly"

    def _connect(self, side: int) -> None:
        """Open ``side``'s connection; replay the connection state as of now before anything else.

        A session with no connection state (database, protocol, name, READONLY, transaction,
        WATCH, subscription) that never needed any gets a share of the shim's shared connection
        to the side instead (``shim.mux.VirtualConn``): nothing to replay. The first command that
        needs state moves it to a connection of its own (``Session._own_connection``).
        """
        u = self.up[side]
        u.state = CONNECTING
        u.connect_started = time.monotonic()
        u.framer = Framer()
        if (not self.own and self.db is None and self.proto == 2 and self.name is None and not self.readonly[side]
                and self.tx is None and not self.watched and self.pipe is None):
            u.attempt += 1
            if self.shim.open_shared(self, side, u.attempt):
                u.virtual = True
                return
        u.virtual = False
        ep = self.shim.endpoints[side]
        hs: list[list[bytes]] = []
        if self.shim.passthrough:
            if self.login is not None:  # the client's own login (not logged in: the server's default user)
                hs.append([b"AUTH", *([self.login[0]] if self.login[0] is not None else []), self.login[1]])
        elif ep.password:
            hs.append([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()])
        if self.proto == 3:
            hs.append([b"HELLO", b"3"])
        db = self._db(side)
        if db != 0:
            hs.append([b"SELECT", b"%d" % db])
        if self.name is not None:
            hs.append([b"CLIENT", b"SETNAME", self.name])
        if self.readonly[side]:
            hs.append([b"READONLY"])
        for args in reversed(hs):
            u.out.appendleft(internal_entry(side, args, self.shim.generation))
        u.attempt += 1
        self.shim.open_upstream(self, side, u.attempt)
