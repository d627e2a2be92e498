# cython: language_level=3
"""The per-message part of the virtual device's sans-IO DM client, compiled.

``ClientBase`` holds the state of one ``device.ClientSession`` (typed fields) and its
per-message methods: set-up, ``first`` (package 1 from the device's encoded template),
``receive``, ``next``, ``_finish`` and the SyncHdr status.  ``device.ClientSession``
subclasses it with everything else (building and splitting messages, large objects,
executing server commands); the methods here call into it for what is not the common
case.  Also here: the small helpers both need (``Outgoing``, ``Template``, headers).
"""
import random
from binascii import a2b_base64
from binascii import b2a_base64 as _b2a_base64
try:                                   # CPython's own MD5: less per-call overhead than
    from _md5 import md5 as _md5       # OpenSSL's for a 40-byte input
except ImportError:
    from hashlib import md5 as _md5

from dmengine._message cimport Chal, Command as _Command, Message, Meta, SyncHdr

from .. import auth
from ..errors import CodecError
from ..message import Command
from ..status import AlertCode

CONTENT_TYPES = {"xml": "application/vnd.syncml.dm+xml",
                 "wbxml": "application/vnd.syncml.dm+wbxml"}
MAX_AUTH_ATTEMPTS = 3                  # package 1 re-sent at most this often after a challenge

cdef str _SESSION_ABORT = str(int(AlertCode.SESSION_ABORT))
cdef str _NEXT_MESSAGE = str(int(AlertCode.NEXT_MESSAGE))
cdef dict _TYPE_SCHEMES = auth.TYPE_SCHEMES

CODECS = {}
cdef dict _CODECS = CODECS


def codec(str encoding):
    """(decode, encode) of the codec for ``encoding`` (``xml`` or ``wbxml``)."""
    hit = _CODECS.get(encoding)
    if hit is not None:
        return hit
    if encoding == "wbxml":
        from .. import _wbxml as mod
    elif encoding == "xml":
        from .. import xmlcodec as mod
    else:
        from .device import SimulatorError
        raise SimulatorError(f"encoding must be xml or wbxml, not {encoding!r}")
    hit = _CODECS[encoding] = (mod.decode, mod.encode)
    return hit


HEADERS = {}
WIRE = {}
cdef dict _HEADERS = HEADERS
cdef dict _WIRE = WIRE


def base_headers(user_agent, content_type):
    """The device's own HTTP headers (one shared tuple per user agent and media type)."""
    key = (user_agent, content_type)
    hit = _HEADERS.get(key)
    if hit is None:
        hit = _HEADERS[key] = (("User-Agent", user_agent), ("Accept", content_type))
    return hit


def wire(tuple headers, content_type):
    """``headers`` plus the Content-Type (kept for the constant ones, not HMAC headers)."""
    w = headers + (("Content-Type", content_type),)
    if len(headers) == 2:
        _WIRE[headers] = w
    return w


def status(msg_ref, cmd_ref, cmd, code, *, targets=None, sources=None):
    cdef _Command st = _Command.__new__(_Command)      # Command(...) without its keywords
    st.name = "Status"
    st.msg_ref = msg_ref
    st.cmd_ref = cmd_ref
    st.cmd = cmd
    st.target_refs = targets
    st.source_refs = sources
    st.data = str(code)
    return st


cdef class Outgoing:
    """One message to POST: ``headers`` are the device's own, ``wire_headers`` add the
    Content-Type (what the HTTP client sends)."""


    def __init__(self, body, content_type, headers, url):
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.url = url
        w = _WIRE.get(headers)
        self.wire_headers = w if w is not None else wire(headers, content_type)


cdef class Template:
    """An encoded package 1 in pieces around its session ID, Cred Data and alert code."""


    def __init__(self, tuple parts, bint with_cred):
        self.parts = parts
        self.with_cred = with_cred
        self.alerts = {}

    def fill(self, str session_id, cred, alert):
        """The package with these values (``cred``: str, or bytes already encoded)."""
        a = self.alerts.get(alert)
        if a is None:
            a = self.alerts[alert] = str(alert).encode()
        p = self.parts
        if self.with_cred:
            c = cred if type(cred) is bytes else (<str>cred).encode()
            return b"".join((p[0], session_id.encode(), p[1], c, p[2], a, p[3]))
        return b"".join((p[0], session_id.encode(), p[1], a, p[2]))


