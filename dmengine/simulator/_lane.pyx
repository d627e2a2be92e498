# cython: language_level=3
"""The simulator's per-message hot path, compiled: the keep-alive HTTP/1.1 connection of
``fleet.HttpClient`` (``Conn``) and the load lanes of ``Fleet.run`` (``Lane``).

A ``Lane`` runs sessions one after the other on its own connection, from that connection's
response callback: the answer goes straight into the device's sans-IO ``ClientSession`` and
the next message (or package 1 of the next device's session) is written from there — no
task, future or coroutine per message or session.  Anything out of the ordinary (faults, a
status other than 200, FUMO jobs, no idle connection, a failed exchange) continues in
``Fleet._drive`` (a coroutine) and the lane resumes afterwards.
"""
import time

import httptools

from ..errors import DmError
from .device import ClientSession as _ClientSession

from ._client cimport ClientBase, Outgoing

MAX_RESPONSE = 64 * 1024 * 1024
MAX_HEAD = 64 * 1024               # response head bytes kept for header look-ups

cdef object _perf_counter = time.perf_counter
cdef object _HttpParserError = httptools.HttpParserError


class HttpError(DmError):
    """The HTTP exchange failed (connection refused, reset, timeout, bad response)."""


cdef class Conn:
    """One keep-alive connection (an asyncio protocol).  The response head is kept as raw
    bytes and split into headers only when someone asks (``fleet._header_dict``): no parser
    callback per header.  The answer goes to ``driver`` (a ``Lane``) when one is set, else
    to the future ``waiter``."""

    cdef public object transport, parser, waiter, pool, client_waiting, _loop
    cdef public Lane driver
    cdef public int status
    cdef public bytes head
    cdef public bint head_done, closed, keep_alive
    cdef public list chunks
    cdef public Py_ssize_t size, max_idle
    cdef public double deadline

    def __init__(self, loop):
        self._loop = loop
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter = None
        self.status = 0
        self.head = b""
        self.head_done = False
        self.chunks = []
        self.size = 0
        self.closed = False
        self.keep_alive = True
        self.deadline = 0.0
        self.pool = None               # where it goes back after a fast-path POST
        self.client_waiting = set()    # the client's set of awaited connections
        self.max_idle = 0
        self.driver = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(HttpError(f"connection lost: {exc or 'closed by server'}"))
        cdef Lane d = self.driver
        if d is not None:
            self.driver = None
            d.on_error(self, HttpError(f"connection lost: {exc or 'closed by server'}"))

    def eof_received(self):
        return None

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    def data_received(self, bytes data):
        cdef bytes head
        if not self.head_done:        # the head is cut at its end only when asked for
            head = self.head + data if self.head else data
            if b"\r\n\r\n" in head:
                self.head_done = True
            elif len(head) > MAX_HEAD:
                head = head[:MAX_HEAD]         # httptools refuses such a head anyway
            self.head = head
        try:
            self.parser.feed_data(data)
        except _HttpParserError as exc:
            w = self.waiter
            if w is not None and not w.done():
                w.set_exception(HttpError(f"bad HTTP response: {exc}"))
            d = self.driver
            self.driver = None
            self.close()
            if d is not None:
                d.on_error(self, HttpError(f"bad HTTP response: {exc}"))

    def on_body(self, bytes chunk):
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > MAX_RESPONSE:
            raise HttpError("response too large")

    def on_message_complete(self):
        cdef list chunks = self.chunks
        cdef bytes body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        cdef bytes head = self.head
        parser = self.parser
        self.head = b""                # ready for the next response on this connection
        self.head_done = False
        self.chunks = []
        self.size = 0
        cdef Lane d = self.driver
        if d is not None:              # a lane's request: straight to it, no future
            self.driver = None
            d.on_response(self, parser.get_status_code(), parser.should_keep_alive(), head,
                          body)
            return
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        w = self.waiter
        self.waiter = None
        pool = self.pool
        if pool is not None:           # a fast-path POST: back to the pool at once
            self.pool = None
            self.client_waiting.discard(self)
            if self.keep_alive and not self.closed and len(pool) < self.max_idle:
                pool.append(self)
            else:
                self.close()
        if w is not None and not w.done():
            w.set_result((self.status, head, body))

    def close(self):
        self.closed = True
        if self.transport is not None:
            self.transport.close()


