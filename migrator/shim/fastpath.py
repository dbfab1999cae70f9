"""The fast paths: whole pipelined chunks forwarded as they came.

``_raw_passthrough``: in a one-sided phase, a chunk goes as it came and its replies are counted
(hiredis), not framed. ``_batch``: in a two-sided phase, a chunk of plain reads/writes is one
entry, sent to each side as it came and its replies matched as a whole. Anything else takes the
per-command path (``Session.handle``).
"""

from __future__ import annotations

import time

import hiredis

from migrator.shim import compare as cmp
from migrator.shim import effects, lag
from migrator.shim.commands import SIDE_NAMES, SOURCE, TARGET, Classified, Cls
from migrator.shim.entry import DEFERRED, DOWN, IDLE, NOTHING, UP, Entry, Upstream
from migrator.shim.resp import encode, parse

FAST_PATH_MAX_PARTIAL = 64 * 1024  # a command bigger than this: that connection uses the slow path
# Classes a passthrough connection forwards without entries (blocking commands, transactions,
# subscriptions and AUTH/QUIT need the entry path; connection commands too: the state they set is
# kept only once the server accepted it, see Session._state_change).
_RAW_CLASSES = frozenset({Cls.READ, Cls.WRITE, Cls.ADMIN, Cls.SCRIPT, Cls.SCRIPT_ADMIN, Cls.PUBLISH, Cls.UNKNOWN})
# Commands whose shadow version differs from what the client sent (see effects): never batched.
_NOT_PLAIN = frozenset(effects.NEEDS_REPLY | {b"expire", b"pexpire", b"setex", b"psetex", b"getex", b"restore", b"xadd",
                                             b"select", b"hello", b"client", b"readonly", b"readwrite",
                                             b"evalsha_ro"})  # (healed like EVALSHA: see _heal_script)


def _batch_memo(c: Classified) -> tuple[int, bool, bool, int]:
    """(0 not plain / 1 read / 2 write, one key at argv[1], SET, reply never compared) for ``_batch``.

    Plain: a read or a write both sides know, sent to the shadow as the client sent it (no effect
    to compute, no connection state).
    """
    info = c.info
    name = info.name if info is not None else b""
    base = name.split(b"|", 1)[0]  # a subcommand (b"object|idletime") is ruled by its command
    plain = ((c.cls is Cls.WRITE or c.cls is Cls.READ) and name not in _NOT_PLAIN and base not in _NOT_PLAIN
             and c.known[0] and c.known[1])
    kind = (2 if c.cls is Cls.WRITE else 1) if plain else 0
    never_compared = name in cmp.EXCLUDED or base in cmp.EXCLUDED
    return kind, bool(info is not None and info.single_key), name == b"set", int(never_compared)