cdef class ClientBase:
    """State and per-message methods of a ``device.ClientSession`` (see the module's doc).
    Its fields are declared in _client.pxd."""


    def __init__(self, device, *, session_id=None, alert=1201, url=None, rng=None):
        prof = device.profile
        self.device = device
        self.profile = prof
        if rng is None:
            rng = random.Random()
        self.rng = rng
        self.session_id = session_id or format(rng.getrandbits(16) % 0xFFFF + 1, "X")
        self.alert = alert
        self.url = url or prof.server_url
        enc = self.encoding = prof.encoding
        self.content_type = CONTENT_TYPES[enc]
        pair = _CODECS.get(enc)
        if pair is None:
            pair = codec(enc)
        self._decode, self._encode = pair
        self.msg_id = 0
        self.server_msg_id = None
        self.server_max_msg = 0              # server's MaxMsgSize (0 = unknown)
        self.server_max_obj = 0
        scheme = self.auth_scheme = prof.auth
        self.authenticated = scheme == "none"
        self.auth_attempts = 0
        self.outbox = []                     # commands waiting for the next message(s)
        self.hdr_status = None
        self.done = False
        self.outcome = None
        self.detail = ""
        self.jobs = []                       # jobs created in this session, not yet run
        self.in_chunk = None
        self.out_chunks = []
        self.want_final = True               # our package is complete after this message
        self.package1_pending = True         # package 1 (Alert + DevInfo) must be (re)sent
        self.sent_alerts = []
        self.messages_sent = 0
        self.messages_received = 0
        self.results = []                    # (cmd name, status) we answered, for tests
        self.server_authenticated = None
        self._continuations = set()          # ids of large-object remainders
        self.server_final = True             # no Final from us while the server's package goes on
        self.last_sent = None

    # --- building messages ---------------------------------------------------------------

    def _finish(self, data):
        headers = base_headers(self.profile.user_agent, self.content_type)
        if self.auth_scheme == "hmac":
            dev = self.device
            secret = dev.client_secret + ("-wrong" if dev.faults.wrong_credentials else "")
            mac = auth.hmac_mac(dev.username, secret, dev.client_nonce, data)
            headers = headers + (("x-syncml-hmac", auth.format_hmac_header(dev.username, mac)),)
        self.messages_sent += 1
        out = Outgoing(data, self.content_type, headers, self.url)
        self.last_sent = out
        return out

    # --- the API --------------------------------------------------------------------------

    def first(self):
        """Package 1."""
        dev = self.device
        dev.sessions += 1
        self.package1_pending = False
        if dev.pending_alerts or self.hdr_status is not None or self.outbox or \
                self.out_chunks or self.server_max_msg:
            self.outbox = self._package1()
            return self._build()
        # the common case: Alert and the DevInfo Replace under a fresh header, from the
        # device's encoded template with the session ID, credentials and alert code filled in
        scheme = self.auth_scheme
        prof = self.profile
        key = (self.url, scheme, self.encoding, prof.max_msg_size, prof.max_obj_size,
               prof.man, prof.mod, prof.lang, dev.username, dev.dev_id)
        hit = dev._pkg1
        if hit is None or hit[0] != key:
            # the first package 1 with these values is encoded as it is: the template costs
            # three encodes (cut out, then checked twice) and pays from the device's second
            # session on, while most phones of a campaign have one
            dev._pkg1 = (key, False)
            tpl = None
        else:
            if hit[1] is False:
                hit = dev._pkg1 = (key, self._pkg1_template())
            tpl = hit[1]
        if tpl is None:
            return self._finish(self._encode(self._pkg1_message(self.session_id, None,
                                                                str(self.alert))))
        self.msg_id = 1
        if scheme == "md5":
            secret = dev.client_secret + "-wrong" if dev.faults.wrong_credentials \
                else dev.client_secret
            k = dev._md5k
            if k is not None and k[1] == secret and k[0] == dev.username:
                # VirtualDevice.md5_cred inline, as bytes for the template
                cred = _b2a_base64(_md5((<bytes>k[2]) + b":" + dev.client_nonce).digest(),
                                   newline=False)
            else:
                cred = dev.md5_cred(secret)
        elif scheme == "basic":
            cred = auth.basic_cred(dev.username, dev.client_secret + "-wrong"
                                   if dev.faults.wrong_credentials else dev.client_secret)
        else:
            cred = None
        return self._finish((<Template>tpl).fill(self.session_id, cred, self.alert))

    def next(self):
        """The next message to send, or None when the session is over."""
        if self.done:
            return None
        if self.sent_alerts or not self.device.pending_alerts:
            pass
        elif self.profile.report_in_same_session:
            self.outbox.extend(self.device.pending_alerts)
            self.sent_alerts = list(self.device.pending_alerts)
        if not self.outbox and not self.out_chunks and self.hdr_status is None:
            self._end("completed")
            return None
        return self._build()

    def _end(self, outcome, detail=""):
        if not self.done:
            self.done = True
            self.outcome = outcome
            self.detail = detail

    def receive(self, body):
        """Processes one server message; afterwards call ``next()`` (after running ``jobs``)."""
        self.messages_received += 1
        cdef list outbox = self.outbox
        cdef bint sending = bool(outbox or self.out_chunks)  # our package is still going out
        cdef Message msg
        cdef SyncHdr hdr
        cdef Meta meta
        cdef _Command cmd
        cdef str name
        try:
            msg = self._decode(body)
        except CodecError as exc:
            self._end("error", f"undecodable server message: {exc}")
            return
        hdr = msg.hdr
        msg_id = self.server_msg_id = hdr.msg_id
        final = msg.final
        if not sending:   # "next message" answers to our own package don't reopen theirs
            self.server_final = bool(final)
        resp_uri = hdr.resp_uri
        if resp_uri:
            self.url = resp_uri
        meta = hdr.meta
        if meta is not None:
            v = meta.max_msg_size
            if v and v.isdigit():
                self.server_max_msg = int(v)
            v = meta.max_obj_size
            if v and v.isdigit():
                self.server_max_obj = int(v)
        if hdr.cred is None:
            hdr_code = 200
        elif not self.profile.verify_server:
            hdr_code = 212                # AUTHENTICATION_ACCEPTED, as _check_server says
        else:
            hdr_code = self._check_server(hdr)
        self.hdr_status = None          # built below unless the session ends here
        cdef bint had_commands = False
        cdef bint challenged = False
        cdef bint aborted = False
        cdef list replies = []
        cdef list sent_alerts = self.sent_alerts
        commands = msg.commands
        if commands:
            for o in commands:
                cmd = <_Command?>o
                name = cmd.name
                if name == "Status":
                    if cmd.cmd_ref == "0":
                        if self._on_hdr_status(cmd):
                            challenged = True
                    elif sent_alerts and cmd.cmd == "Alert":
                        self._on_status(cmd)
                    continue
                if name == "Results":
                    continue
                had_commands = True
                if name == "Alert" and cmd.data == _SESSION_ABORT:
                    aborted = True
                    continue
                replies.extend(self._execute(cmd, msg_id))
        cdef bint done = self.done
        if not (aborted or done or challenged or replies or outbox or self.out_chunks
                or had_commands or (not final and not sending)):
            # a package with nothing to do ends the session; no bare Status goes back
            if not (self.device.pending_alerts and self.profile.report_in_same_session
                    and not sent_alerts):
                self._end("completed")
            return
        target = hdr.target
        source = hdr.source
        self.hdr_status = status(msg_id, "0", "SyncHdr", hdr_code,
                                 targets=[target] if target else None,
                                 sources=[source] if source else None)
        if aborted:
            self._end("aborted", "server sent Alert 1223")
            return
        if done:
            return
        if challenged:
            if self.auth_attempts >= MAX_AUTH_ATTEMPTS:
                self._end("auth_failed", "still challenged after re-sending credentials")
                return
            # back to package 1 with the new credentials (PROTOCOL.md §4)
            self.outbox = self._package1() + self.outbox
            return
        self.outbox.extend(replies)
        if not final and not sending:
            # the server's package goes on: ask for the next message
            self.outbox.append(Command(name="Alert", data=_NEXT_MESSAGE))

    def _on_hdr_status(self, _Command st):
        """Our SyncHdr's status: returns True when the server challenged us."""
        cdef Chal chal
        cdef Meta cmeta
        data = st.data
        cdef long code = 212 if data == "212" else _int(data)
        chal = st.chal
        if chal is not None:
            cmeta = chal.meta
            if cmeta is not None:
                nn = cmeta.next_nonce
                if nn:
                    try:
                        self.device.client_nonce = a2b_base64(nn.strip(), strict_mode=True)
                    except ValueError:       # binascii.Error / non-ASCII: the nonce stays
                        pass
                if code == 401 or code == 407:
                    scheme = _TYPE_SCHEMES.get((cmeta.type or "").lower())
                    if scheme is not None:
                        self.auth_scheme = scheme
        if code == 212:
            self.authenticated = True
        elif code == 200:
            self.authenticated = self.auth_scheme != "hmac" and self.authenticated
        elif code == 401 or code == 407:
            self.authenticated = False
            self.auth_attempts += 1
            return True
        return False


cdef long _int(text) except? -1:
    try:
        return int(text)
    except (TypeError, ValueError, OverflowError):
        return 0
