"""Random legal and illegal message orders against one DmSession (hypothesis RuleBasedStateMachine).

Invariant: receive() returns events or raises ProtocolError carrying the status to send (and the
session is then ENDED); next_message()/abort() give a message both codecs can encode, within the
device's MaxMsgSize; nothing else ever escapes.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dmengine import _wbxml, auth, xmlcodec
from dmengine._message import Chal, Command, Cred, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, SessionConfig, SessionState, ui_alert
from dmengine.errors import CommandRejected, ProtocolError
from dmengine.events import EVENT_TYPES, NonceIssued

IMEI = "IMEI:004999010640000"
SERVER = "https://dm.example.com/dm"

alert_codes = st.sampled_from(["1200", "1201", "1222", "1223", "1224", "1225", "1226", "1100", "1101",
                               "4711", "", "abc", None])
status_codes = st.sampled_from(["200", "202", "212", "213", "215", "304", "401", "407", "424", "500",
                                "x", None])
small_text = st.text(alphabet="abcXYZ019./:-&<> é", max_size=12)
uris = st.sampled_from(["./DevInfo/Mod", "./DevInfo/DevId", "./FUMO/1", "./Vendor/X", "DevInfo/Lang", None])
refs = st.sampled_from(["0", "1", "2", "3", "4", "5", "7", None])


@st.composite
def items(draw, max_items=3):
    out = []
    for _ in range(draw(st.integers(0, max_items))):
        meta = draw(st.one_of(st.none(), st.builds(Meta, type=st.sampled_from(["t.x", None]),
                                                    format=st.sampled_from(["chr", "b64", "int", None]),
                                                    size=st.sampled_from(["4", "8", "100", "99999999", "zz", None]))))
        out.append(Item(source=draw(uris), target=draw(uris), meta=meta,
                        data=draw(st.one_of(st.none(), small_text, st.binary(max_size=8))),
                        more_data=draw(st.booleans())))
    return out or None


@st.composite
def device_commands(draw):
    cmds = []
    for n in range(1, draw(st.integers(0, 5)) + 1):
        kind = draw(st.sampled_from(["Alert", "Status", "Results", "Replace", "Get", "Exec",
                                     "Atomic", "Add", "Sequence"]))
        cid = draw(st.sampled_from([str(n), str(n), "", None]))
        if kind == "Alert":
            cmds.append(Command(name="Alert", cmd_id=cid, data=draw(alert_codes),
                                correlator=draw(st.sampled_from([None, "c1"])), items=draw(items())))
        elif kind == "Status":
            cmds.append(Command(name="Status", cmd_id=cid, msg_ref=draw(refs), cmd_ref=draw(refs),
                                cmd=draw(st.sampled_from(["SyncHdr", "Get", "Alert", "Replace", None])),
                                data=draw(status_codes), items=draw(items(2)),
                                chal=draw(st.sampled_from([None, Chal(meta=Meta(next_nonce="AAECAwQFBgcICQoLDA0ODw==")),
                                                           Chal(meta=Meta(next_nonce="!!"))]))))
        elif kind == "Results":
            cmds.append(Command(name="Results", cmd_id=cid, msg_ref=draw(refs), cmd_ref=draw(refs),
                                meta=draw(st.sampled_from([None, Meta(format="b64")])), items=draw(items())))
        elif kind in ("Atomic", "Sequence"):
            cmds.append(Command(name=kind, cmd_id=cid, commands=[Command(name="Get", cmd_id="9",
                                                                         items=draw(items(1)))]))
        else:
            cmds.append(Command(name=kind, cmd_id=cid, items=draw(items())))
    return cmds


class SessionMachine(RuleBasedStateMachine):
    @initialize(encoding=st.sampled_from(["xml", "wbxml"]), require=st.sampled_from(["md5", "none", "hmac"]),
                limit=st.sampled_from([None, "3000", "8000"]))
    def setup(self, encoding, require, limit):
        self.enc = encoding
        self.codec = xmlcodec if encoding == "xml" else _wbxml
        self.require = require
        self.limit = limit
        cfg = SessionConfig(server_id="acme-dms", server_uri=SERVER, encoding=encoding, require_auth=require)
        self.s = DmSession(cfg, session_key="st", resp_uri=SERVER + "/st", now=0)
        self.acc = auth.DmAccount(dev_id=IMEI, username="u1", client_secret="pw", client_nonce=b"n" * 16,
                                  server_id="acme-dms", server_secret="srv", server_nonce=b"s" * 16)
        self.msg_id = 0
        self.now = 0.0
        self.last = None
        self.reply = None
        self.handle = 0

    # -- helpers ------------------------------------------------------------------------

    def _message(self, commands, final, *, msg_id=None, good=True, session_id="5F", source=IMEI,
                 ver="1.2"):
        if msg_id is None:
            self.msg_id += 1
            msg_id = str(self.msg_id)
        hdr = SyncHdr(ver_dtd=ver, ver_proto="DM/1.2", session_id=session_id, msg_id=msg_id,
                      target=SERVER, source=source, source_name="u1",
                      meta=Meta(max_msg_size=self.limit) if self.limit else None)
        nonce = self.acc.client_nonce if good else b"bad-nonce-000000"
        if self.require == "md5":
            hdr.cred = Cred(meta=Meta(format="b64", type="syncml:auth-md5"), data=auth.md5_digest("u1", "pw", nonce))
        msg = Message(hdr=hdr, commands=commands, final=final)
        body = _wbxml.encode(msg)          # the exact bytes the HMAC covers (WBXML carries any Data)
        mac = auth.format_hmac_header("u1", auth.hmac_mac("u1", "pw", nonce, body))
        return msg, body, mac

    def _receive(self, msg, body, mac, reply=True):
        self._receive_only(msg, body, mac)
        if reply and not self.s.ended and self.s.state.name.startswith("OWE_"):
            self.next_message()                    # a polite server answers at once

    def _receive_only(self, msg, body, mac):
        self.now += 1
        self.last = (msg, body, mac)
        try:
            events = self.s.receive(msg, now=self.now, account=self.acc,
                                    hmac_header=mac if self.require == "hmac" else None, body=body)
        except ProtocolError as exc:
            assert isinstance(exc.status, int) and 400 <= exc.status <= 599
            assert self.s.state is SessionState.ENDED
            self._check_message(self.s.error_reply(exc), limit=False)
            return
        assert isinstance(events, list)
        for e in events:
            assert isinstance(e, EVENT_TYPES), e
            if isinstance(e, NonceIssued):
                self.acc.client_nonce = e.nonce

    def _check_message(self, m, limit=True):
        assert isinstance(m, Message)
        out = self.codec.encode(m)
        (_wbxml if self.codec is xmlcodec else xmlcodec).encode(m)
        if limit and self.s.peer_max_msg_size and len(m.commands) > 2:
            assert len(out) <= self.s.peer_max_msg_size, (len(out), self.s.peer_max_msg_size)

    def _status_for_reply(self):
        if self.reply is None:
            return []
        r = self.reply
        out = [Command(name="Status", cmd_id="1", msg_ref=r.hdr.msg_id, cmd_ref="0", cmd="SyncHdr", data="212")]
        for c in r.commands:
            if c.name not in ("Status",):
                out.append(Command(name="Status", cmd_id=str(len(out) + 1), msg_ref=r.hdr.msg_id,
                                   cmd_ref=c.cmd_id, cmd=c.name,
                                   data="213" if c.items and c.items[-1].more_data else "200"))
        return out

    # -- the device ------------------------------------------------------------------------

    @precondition(lambda self: not self.s.ended)
    @rule(final=st.sampled_from([True, True, False]), good=st.sampled_from([True, True, True, False]),
          extra=st.one_of(st.just([]), device_commands()),
          work=st.lists(st.sampled_from(["get", "replace", "big", "exec", "atomic", "ui"]), max_size=4))
    def package1(self, final, good, extra, work):
        for kind in work:                         # the broker has tasks waiting for this device
            self.queue(kind)
        cmds = [Command(name="Alert", cmd_id="1", data="1201"),
                Command(name="Replace", cmd_id="2", items=[Item(source="./DevInfo/DevId", data=IMEI)])] + extra
        self._receive(*self._message(cmds, final, good=good))

    @precondition(lambda self: not self.s.ended)
    @rule(final=st.booleans(), next_alert=st.booleans())
    def answer_reply(self, final, next_alert):
        cmds = self._status_for_reply()
        if next_alert:
            cmds.append(Command(name="Alert", cmd_id=str(len(cmds) + 1), data="1222"))
        self._receive(*self._message(cmds, final))

    @precondition(lambda self: not self.s.ended)
    @rule(cmds=device_commands(), final=st.booleans(), good=st.sampled_from([True, True, False]))
    def random_message(self, cmds, final, good):
        self._receive(*self._message(cmds, final, good=good))

    @rule(msg_id=st.sampled_from(["0", "1", "x", "", "99999999999999999999"]),
          session_id=st.sampled_from(["5F", "other"]), source=st.sampled_from([IMEI, "IMEI:1"]),
          ver=st.sampled_from(["1.2", "1.1", None]), cmds=device_commands())
    def odd_header(self, msg_id, session_id, source, ver, cmds):
        self._receive(*self._message(cmds, True, msg_id=msg_id, session_id=session_id, source=source, ver=ver))

    @rule()
    def retransmit(self):
        if self.last is not None:
            before = self.s.state
            self._receive_only(*self.last)
            assert self.s.state in (before, SessionState.ENDED)

    @rule()
    def after_the_end(self):
        if self.s.ended:
            self._receive(*self._message(self._status_for_reply(), True))

    @precondition(lambda self: not self.s.ended)
    @rule()
    def abort_by_device(self):
        self._receive(*self._message([Command(name="Alert", cmd_id="1", data="1223")], True))

    # -- the server side -------------------------------------------------------------------

    @rule(kind=st.sampled_from(["get", "replace", "big", "exec", "atomic", "ui", "bad"]))
    def queue_rule(self, kind):
        self.queue(kind)

    def queue(self, kind):
        self.handle += 1
        cmd = {
            "get": Command(name="Get", items=[Item(target="./DevDetail/FwV")]),
            "replace": Command(name="Replace", items=[Item(target="./Vendor/A", data="v")]),
            "big": Command(name="Replace", meta=Meta(format="b64"), items=[Item(target="./FUMO/1/Update/PkgData",
                                                                              data="QUJD" * 2000)]),
            "exec": Command(name="Exec", correlator="c", items=[Item(target="./FUMO/1/Update")]),
            "atomic": Command(name="Atomic", commands=[Command(name="Add", items=[Item(target="./A", data="1")])]),
            "ui": ui_alert(1101, "ok?"),
            "bad": Command(name="Status"),
        }[kind]
        try:
            self.s.queue(self.handle, cmd)
        except CommandRejected:
            assert kind == "bad" or self.s.ended

    @rule()
    def next_message(self):
        self.now += 1
        try:
            m = self.s.next_message(now=self.now)
        except ProtocolError as exc:
            assert exc.status == 500                  # nothing received yet: no reply owed
            return
        self._check_message(m)
        self.reply = m
        for e in self.s.take_events():
            assert isinstance(e, EVENT_TYPES)

    @precondition(lambda self: not self.s.ended)
    @rule()
    def server_abort(self):
        try:
            m = self.s.abort("test")
        except ProtocolError:
            assert self.s.state in (SessionState.IDLE, SessionState.ENDED)
            return
        assert m.commands[-1].data == "1223" and self.s.ended
        self._check_message(m, limit=False)

    @precondition(lambda self: not self.s.ended)
    @rule()
    def close(self):
        ev = self.s.close("closed")
        assert all(isinstance(e, EVENT_TYPES) for e in ev) and self.s.ended

    @invariant()
    def state_is_a_state(self):
        if hasattr(self, "s"):
            assert self.s.state in SessionState
            assert (self.s.end_reason is not None) == (self.s.state is SessionState.ENDED) or \
                self.s.state in (SessionState.OWE_ABORT_ACK, SessionState.OWE_AUTH_END)


SessionMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestSession = SessionMachine.TestCase
