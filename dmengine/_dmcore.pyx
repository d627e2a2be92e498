# cython: language_level=3
# (boundscheck, wraparound, initializedcheck and cdivision come from setup.py)
"""The device port's per-message path, compiled (L3): ``ServerCore.handle_dm`` — decode, the
session table, ``DmSession.receive``, the handler hooks, ``next_message``, encode, the HTTP
reply — and the small helpers it shares with the rest of ``server.py``, which imports them
from here.  ``server.DmServer`` subclasses ``ServerCore``; everything that does not run on
every message (start-up, the sweep, shutdown, ending sessions) stays in Python there.

The logic is the one server.py had; what changes is that the attributes read on every message
are typed fields and the coroutine is Cython's, so a DM request spends its time in the codec
and the session engine rather than in the interpreter.
"""
import logging
import os
import time
from base64 import urlsafe_b64encode

from dmengine._message cimport Message, SyncHdr, Command
from dmengine._metrics cimport DeviceCounters
from libc.stdio cimport snprintf
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from dmengine._devport import http as _http
from dmengine.errors import CodecError, DmError, ProtocolError
from dmengine.events import AuthFailed
from dmengine.logs import session_label
from dmengine.status import AlertCode, StatusCode

log = logging.getLogger("dmengine.server")

_HEADS = {}          # Content-Type -> the reply head up to Content-Length, built once per type
cdef bytes _REPLY_MID = b"\r\nCache-Control: no-store, private\r\n"
_CODECS = {}         # encoding -> (decode, encode)
cdef dict _heads = _HEADS
cdef dict _codecs_by_enc = _CODECS


def _codecs(str encoding):
    """(decode, encode) of the L1 codec for ``encoding`` (fixed names, DESIGN.md §8)."""
    pair = _codecs_by_enc.get(encoding)
    if pair is None:
        pair = _codecs_by_enc[encoding] = _load_codec(encoding)
    return pair


def _load_codec(str encoding):
    if encoding == "wbxml":
        from dmengine import _wbxml as mod
    else:
        try:
            from dmengine import xmlcodec as mod
        except ImportError:             # the XML codec may be the Cython one only
            from dmengine import _xml as mod
    return mod.decode, mod.encode


_TOKEN_POOL = []
cdef list _token_pool = _TOKEN_POOL


def _token():
    """An opaque session token: 96 random bits, URL-safe (16 characters).  Drawn from
    ``os.urandom`` 256 at a time (one system call instead of one per session)."""
    cdef str raw
    cdef Py_ssize_t i = 0, n
    if not _token_pool:
        raw = urlsafe_b64encode(os.urandom(12 * 256)).decode("ascii")
        # typed slices in a C loop (a generator expression of slices cost ~1,400
        # instructions per token, more than the rest of the session table's work)
        n = len(raw)
        while i < n:
            _token_pool.append(raw[i:i + 16])
            i += 16
    return _token_pool.pop()


def _ended(session):
    return bool(getattr(session, "ended", False))


def _end_reason(events):
    for ev in events or ():
        if type(ev).__name__ == "SessionEnded":
            reason = getattr(ev, "reason", None)
            if reason:
                return str(reason)
    return "completed"


def _is_package1(Message msg):
    cdef Command cmd
    for o in msg.commands or ():
        cmd = <Command?>o
        if cmd.name == "Alert" and cmd.data in ("1200", "1201"):
            return True
    return False


def _clean_end(Message msg, str server_uri, status):
    """A reply that ends the device's session cleanly: Status for its SyncHdr + Alert 1223."""
    cdef SyncHdr hdr = msg.hdr
    return Message(
        hdr=SyncHdr(ver_dtd=hdr.ver_dtd or "1.2", ver_proto=hdr.ver_proto or "DM/1.2",
                    session_id=hdr.session_id, msg_id="1", target=hdr.source,
                    source=server_uri),
        commands=[
            Command(name="Status", cmd_id="1", msg_ref=hdr.msg_id, cmd_ref="0", cmd="SyncHdr",
                    target_refs=[hdr.target] if hdr.target else None,
                    source_refs=[hdr.source] if hdr.source else None, data=str(int(status))),
            Command(name="Alert", cmd_id="2", data=str(int(AlertCode.SESSION_ABORT))),
        ],
        final=True)