cdef class Lane:
    """One of ``Fleet.run``'s ``concurrency`` slots (see the module's doc).  ``run`` is the
    ``fleet._Run`` it belongs to (queue, deadline, done)."""

    cdef public object run, fleet, client, stats, key, dev, cs, out
    cdef public Conn conn
    cdef public double t0, t1
    cdef public int messages
    cdef public bint finished
    cdef object queue, heads, idle, waiting, rng, latencies
    cdef bint keep_latencies

    def __init__(self, run):
        self.run = run
        self.fleet = run.fleet
        self.client = run.fleet.client
        self.stats = run.fleet.stats
        self.queue = run.queue
        self.heads = self.client._heads
        self.idle = self.client.idle
        self.waiting = self.client._waiting
        self.keep_latencies = run.fleet.keep_latencies
        self.rng = run.fleet.rng
        self.latencies = self.stats.latencies
        self.conn = None
        self.key = None
        self.dev = self.cs = self.out = None
        self.t0 = self.t1 = 0.0
        self.messages = 0
        self.finished = False

    def next_session(self):
        """Starts the next device's session (or ends the lane when the run is over)."""
        run = self.run
        queue = self.queue
        end = run.end
        if not queue or (end is not None and _perf_counter() >= end) or run.done.done():
            self.finished = True
            run.lane_done()
            return
        dev = queue.popleft()
        faults = dev.faults
        if faults.drop or faults.timeout:
            self._slow(self.fleet.run_session(dev, _want=False), dev)
            return
        self.dev = dev
        self.t0 = _perf_counter()
        cs = self.cs = _ClientSession(dev, rng=self.rng)
        self.messages = 0
        self.send(cs.first())

    cdef send(self, Outgoing out):
        self.out = out
        url = out.url
        headers = out.wire_headers
        got = self.heads.get(url)
        if got is not None and got[1] is headers and got[0] == "POST":
            key, head, _ = got[2]
        else:
            key, head, _ = self.client._head("POST", url, headers)
        cdef Conn conn = self.conn
        cdef object pool
        if conn is None or conn.closed or key != self.key:
            self.park()
            pool = self.idle[key]
            conn = None
            while pool:
                conn = pool.popleft()         # oldest first (HttpClient.idle)
                if not conn.closed:
                    break
                conn = None
            if conn is None:                 # no idle connection: the slow path opens one
                self._handoff(None)
                return
            self.conn = conn
            self.key = key
        cdef bytes body = out.body
        conn.driver = self
        conn.transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        self.t1 = _perf_counter()
        client = self.client
        loop = conn._loop
        conn.deadline = loop.time() + client.timeout
        self.waiting.add(conn)
        if client._sweeper is None or client._sweep_loop is not loop:
            client._arm(loop)

    cdef on_response(self, Conn conn, int status, bint keep_alive, bytes head, bytes body):
        cdef ClientBase cs
        try:
            self.waiting.discard(conn)
            stats = self.stats
            if self.keep_latencies:
                self.latencies.append(_perf_counter() - self.t1)
            self.messages += 1
            stats.messages += 1
            if not keep_alive:
                conn.close()
                self.conn = None
            if status != 200:
                self._handoff(("response", status, head, body))
                return
            cs = <ClientBase>self.cs
            cs.receive(body)
            if cs.jobs:
                self._handoff(("received",))
                return
            out = cs.next()
            if out is not None:
                self.send(out)
                return
            dev = self.dev
            fleet = self.fleet
            outcome = cs.outcome or "completed"
            if fleet.keep_reports:
                fleet._ended(False, dev, outcome, self.messages, self.t0, cs.detail, 1201)
            else:                            # Fleet._ended without a report, inline
                stats.sessions += 1
                stats.outcomes[outcome] += 1
                if self.keep_latencies:
                    stats.session_seconds.append(_perf_counter() - self.t0)
            if dev.pending_alerts and outcome == "completed":
                fleet.spawn(fleet.run_session(dev, alert=1201))
            self.cs = self.dev = self.out = None
            if self.run.end is not None:
                self.queue.append(dev)
            self.next_session()
        except Exception as exc:             # surfaces from Fleet.run, as a task's would
            self.run.fail(exc)

    cdef on_error(self, Conn conn, exc):
        """The exchange failed (connection lost, bad response, no answer in time)."""
        self.waiting.discard(conn)
        conn.close()
        if self.conn is conn:
            self.conn = None
        self._slow(self.fleet._lane_retry(exc, self.dev, self.cs, self.out, self.messages,
                                          self.t0), self.dev)

    def failed(self, Conn conn, exc):
        """``on_error`` for the client's timeout sweeper."""
        self.on_error(conn, exc)

    cdef _handoff(self, resume):
        """The rest of the current session runs in ``Fleet._drive``."""
        self._slow(self.fleet._drive(self.dev, self.cs, self.out, self.t0, 1201, False,
                                     self.messages, resume), self.dev)

    cdef _slow(self, coro, dev):
        self.cs = self.dev = self.out = None
        self.fleet.spawn(self._then(coro, dev))

    async def _then(self, coro, dev):
        try:
            await coro
        except Exception as exc:
            self.run.fail(exc)
            return
        if dev is not None and self.run.end is not None:
            self.queue.append(dev)
        self.next_session()

    def park(self):
        """The lane's connection goes back to the client's idle pool."""
        cdef Conn conn = self.conn
        self.conn = None
        if conn is None or self.key is None:
            return
        if conn.closed or conn.driver is not None:
            return
        pool = self.idle[self.key]
        if len(pool) < self.client.max_idle:
            pool.append(conn)
        else:
            conn.close()
