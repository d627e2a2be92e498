# cython: language_level=3
"""The device port's per-request HTTP path, compiled (L3, with ``server.py``).

``ConnBase`` holds the state of one device connection and its hot path: the httptools
callbacks (``on_message_begin`` … ``on_message_complete``), ``data_received``, the in-order
answering loop ``_pump`` and ``_write_reply``.  ``server.DeviceConnection`` subclasses it
with everything else (connection set-up and loss, flow control, errors, GET routes and
file parts, timeouts); ``_pump`` calls back into it for the uncommon requests and for a
request whose coroutine has to wait (``_spawn_request``).  ``Req`` is one HTTP request.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.ref cimport Py_XDECREF
from libc.string cimport memchr, memcmp

from dmengine._metrics cimport DeviceCounters, monotonic

import logging

import httptools

from .errors import DmError

log = logging.getLogger("dmengine.server")

#: media type (lower case, no parameters) -> encoding
ENCODING_BY_TYPE = {
    "application/vnd.syncml.dm+xml": "xml",
    "application/vnd.syncml.dm+wbxml": "wbxml",
    "application/vnd.syncml+xml": "xml",
    "application/vnd.syncml+wbxml": "wbxml",
}
_ENCODING_BY_BTYPE = {k.encode(): v for k, v in ENCODING_BY_TYPE.items()}
cdef dict _ENC_BY_BTYPE = _ENCODING_BY_BTYPE
_ACCEPT_POST = ", ".join(ENCODING_BY_TYPE)

# headers the device port reads, by their usual spellings (others are lower-cased first)
HEADERS = {b"content-type": 1, b"content-length": 2, b"host": 3, b"x-syncml-hmac": 4,
           b"expect": 5, b"accept-charset": 6}
HEADERS.update({k.title(): v for k, v in list(HEADERS.items())})
HEADERS[b"X-Syncml-Hmac"] = HEADERS[b"x-syncml-HMAC"] = HEADERS[b"X-SyncML-HMAC"] = 4
HEADER_LENGTHS = frozenset(len(k) for k in HEADERS)
cdef dict _HEADERS = HEADERS
cdef frozenset _HEADER_LENGTHS = HEADER_LENGTHS

REASONS = {
    200: b"OK", 206: b"Partial Content", 304: b"Not Modified", 406: b"Not Acceptable",
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Payload Too Large", 415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 503: b"Service Unavailable",
}

IDLE, READING, BUSY = 0, 1, 2
cdef int _IDLE = 0
cdef int _READING = 1

cdef object _ParserCallbackError = httptools.HttpParserCallbackError
cdef object _ParserUpgrade = httptools.HttpParserUpgrade
cdef object _ParserError = httptools.HttpParserError
cdef double _INF = float("inf")


cdef extern from "Python.h":
    # Python >= 3.10: a coroutine's return value without a StopIteration (and its
    # traceback) per request
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(object iter, object arg, PyObject **presult) except? PYGEN_ERROR

cdef extern from "strings.h":
    int strncasecmp(const char *s1, const char *s2, size_t n) nogil


# --- the plain request, read without llhttp ------------------------------------------------------
#
# A device's DM request is nearly always the same shape: ``POST <the DM path or a RespURI>
# HTTP/1.1``, a few headers, a Content-Length body, all in one read.  ``ConnBase._plain``
# reads exactly that shape straight from the bytes (no parser callbacks, no bytes object per
# header), and gives up on anything else — another method, a query string, HTTP/1.0, a header
# llhttp or this port gives a meaning beyond its value (Connection, Transfer-Encoding, Upgrade,
# Expect, Accept-Charset, a second Content-Length), a byte outside the plain ones, a request
# not yet whole — which llhttp then parses from its first byte, as before.  It is only tried
# when llhttp stands between two requests, so the parser never sees half of one.

cdef inline bint _tchar(unsigned char c) nogil:
    # header-name bytes taken here: letters, digits, '-' (the others go to llhttp)
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57) or c == 45


cdef inline bint _token_char(unsigned char c) nogil:
    # RespURI token bytes (_dmcore._token: URL-safe base64)
    return (c >= 97 and c <= 122) or (c >= 65 and c <= 90) or (c >= 48 and c <= 57) \
        or c == 45 or c == 95


cdef inline bint _is(const char *name, Py_ssize_t n, const char *lower, Py_ssize_t m) nogil:
    return n == m and strncasecmp(name, lower, <size_t>m) == 0



def accepts_utf8(value: bytes) -> bool:
    """Accept-Charset allows UTF-8 (HTTP binding: else 406 without a DM body)."""
    for part in value.lower().split(b","):
        name, _, params = part.strip().partition(b";")
        if name in (b"utf-8", b"*"):
            q = params.strip()
            return not (q.startswith(b"q=") and q[2:].strip() in (b"0", b"0.0", b"0.00",
                                                                  b"0.000"))
    return not value.strip()


def http(int status, bytes body=b"", bytes ctype=b"text/plain; charset=utf-8", *,
         bint close=False, extra=()):
    """A whole HTTP/1.1 response."""
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"Content-Type: " + ctype + b"\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store, private\r\n"]
    for k, v in extra:
        head.append(f"{k}: {v}\r\n".encode("latin-1"))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


class HttpLimit(DmError):
    """Raised inside a parser callback: the request breaks an HTTP-level limit."""

    def __init__(self, status, msg):
        super().__init__(msg)
        self.status = status


cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


cdef class Req:
    """One HTTP request (fields a request does not carry keep their defaults)."""

    cdef public bytes path, method
    cdef public object ctype, host, hmac, body, reply, headers, encoding, part
    cdef public Py_ssize_t clen
    cdef public bint expect, keep_alive, close_after
    cdef public double t0

    def __cinit__(self):
        self.path = b""
        self.method = b""
        self.clen = -1
        self.keep_alive = True
        # ctype, host, hmac, body, reply (a ready answer: errors, 503), headers, encoding
        # and part (GET: (path, offset, length) sent after the head) start as None


cdef class Port:
    """What every connection of one ``DmServer`` reads or counts on each request, in C fields:
    the server's own attributes are a Python instance's (a dictionary look-up after a walk of
    its class's MRO each).  The dicts are the server's own objects, shared, not copies;
    ``DmServer.pending`` and ``draining`` read and write ``pending`` and ``draining`` here."""

    cdef public Py_ssize_t pending      # requests received and not yet answered, all conns
    cdef public Py_ssize_t max_pending, max_sessions
    cdef public bint draining
    cdef public bytes path, prefix      # the DM path and the RespURI prefix (path + "/")
    cdef public dict sessions, get_routes, bases
    cdef public object public_url
    cdef public DeviceCounters metrics  # the server's (None: no metrics), counted with C calls

    def __init__(self, server):
        cfg = server.config
        self.path = server._path
        self.prefix = server._prefix
        self.sessions = server.sessions
        self.get_routes = server.get_routes
        self.bases = server._bases
        self.public_url = cfg.public_url
        self.max_pending = cfg.max_pending
        self.max_sessions = cfg.max_sessions
        self.metrics = server.metrics


cdef class ConnBase:
    """State and hot path of one device connection (see the module's doc)."""

    cdef public object server, transport, parser, req, queue, writable, _loop
    # the peer's key (server._address_key: an IPv6 peer by its /64) for the per-address caps
    # and the authentication backoff; None when it is not known
    cdef public object address
    cdef public Port shared            # the server's per-request state (Port)
    # replies answered during this pump, written together when it ends (pipelined requests
    # read together are answered with one write)
    cdef list out
    cdef public bint busy, in_headers, closing, paused, write_paused, dropped, sending
    # a 100 Continue owed to the request being read, held back until the replies to the
    # requests before it are out (an interim response before them would read as theirs)
    cdef public bint continue_owed
    cdef public int state
    cdef public double deadline, _req_timeout, _keepalive
    cdef public Py_ssize_t hdr_bytes, raw_hdr, _max_hdr, _max_body, _max_pipeline

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, bytes data):
        cdef Py_ssize_t pos = 0, nxt, n
        if self.closing:
            return
        if self.state == _IDLE:
            # llhttp is between two requests: whole plain requests are read here
            n = PyBytes_GET_SIZE(data)
            while pos < n:
                nxt = self._plain(data, pos)
                if nxt < 0:
                    break
                pos = nxt
            if pos:
                if pos == n:
                    self._pump_queue()
                    return
                data = data[pos:]
        if self.in_headers:
            self.raw_hdr += len(data)
        try:
            self.parser.feed_data(data)
        except _ParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HttpLimit):
                self._fail(cause.status, str(cause).encode() + b"\n")
            else:
                log.error("parser callback failed", exc_info=cause)
                self._fail(500, b"internal error\n")
        except _ParserUpgrade:
            self._fail(400, b"upgrade not supported\n")
        except _ParserError as exc:
            self._fail(400, f"bad HTTP request: {exc}\n".encode())
        else:
            if self.in_headers and self.raw_hdr > self._max_hdr:
                self._fail(431, b"request header block too large\n")
        self._pump_queue()

    cdef Py_ssize_t _plain(self, bytes data, Py_ssize_t start) except -2:
        """Queues the plain request (see above) at ``data[start:]``; returns the offset after
        it, or -1 when the bytes there are not one (llhttp reads them then)."""
        cdef Port shared = self.shared
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
        cdef const char *p = buf + start
        cdef const char *stop = buf + end
        cdef const char *line
        cdef const char *nl
        cdef const char *colon
        cdef const char *v
        cdef const char *ve
        cdef const char *host = NULL
        cdef const char *ctype = NULL
        cdef const char *hmac = NULL
        cdef Py_ssize_t host_n = 0, ctype_n = 0, hmac_n = 0, name_n, i, clen = -1, path_n
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(shared.path)
        cdef const char *path = PyBytes_AS_STRING(shared.path)
        cdef const char *target
        cdef unsigned char c
        cdef bint respuri = False
        if end - start < 32 or memcmp(p, b"POST ", 5) != 0:
            return -1
        # the request target: the DM path, or the path + "/" + a RespURI token
        p += 5
        target = p
        if stop - p < plen + 11 or memcmp(p, path, plen) != 0:
            return -1
        p += plen
        if p[0] == 47:                    # "/": a RespURI
            respuri = True
            p += 1
            i = 0
            while p < stop and _token_char(<unsigned char>p[0]):
                p += 1
                i += 1
            if i == 0 or i > 64:
                return -1
        path_n = p - target
        if stop - p < 11 or memcmp(p, b" HTTP/1.1\r\n", 11) != 0:
            return -1
        p += 11
        # the headers, one "name: value\r\n" a line, up to the empty line
        while True:
            if stop - p < 2:
                return -1                 # not whole yet
            if p[0] == 13 and p[1] == 10:
                p += 2
                break
            line = p
            nl = <const char *>memchr(p, 10, stop - p)
            if nl == NULL or nl == line or (nl - 1)[0] != 13:
                return -1
            colon = p
            while colon < nl and _tchar(<unsigned char>colon[0]):
                colon += 1
            if colon == line or colon[0] != 58:          # ":"
                return -1
            name_n = colon - line
            v = colon + 1
            ve = nl - 1                   # the "\r"
            while v < ve and (v[0] == 32 or v[0] == 9):
                v += 1
            i = 0
            while v + i < ve:
                c = <unsigned char>v[i]
                if not ((c >= 32 and c <= 126) or c == 9):
                    return -1
                i += 1
            if i and (ve - 1)[0] in (32, 9):
                return -1                 # trailing whitespace: llhttp's reading of it
            if _is(line, name_n, b"host", 4):
                host, host_n = v, i
            elif _is(line, name_n, b"content-type", 12):
                ctype, ctype_n = v, i
            elif _is(line, name_n, b"content-length", 14):
                if clen >= 0 or i == 0 or i > 9:
                    return -1
                clen = 0
                while v < ve:
                    c = <unsigned char>v[0]
                    if c < 48 or c > 57:
                        return -1
                    clen = clen * 10 + (c - 48)
                    v += 1
            elif _is(line, name_n, b"x-syncml-hmac", 13):
                hmac, hmac_n = v, i
            elif (_is(line, name_n, b"connection", 10) or _is(line, name_n, b"expect", 6)
                    or _is(line, name_n, b"transfer-encoding", 17)
                    or _is(line, name_n, b"upgrade", 7)
                    or _is(line, name_n, b"accept-charset", 14)
                    or _is(line, name_n, b"proxy-connection", 16)):
                return -1
            p = nl + 1
            if p - (buf + start) > self._max_hdr:
                return -1                 # llhttp's path answers 431
        if clen < 0 or clen > self._max_body or ctype == NULL or stop - p < clen:
            return -1
        queue = self.queue
        if len(queue) >= 4 * self._max_pipeline:
            return -1                     # llhttp's path answers 503 and closes
        ct = PyBytes_FromStringAndSize(ctype, ctype_n)
        encoding = _ENC_BY_BTYPE.get(ct)
        if encoding is None:
            return -1                     # parameters or another spelling: the full path
        cdef Req req = Req()
        req.method = b"POST"
        req.path = shared.path if not respuri else PyBytes_FromStringAndSize(target, path_n)
        req.ctype = ct
        req.encoding = encoding
        req.clen = clen
        if host != NULL:
            req.host = PyBytes_FromStringAndSize(host, host_n)
        if hmac != NULL:
            req.hmac = PyBytes_FromStringAndSize(hmac, hmac_n)
        if shared.metrics is not None:
            req.t0 = monotonic()          # for the latency histogram only
        # admission, as on_headers_complete
        if shared.pending >= shared.max_pending:
            self.req = req
            req.reply = self._overloaded("pending")
            self.req = None
        elif not respuri and (len(shared.sessions) >= shared.max_sessions or shared.draining):
            self.req = req
            req.reply = self._overloaded("sessions")
            self.req = None
        else:
            req.body = PyBytes_FromStringAndSize(p, clen)
        # and as on_message_complete
        if len(queue) >= self._max_pipeline and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        queue.append(req)
        shared.pending += 1
        self.deadline = _INF              # a request came: keep-alive restarts once answered
        return (p - buf) + clen

    # --- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self):
        cdef Req req = Req()
        self.req = req
        self.state = _READING
        if self.shared.metrics is not None:
            req.t0 = monotonic()          # for the latency histogram only
        self.deadline = self._loop.time() + self._req_timeout

    def on_url(self, bytes url):
        cdef Req req = self.req
        path = req.path = req.path + url
        if len(path) > self._max_hdr:
            raise HttpLimit(431, "request line too long")
        if self.shared.get_routes and req.headers is None \
                and self.parser.get_method() in (b"GET", b"HEAD"):
            req.headers = {}       # extra GET routes see all headers (Range, If-Range, …)

    def on_header(self, bytes name, bytes value):
        cdef Req req = self.req
        cdef Py_ssize_t n = self.hdr_bytes + len(name) + len(value) + 4
        self.hdr_bytes = n
        if n + len(req.path) > self._max_hdr:
            raise HttpLimit(431, "request header block too large")
        kind = _HEADERS.get(name)
        if kind is None and len(name) in _HEADER_LENGTHS:
            kind = _HEADERS.get(name.lower())
        if kind is not None:
            if kind == 1:
                req.ctype = value
            elif kind == 2:
                try:
                    clen = int(value)
                except ValueError:
                    raise HttpLimit(400, "bad Content-Length") from None
                req.clen = clen if clen < PY_SSIZE_T_MAX else PY_SSIZE_T_MAX
            elif kind == 3:
                req.host = value
            elif kind == 4:
                req.hmac = value
            elif kind == 5:
                req.expect = value.lower() == b"100-continue"
            elif not accepts_utf8(value):
                req.reply = http(406, b"only UTF-8 replies are available\n")
        if req.headers is not None:
            req.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self):
        cdef Req req = self.req
        cdef Port shared = self.shared
        self.in_headers = False
        self.hdr_bytes = self.raw_hdr = 0
        parser = self.parser
        cdef bytes method = parser.get_method()
        req.method = method
        if not parser.should_keep_alive():
            req.keep_alive = False
        cdef bytes path = req.path
        if b"?" in path:
            path = path.split(b"?", 1)[0]
        if req.reply is not None:          # 406 from Accept-Charset
            self._count(406)
        elif method == b"POST" and (path == shared.path or path.startswith(shared.prefix)):
            ctype = req.ctype
            encoding = _ENCODING_BY_BTYPE.get(ctype)
            if encoding is None:           # parameters, spaces or another spelling
                ctype = req.ctype = (ctype or b"").split(b";", 1)[0].strip().lower()
                encoding = _ENCODING_BY_BTYPE.get(ctype)
            req.encoding = encoding
            if encoding is None:
                req.reply = http(415, b"unsupported content type\n", close=not req.keep_alive,
                                 extra=[("Accept-Post", _ACCEPT_POST)])
                self._count(415)
            elif req.clen > self._max_body:
                self._count(413)
                raise HttpLimit(413, f"body larger than {self._max_body} bytes")
            elif shared.pending >= shared.max_pending:
                req.reply = self._overloaded("pending")
            elif path == shared.path and (len(shared.sessions) >= shared.max_sessions
                                          or shared.draining):
                req.reply = self._overloaded("sessions")
            else:
                req.body = b""            # on_body keeps the first chunk as it is
                if req.expect and self.transport is not None:
                    if self.queue or self.busy:
                        self.continue_owed = True     # after the earlier replies
                    else:
                        self._flush()
                        self.transport.write(_CONTINUE)
        elif method in (b"GET", b"HEAD") and self._route(path) is not None:
            if req.headers is None:
                req.headers = {}
        elif path == shared.path or path.startswith(shared.prefix):
            req.reply = http(405, b"method not allowed\n", close=not req.keep_alive,
                             extra=[("Allow", "POST")])
            self._count(405)
        elif self._route(path) is not None:
            req.reply = http(405, b"method not allowed\n", close=not req.keep_alive,
                             extra=[("Allow", "GET, HEAD")])
            self._count(405)
        else:
            req.reply = http(404, b"not found\n", close=not req.keep_alive)
            self._count(404)

    def on_body(self, bytes chunk):
        cdef Req req = self.req
        body = req.body
        if body is None:
            return            # an answer is ready already; the body is read and dropped
        if len(body) + len(chunk) > self._max_body:
            self._count(413)
            raise HttpLimit(413, f"body larger than {self._max_body} bytes")
        if not body:
            req.body = chunk              # the usual case: one chunk, kept without a copy
        elif type(body) is bytes:
            req.body = bytearray(body) + chunk
        else:
            body += chunk

    def on_message_complete(self):
        req = self.req
        self.req = None
        self.continue_owed = False    # the body came without it
        self.state = _IDLE
        self.in_headers = True
        self.hdr_bytes = self.raw_hdr = 0
        self.deadline = _INF
        queue = self.queue
        if len(queue) >= self._max_pipeline:
            # reading pauses only after this read; a read holds thousands of small
            # requests, which would fill the server's max_pending: 4 * max_pipeline at most,
            # then 503 and close
            if len(queue) >= 4 * self._max_pipeline:
                raise HttpLimit(503, "too many pipelined requests")
            if self.transport is not None and not self.paused:
                self.paused = True
                self.transport.pause_reading()
        queue.append(req)
        self.shared.pending += 1

    # --- processing ----------------------------------------------------------------------------

    def _pump(self):
        """Answer queued requests in order while they finish without waiting; write the
        answers."""
        self._pump_queue()

    cdef _pump_queue(self):
        self._answer_queue()
        if self.out is not None:
            # what this pump answered goes out in one write (several pipelined requests of
            # one read: one write); no later flush in the loop turn, which would cost an
            # idle loop iteration per request on a server that is not saturated
            self._flush()

    cdef _answer_queue(self):
        cdef Req req
        cdef Port shared = self.shared
        cdef PyObject* res = NULL
        cdef PySendResult sent
        queue = self.queue
        while queue and not self.busy and not self.write_paused:
            req = queue[0]
            if req.reply is not None:
                self._reply(req.reply, req, False)
                continue
            srv = self.server
            if req.method == b"POST" and req.path == shared.path:    # the common case
                base = shared.bases.get(req.host) if shared.public_url is None else None
                coro = srv.handle_dm(req, req.encoding or "xml", None,
                                     base or srv.base_url(req.host), self.address)
            else:
                coro = self._process(req)
            try:
                sent = PyIter_Send(coro, None, &res)
            except Exception:
                log.exception("request failed")
                self._reply(http(500, b"internal error\n", close=True), req, True)
                continue
            value = <object>res
            Py_XDECREF(res)
            res = NULL
            if sent == PYGEN_RETURN:
                self._reply(value, req, False)
                continue
            self.busy = True
            self._spawn_request(coro, value, req)
            return
        if queue or self.busy:
            return
        if self.closing:
            if self.transport is not None:
                self._flush()
                self.transport.close()
        elif self.state == _IDLE:
            if self.deadline == _INF:
                # idle from now (the last request is answered): keep-alive runs.  Not
                # restarted by reads that start no request (the parser skips blank lines)
                self.deadline = self._loop.time() + self._keepalive
            if shared.draining:
                self.close_if_idle()

    def _write_reply(self, out, Req req, *, bint close=False):
        """Answers ``req`` (the head of the queue) with ``out``; the next pump writes it."""
        self._reply(out, req, close)

    cdef _reply(self, out, Req req, bint close):
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
            if not self.dropped:
                self.shared.pending -= 1
        transport = self.transport
        cdef DeviceCounters metrics = self.shared.metrics
        if req.t0 and metrics is not None:
            metrics.time_request(monotonic() - req.t0)
        if transport is None or transport.is_closing():
            return
        if not (close or req.close_after or not req.keep_alive):
            # the usual answer: out when this pump ends, with the others it answers
            if self.out is None:
                self.out = [out]
            else:
                self.out.append(out)
            if self.continue_owed and not queue:
                # every request before the one being read is answered: its 100 Continue now
                self.continue_owed = False
                self.out.append(_CONTINUE)
            if self.paused and len(queue) <= self._max_pipeline // 2:
                self.paused = False
                transport.resume_reading()
            return
        self._flush()
        transport.write(out)
        if close or req.close_after or not req.keep_alive:
            if req.part is not None and not close:
                self._start_part(req)
                return
            self.closing = True
            self._drop_queue()
            transport.close()
            return
        if self.paused and len(queue) <= self._max_pipeline // 2:
            self.paused = False
            transport.resume_reading()

    def flush_out(self):
        """Writes the answers queued by this pump (before anything else is written or the
        connection closes)."""
        self._flush()

    cdef _flush(self):
        out = self.out
        if out is None:
            return
        self.out = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(<list>out) == 1:
            transport.write((<list>out)[0])
        else:
            transport.write(b"".join(out))

    def drop_out(self):
        """The connection is gone: queued replies are dropped."""
        self.out = None