def _error_reply(session, Message msg, str server_uri, exc):
    """The engine's error reply (Status with the status it named, Alert 1223, Final)."""
    cdef SyncHdr hdr
    error_reply = getattr(session, "error_reply", None)
    if error_reply is not None:
        try:
            return error_reply(exc)
        except Exception:
            log.debug("error_reply failed", exc_info=True)
    status = str(int(exc.status))
    try:
        reply = session.abort(str(exc))
    except Exception:
        return _clean_end(msg, server_uri, exc.status)
    cmds = reply.commands or []
    for cmd in cmds:
        if cmd.name == "Status" and cmd.cmd_ref == "0":
            cmd.data = status
            break
    else:
        hdr = msg.hdr
        cmds.insert(0, Command(name="Status", cmd_id="0", msg_ref=hdr.msg_id, cmd_ref="0",
                               cmd="SyncHdr",
                               target_refs=[hdr.target] if hdr.target else None,
                               source_refs=[hdr.source] if hdr.source else None, data=status))
        for i, cmd in enumerate(cmds, 1):
            cmd.cmd_id = str(i)
        reply.commands = cmds
    return reply


cdef inline double _wall_time():
    """``time.time()`` without the module attribute look-up and call (~550 instructions)."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Entry:
    """One DM session in the table: kept small, there may be 100k of these parked."""
    cdef public object session
    cdef public str token
    cdef public str key                 # "devid\0sessionid" once known
    cdef public double deadline
    cdef public int busy                # requests of this session being processed
    cdef public bint inserted           # in the session table
    cdef public bint closed
    cdef public int auth_failures       # failed tries of this session (forgiven if it succeeds)
    cdef public double t0               # metrics: when it started (monotonic; 0: not timed)

    def __init__(self, session, str token, double deadline):
        self.session = session
        self.token = token
        self.deadline = deadline


cdef class ServerCore:
    """What ``DmServer`` does on every DM message.  The fields are DmServer's attributes of the
    same names (set by its ``__init__``)."""
    cdef public object config, handler, _loop
    # typed: a message is counted with C calls (_metrics.pxd); None without metrics
    cdef public DeviceCounters metrics
    cdef public dict sessions, by_key, _session_configs
    cdef public object _session_config, _new_token, _session_factory, _checked_cls
    cdef public object guard            # AuthGuard: failed-authentication backoff (or None)
    cdef public bint draining, _take_events, _keep_bytes

    cpdef _config_for_sessions(self, str base_url):
        """The SessionConfig given in ServerConfig, else one per base URL (the server URI a
        device addressed is the one our replies name as Source)."""
        if self._session_config is not None:
            return self._session_config
        cfg = self._session_configs.get(base_url)
        if cfg is None:
            from dmengine._session import SessionConfig
            cfg = SessionConfig(
                server_id=self.config.server_id, server_uri=base_url,
                max_msg_size=self.config.max_msg_size, require_auth=self.config.require_auth)
            if len(self._session_configs) < 64:
                self._session_configs[base_url] = cfg
        return cfg

    def _new_session(self, str base_url, double now_wall, str encoding):
        cdef Entry entry
        if self._new_token is _token and _token_pool:
            token = _token_pool.pop()
        else:
            token = self._new_token()
        while token in self.sessions:
            token = self._new_token()
        resp_uri = f"{base_url}/{token}"
        cfg = self._config_for_sessions(base_url)
        factory = self._session_factory
        if factory is None:
            from dmengine._session import DmSession
            factory = self._session_factory = DmSession
            self._take_events = hasattr(DmSession, "take_events")
        session = factory(cfg, session_key=token, resp_uri=resp_uri, now=now_wall,
                          encoding=encoding)
        cls = type(session)
        if cls is not self._checked_cls:       # what the engine offers: once per class
            self._checked_cls = cls
            if self._take_events and not hasattr(session, "take_events"):
                self._take_events = False
            if self._keep_bytes and not hasattr(session, "keep_reply_bytes"):
                self._keep_bytes = False
        # not in the table yet: a session that ends with its first reply never enters it
        entry = Entry(session, token, 0.0)
        if self.metrics is not None:
            entry.t0 = self.metrics.begin_session()
        return entry

    async def handle_dm(self, req, str encoding, token, str base_url, address=None):
        """Decode, run the session, encode.  Returns the whole HTTP response.  ``address``:
        the peer's key, for the authentication backoff."""
        cdef Message msg
        cdef SyncHdr hdr
        cdef Entry entry = None
        cdef double now_wall
        cdef DeviceCounters metrics = self.metrics
        body = req.body
        if type(body) is not bytes:
            body = bytes(body) if body is not None else b""
        if metrics is not None:
            metrics.count_in(encoding, len(body))
        pair = _codecs_by_enc.get(encoding)
        if pair is None:
            pair = _codecs(encoding)
        decode, encode = pair
        try:
            msg = decode(body)
        except CodecError as exc:
            if metrics is not None:
                metrics.codec_error(encoding)
            return _http(400, f"not a SyncML DM message: {exc}\n".encode(), close=False)
        hdr = msg.hdr
        now_wall = _wall_time()
        if token is not None:
            entry = self.sessions.get(token)
            if (entry is None or not getattr(entry.session, "authenticated", True)) \
                    and self.guard is not None:
                out = self._backoff(req, address, hdr.source)
                if out is not None:
                    return out
            if entry is None:
                if _is_package1(msg) and not self.draining and hdr.msg_id == "1":
                    if len(self.sessions) >= self.config.max_sessions:
                        return self._busy(req)
                    entry = self._new_session(base_url, now_wall, encoding)   # a fresh start
                else:
                    return self._reply(encoding, encode,
                                       _clean_end(msg, base_url, StatusCode.NOT_FOUND), req)
        else:
            # The bare path only ever starts a session: a live one is reached through its
            # RespURI token alone (Source and SessionID are no secret: package #0 carries the
            # SessionID).  A package 1 naming a live session's Source and SessionID replaces it
            # once it has authenticated (below), not before.
            if self.draining:
                return _http(503, b"shutting down\n", close=True,
                             extra=[("Retry-After", str(self.config.retry_after))])
            if len(self.sessions) >= self.config.max_sessions:
                return self._busy(req)
            if self.guard is not None:
                out = self._backoff(req, address, hdr.source)
                if out is not None:
                    return out
            entry = self._new_session(base_url, now_wall, encoding)
        session = entry.session
        was_authenticated = getattr(session, "authenticated", True)
        entry.busy += 1
        try:
            hmac = req.hmac.decode("latin-1") if req.hmac is not None else None
            handler = self.handler
            account = await handler.account_for(hdr.source, hdr.source_name)
            try:
                events = session.receive(msg, now=now_wall, account=account,
                                         hmac_header=hmac, body=body)
            except ProtocolError as exc:
                reply = _error_reply(session, msg, base_url, exc)
                if self._take_events:
                    more = session.take_events()
                    if more:
                        await handler.on_events(session, more)
                self._end_entry(entry, "protocol_error")
                return self._reply(encoding, encode, reply, req)
            if not was_authenticated:
                self._count_auth(entry, events, address, hdr.source, session)
            if entry.key is None and token is None and getattr(session, "authenticated", False):
                # before the services hear of it: the session it replaces lets go of its work
                self._claim_key(entry, f"{hdr.source}\0{hdr.session_id}")
            if events:
                await handler.on_events(session, events)
            out = session.replay_bytes() if self._keep_bytes else None
            if out is not None:       # a retransmission: the same bytes again
                if entry.inserted and entry.token in self.sessions:
                    self._touch(entry)
                return self._reply(encoding, encode, None, req, session, out)
            reply = session.next_message(now=now_wall)
            if self._take_events:
                more = session.take_events()
                if more:
                    await handler.on_events(session, more)
                    events = more
        except Exception as exc:   # an engine or handler fault ends this session only
            if isinstance(exc, DmError):
                # the label, not the token: the token alone reaches the live session
                log.info("session %s failed: %s", session_label(entry.token), exc)
            else:
                log.exception("session %s failed", session_label(entry.token))
            reply = _clean_end(msg, base_url, getattr(exc, "status", StatusCode.SERVER_FAILURE))
            self._end_entry(entry, "error")
            return self._reply(encoding, encode, reply, req)
        finally:
            entry.busy -= 1
        if getattr(session, "ended", False):
            reason = getattr(session, "end_reason", None) or _end_reason(events)
            if entry.inserted:
                self._end(entry.token, reason)
            elif not entry.closed:
                entry.closed = True
                if metrics is not None:
                    metrics.end_session(reason, entry.t0)
        elif entry.inserted:
            if entry.token in self.sessions:
                self._touch(entry)
        elif not entry.closed:
            self._insert(entry)
        out = encode(reply)
        if self._keep_bytes and not entry.closed:
            session.keep_reply_bytes(out)      # kept for a retransmission instead of the model
        return self._reply(encoding, encode, reply, req, session, out)

    cdef _backoff(self, req, address, source):
        """503 + Retry-After while ``address`` or the account ``source`` names is in its
        failed-authentication backoff (no credential is even looked at), else None."""
        guard = self.guard
        if not guard.accounts and not guard.addresses:
            return None     # AuthGuard.blocked's own first test (nobody failed lately), uncalled
        wait = guard.blocked(address, source)
        if wait <= 0:
            return None
        if self.metrics is not None:
            self.metrics.rejected("auth_backoff")
        return _http(503, b"too many failed authentications\n", close=not req.keep_alive,
                     extra=[("Retry-After", str(int(wait) + 1))])

    cdef _count_auth(self, Entry entry, events, address, source, session):
        """Failed and successful authentications of a message, for the backoff and metrics.
        A session that fails and then authenticates (a device with a stale nonce answers the
        challenge) is no guessing: its failures are taken back from its address's count."""
        guard = self.guard
        for ev in events or ():
            if type(ev) is AuthFailed and ev.side == "client":
                entry.auth_failures += 1
                if guard is not None:
                    guard.failed(address, source)
                if self.metrics is not None:
                    self.metrics.auth_failed(ev.scheme, ev.reason)
        if guard is not None and getattr(session, "authenticated", False) \
                and (entry.auth_failures or guard.accounts):
            # (succeeded() clears the account's count and forgives this session's failures:
            # with neither there is nothing to do, and no Python call per message)
            guard.succeeded(address, source, entry.auth_failures)

    cdef _claim_key(self, Entry entry, str key):
        """An authenticated session started on the bare path: it now stands for its device's
        Source and SessionID, and a session that did before (the device restarted) ends."""
        old = self.by_key.get(key)
        entry.key = key
        if old is not None and old != entry.token:
            self._end(old, "restarted")
        if entry.inserted:
            self.by_key[key] = entry.token

    def _busy(self, req):
        """503 for the session cap, when a request reached it past admission (a package 1 on a
        RespURI path of a session that is gone, or sessions added while it was read)."""
        if self.metrics is not None:
            self.metrics.rejected("sessions")
        return _http(503, b"server busy\n", close=not req.keep_alive,
                     extra=[("Retry-After", str(self.config.retry_after))])

    def _reply(self, str encoding, encode, reply, req, session=None, out=None):
        if out is None:
            out = encode(reply)
        if self.metrics is not None:
            self.metrics.count_out(encoding, len(out))
        ctype = req.ctype or b"application/vnd.syncml.dm+xml"
        head = _heads.get(ctype)
        if head is None:            # the head up to the length, built once per media type
            head = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            if len(_heads) < 16:
                _heads[ctype] = head
        extra = b"" if req.keep_alive else b"Connection: close\r\n"
        if session is not None and getattr(session, "auth_scheme", None) == "hmac":
            mac = session.reply_hmac_header(out)
            if mac is not None:
                extra += b"x-syncml-hmac: " + mac.encode("latin-1") + b"\r\n"
        # joined, not %-formatted (the formatting cost ~1,900 instructions a reply)
        cdef char digits[24]
        cdef int n = snprintf(digits, 24, "%zd", <Py_ssize_t>len(out))
        return b"".join((head, digits[:n], _REPLY_MID, extra, b"\r\n", out))