class FastPath:
    """The session's fast paths for whole pipelined chunks (passthrough and plain batches)."""

    def _raw_passthrough(self, commands: list[list[bytes]], raw: bytes) -> bool:
        """In a one-sided phase, forward a chunk as it came and its replies as they come.

        Only while nothing else is in flight on this connection, and only for commands that
        need nothing from the shim but connection-state tracking; replies are counted (hiredis),
        not framed. Anything else (and every command after a phase change) takes the entry
        path, which waits until the replies owed here have arrived, so the order holds.
        """
        shim = self.shim
        routes = shim.routes
        plan = routes[Cls.WRITE]
        side = plan.answer
        if plan.shadow is not None or routes[Cls.READ].shadow is not None or routes[Cls.READ].answer != side:
            return False
        u = self.up[side]
        if (u.state is not UP or self.inflight or u.out or u.wait or self.tx is not None or self.pipe is not None
                or self.sub_expect is not None or not self.authed or u.framer.buf or self.up[1 - side].raw_pending):
            return False
        classify = shim.table.classify
        counts: dict[Cls, int] = {}
        special: list[tuple[Classified, list[bytes]]] = []
        reads = writes = 0
        for args in commands:
            c = classify(args)
            cls = c.cls
            if c.known[side]:  # the common case first: a read or a write this side knows
                if cls is Cls.WRITE:
                    writes += 1
                    continue
                if cls is Cls.READ:
                    reads += 1
                    continue
            if cls not in _RAW_CLASSES or (cls is Cls.ADMIN and args[0].lower() in (b"client", b"cluster")):
                return False  # (CLIENT KILL's filters are checked on the entry path, in every phase; CLUSTER: shim.facade)
            if cls is Cls.SCRIPT_ADMIN and shim.tracker.replica is not None:
                return False  # SCRIPT LOAD/FLUSH reach the replica too (see Dispatch._dispatch)
            if cls is Cls.SCRIPT or cls is Cls.SCRIPT_ADMIN or not c.known[side]:
                special.append((c, args))
            counts[cls] = counts.get(cls, 0) + 1
        # Everything was checked before anything changes: a False above left no trace.
        for c, args in special:
            name = args[0].lower()
            if c.cls is Cls.SCRIPT or c.cls is Cls.SCRIPT_ADMIN:
                shim.note_script(args, name)
            if not c.known[side]:
                shim.stats.unknown[(SIDE_NAMES[side], name.decode(errors="replace"))] += 1
        n = len(commands)
        stats = shim.stats.commands
        if reads:
            counts[Cls.READ] = counts.get(Cls.READ, 0) + reads
        if writes:
            counts[Cls.WRITE] = counts.get(Cls.WRITE, 0) + writes
        for cls, k in counts.items():
            stats[(cls.value, SIDE_NAMES[side])] += k
        gen = shim.generation
        shim.outstanding[gen] = shim.outstanding.get(gen, 0) + n
        u.raw_pending += n
        u.raw_sent.append([time.monotonic(), n, gen, len(raw)])
        self.inflight_n += n
        self.inflight_bytes += len(raw)
        if u.virtual:
            u.transport.send(raw, n)
        else:
            u.transport.write(raw)
        return True

    def _raw_replies(self, u: Upstream, data: bytes) -> None:
        """Replies owed for passthrough commands: to the client as they are, counted."""
        reader = u.counter
        reader.feed(data)
        n = 0
        try:
            while reader.gets() is not False:
                n += 1
        except hiredis.ProtocolError as e:
            # A reply hiredis cannot count (nested over ~1,000 levels): where the stream stands
            # is lost, so the connection ends, after what arrived, as if the server had closed it.
            self.client.write(data)
            self.fail(u.side, f"{SIDE_NAMES[u.side]} reply not counted: {e}", side_fault=False)
            return
        self.client.write(data)  # (a client not reading them: see _flow)
        if n > u.raw_pending:
            self.fail(u.side, f"unexpected reply from {SIDE_NAMES[u.side]} (stream out of step)", side_fault=False)
            return
        u.raw_pending -= n
        now = time.monotonic()
        latency = self.shim.stats.latency[u.side]
        sent = u.raw_sent
        while n and sent:
            head = sent[0]
            take = min(n, head[1])
            head[1] -= take
            n -= take
            self.inflight_n -= take
            latency.observe(now - head[0], take)
            self.shim.entry_finished(head[2], take)
            if head[1] == 0:
                self.inflight_bytes -= head[3]
                sent.popleft()

    def _raw_commands(self, data: bytes, commands: list[list[bytes]]) -> bytes | None:
        """The exact bytes of ``commands`` if the client encodes canonically (every client does).

        hiredis does not say where a partial command starts, so the bytes are accounted for by
        re-computing each command's encoded length. A client whose bytes do not add up (inline
        commands, non-canonical lengths) or that sends very large commands loses the fast path
        for the rest of its connection; the slow path re-encodes every command and is exact.
        """
        buf = self.leftover + data if self.leftover else data
        if not commands:
            self.leftover = buf
            if len(buf) > FAST_PATH_MAX_PARTIAL:
                self.fast, self.leftover = False, b""
            return None
        consumed = self.parser.encoded  # (counted by the parser: the same sum of canonical lengths)
        n = len(buf)
        if (consumed < 0 or self.parser.inline or consumed > n or buf[consumed - 2 : consumed] != b"\r\n"
                or (consumed < n and buf[consumed] != 42)):
            self.fast, self.leftover = False, b""
            return None
        if consumed == n:
            self.leftover = b""
            return buf
        self.leftover = buf[consumed:]
        if len(self.leftover) > FAST_PATH_MAX_PARTIAL:
            self.fast, self.leftover = False, b""
        return buf[:consumed]

    def _batch(self, commands: list[list[bytes]], raw: bytes) -> bool:
        """Route a chunk as one entry if every command in it is plain and routed alike.

        Plain: a read or a write both sides know, compared as sent, with no effect to compute.
        The chunk goes to each side as the client sent it and the replies are matched as a
        whole; anything else takes the per-command path. False: nothing was done.
        """
        if self.tx is not None or self.pipe is not None or self.sub_expect is not None or not self.authed:
            return False
        shim = self.shim
        routes = shim.routes
        classify = shim.table.classify
        read_plan, write_plan = routes[Cls.READ], routes[Cls.WRITE]
        reads = writes = first = 0
        never_compared_in = 0  # bit 1: a read, bit 2: a write whose reply is never compared
        lock_keys: list[bytes] = []  # the sequencer's keys, if the chunk goes to both sides
        simple = True  # every command has one key, at argv[1]: no key-spec walk below
        for args in commands:
            c = classify(args)
            memo = c.batch
            if memo is None:
                memo = c.batch = _batch_memo(c)
            kind, single, set_like, never_compared = memo
            if not first:
                first = kind
            if kind == 2:
                writes += 1
            elif kind == 1:
                reads += 1
            else:
                return False
            if set_like and len(args) > 3:
                return False  # SET with options (EX, GET, KEEPTTL...): see effects
            if never_compared:
                never_compared_in |= kind
            if simple:
                # Collected here rather than in a second pass: this runs for every chunk.
                if single and len(args) > 1:
                    lock_keys.append(args[1])
                else:
                    simple = False
        plan = write_plan if first == 2 else read_plan
        if reads and writes and read_plan is not write_plan and (
                read_plan.answer, read_plan.shadow, read_plan.sequential, read_plan.fallback) != (
                write_plan.answer, write_plan.shadow, write_plan.sequential, write_plan.fallback):
            return False
        if never_compared_in and ((never_compared_in & 1 and read_plan.compare)
                                   or (never_compared_in & 2 and write_plan.compare)):
            return False
        k = len(commands)
        answer, shadow = plan.answer, plan.shadow
        if reads and shim.ryw and (self.ryw_pending or self.ryw_acked is not None):
            return False  # read-your-writes decides per read (see Dispatch._ryw_redirect)
        if reads and shim.lag_aware and answer == shim.tracker.replica and not shim.tracker.ready:
            return False  # the primary answers instead, one by one (see Dispatch._dispatch)
        if shadow is not None and reads and shim.lag_aware and not shim.tracker.ready:
            return False  # not compared, one by one (see Dispatch._dispatch)
        if shadow is not None:
            u = self.up[shadow]
            if (u.state is DOWN or u.state is IDLE) and not shim.may_retry(shadow):
                return False
            if reads and shim.cfg.compare_reads < 1.0:
                return False  # reads are sampled one by one, on the per-command path
            if plan.fallback and (shim.dirty.keys or not shim.may_retry(answer)):
                return False
        e = Entry(commands, b"", None, shim.generation)
        e.batch = True
        e.n = k
        e.cls = Cls.WRITE if writes else Cls.READ
        e.write = bool(writes)
        e.answer, e.shadow = answer, shadow
        e.db = self._db(answer)
        e.payload[answer] = raw
        e.exp[answer] = k
        e.pending = 1
        stats = shim.stats.commands
        if reads:
            stats[("read", SIDE_NAMES[answer])] += reads
        if writes:
            stats[("write", SIDE_NAMES[answer])] += writes
        if shadow is not None:
            e.pending = 2
            e.exp[shadow] = k
            e.compare = True
            e.wait_shadow = plan.wait_shadow
            e.fallback = plan.fallback
            shim.mirror_depth += k
            self.shadow_n += k
            if reads:
                stats[("read", SIDE_NAMES[shadow])] += reads
            if writes:
                stats[("write", SIDE_NAMES[shadow])] += writes
            if plan.sequential:
                e.payload[shadow] = DEFERRED
                e.shadow_raw = raw
            else:
                e.payload[shadow] = raw
            if not shim.sequence_keys:
                pass  # the servers order the writes (replication): no per-key order to keep
            elif simple and not (reads and writes):
                # Writes take their keys exclusively, compared reads shared.
                db = self._db(SOURCE)
                self._sequence(e, list(dict.fromkeys(lock_keys if not db else [(db, x) for x in lock_keys])),
                               excl=bool(writes))
            else:
                self._sequence(e, self._tx_spec(commands))
        if writes and shim.ryw and answer == shim.tracker.primary:
            e.ryw = True
            self.ryw_pending += 1
        self.pending_count += 1
        shim.outstanding[e.gen] = shim.outstanding.get(e.gen, 0) + 1
        self.inflight.append(e)
        e.size = len(raw)
        self.inflight_n += k
        self.inflight_bytes += e.size
        self._enqueue(answer, e)
        if shadow is not None:
            self._enqueue(shadow, e)
        return True

    def _resolve_batch(self, e: Entry, other: int, frames: list[bytes]) -> None:
        """Source first, then target: the shadow gets the commands the answering side applied."""
        failed = [i for i, f in enumerate(frames) if f[:1] == b"-"]
        if not failed:
            e.payload[other] = e.shadow_raw
            return
        keep = [i for i in range(e.n) if i not in set(failed)]
        e.sent_idx = keep
        e.exp[other] = max(len(keep), 1)
        e.payload[other] = b"".join(encode(e.args[i]) for i in keep) if keep else NOTHING

    def _compare_batch(self, e: Entry) -> None:
        shim = self.shim
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        idx = e.sent_idx
        if idx is None:
            pairs = zip(range(e.n), src, tgt)
        else:  # some commands failed on the answering side and were not sent to the shadow
            answer_frames = e.rep[e.answer]
            shadow_frames = e.rep[e.shadow]
            pairs = ((i, *((answer_frames[i], shadow_frames[j]) if e.answer == SOURCE else (shadow_frames[j], answer_frames[i])))
                     for j, i in enumerate(idx))
        compared = 0
        for i, a, b in pairs:
            compared += 1
            if a == b:
                continue
            args = e.args[i]
            name = args[0].lower()
            if shim.lag_aware and lag.unready_reply((a, b)[shim.tracker.replica]):
                shim.stats.lag_skipped += 1
                compared -= 1
                continue
            kind = cmp.compare(name, parse(a), parse(b), shim.ttl_tolerance_ms)
            if kind is None:
                continue
            c = shim.table.classify(args)
            if shim.lag_aware and c.cls is not Cls.WRITE:
                self._lag_mismatch(args, name, kind)
                continue
            self._diverged(e, kind, name, c.keys(args), a, b, c.cls is Cls.WRITE)
        shim.stats.compared += compared
        shim.divergence.compared(compared)

    def _drop_raw(self, u: Upstream) -> bool:
        """Forget passthrough replies that will never come; True if some were owed."""
        owed = u.raw_pending
        for head in u.raw_sent:
            self.shim.entry_finished(head[2], head[1])
            self.inflight_n -= head[1]
            self.inflight_bytes -= head[3]
        u.raw_sent.clear()
        u.raw_pending = 0
        u.counter = hiredis.Reader()
        return owed > 0

    def _raw_owed(self) -> int:
        return self.up[0].raw_pending + self.up[1].raw_pending
