"""The state table (``_session.TRANSITIONS``): one test per row, driven by real messages, plus a
hypothesis sweep of every (state, input) pair (h2 tests/test_state_machines.py style)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis.strategies import sampled_from

from dmengine import auth, xmlcodec
from dmengine._message import Command, Cred, Item, Message, Meta, SyncHdr
from dmengine._session import (
    TRANSITIONS, Action, DmSession, SessionConfig, SessionInput, SessionState,
)
from dmengine.errors import ProtocolError
from dmengine.events import (
    AuthFailed, DeviceIdentified, NonceIssued, SessionEnded,
)

S, I, A = SessionState, SessionInput, Action
IMEI = "IMEI:490154203237518"
SERVER = "https://dm.example.com/dm"
WAITING = (S.WAIT_CLIENT, S.WAIT_NEXT_REQUEST, S.CLIENT_STREAMING)


class Device:
    """A scripted device talking to one DmSession with real credentials (MD5 or HMAC)."""

    def __init__(self, require="md5", max_auth=3, limit="2000"):
        self.cfg = SessionConfig(server_id="acme-dms", server_uri=SERVER, encoding="xml",
                                 require_auth=require, max_auth_attempts=max_auth)
        self.s = DmSession(self.cfg, session_key="t", resp_uri=SERVER + "/t", now=0)
        self.acc = auth.DmAccount(dev_id=IMEI, username="dev1", client_secret="pw-1",
                                  client_nonce=b"initial-nonce-16", server_id="acme-dms",
                                  server_secret="srv", server_nonce=b"server-nonce-016")
        self.require = require
        self.limit = limit
        self.msg_id = 0
        self.last = None
        self.reply = None
        self.now = 0.0

    def send(self, commands=(), *, final=True, good=True, same=False):
        self.now += 1
        if same:
            msg, body, mac = self.last
        else:
            self.msg_id += 1
            hdr = SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="77", msg_id=str(self.msg_id),
                          target=SERVER, source=IMEI, source_name="dev1",
                          meta=Meta(max_msg_size=self.limit))
            nonce = self.acc.client_nonce if good else b"wrong-nonce-0000"
            if self.require == "md5":
                hdr.cred = Cred(meta=Meta(format="b64", type="syncml:auth-md5"),
                                data=auth.md5_digest("dev1", "pw-1", nonce))
            msg = Message(hdr=hdr, commands=list(commands), final=final)
            body = xmlcodec.encode(msg)
            mac = auth.format_hmac_header("dev1", auth.hmac_mac("dev1", "pw-1", nonce, body))
        self.last = (msg, body, mac)
        ev = self.s.receive(msg, now=self.now, account=self.acc,
                            hmac_header=mac if self.require == "hmac" else None, body=body)
        for e in ev:
            if isinstance(e, NonceIssued):
                self.acc.client_nonce = e.nonce          # the caller persists the nonce
        return ev

    def next(self):
        self.now += 1
        self.reply = self.s.next_message(now=self.now)
        return self.reply

    def pkg1(self):
        return [Command(name="Alert", cmd_id="1", data="1201"),
                Command(name="Replace", cmd_id="2", items=[Item(source="./DevInfo/DevId", data=IMEI),
                                                           Item(source="./DevInfo/Mod", data="T-1")])]

    def status(self):
        r = self.reply
        return [Command(name="Status", cmd_id="1", msg_ref=r.hdr.msg_id, cmd_ref="0", cmd="SyncHdr",
                        target_refs=[IMEI], source_refs=[SERVER], data="212")]

    def alert(self, code, cmd_id="9"):
        return Command(name="Alert", cmd_id=cmd_id, data=str(code))

    def queue(self, n=1):
        for i in range(n):
            self.s.queue(("h", self.s.messages_sent, i),
                         Command(name="Replace", items=[Item(target=f"./Vendor/Node{i}", data="v" * 40)]))


def reach(state, d, how="two"):
    """Drives the device's session into ``state`` with real messages."""
    if state is S.IDLE:
        return
    if state in (S.AUTH_PENDING, S.OWE_CHALLENGE, S.OWE_AUTH_END):
        d.send(d.pkg1(), good=False)
        if state is S.AUTH_PENDING:
            d.next()
        return
    if state is S.OWE_ABORT_ACK:
        d.send([d.alert(1223, "1")])
        return
    if state in (S.OWE_NEXT, S.CLIENT_STREAMING):
        d.send(d.pkg1(), final=False)
        if state is S.CLIENT_STREAMING:
            d.next()
        return
    d.send(d.pkg1())
    if state is S.OWE_PACKAGE:
        return
    if state is S.ENDED:
        d.next()
        return
    if state is S.WAIT_CLIENT:
        d.queue(1)
        d.next()
        return
    if how == "statuses":                          # only Status overflows the first message
        d.s.close()
        d.__init__()
        d.send(d.pkg1() + [Command(name="Alert", cmd_id=str(10 + i), data="1226", items=[Item(
            source=f"./Vendor/Alert/{i}", meta=Meta(type="x.y.z", format="chr"), data="report")])
            for i in range(12)])
    else:                                          # a large object: 1 000 bytes = 2 chunks
        d.s.queue("big", Command(name="Replace", meta=Meta(format="chr"),
                                 items=[Item(target="./Vendor/Big", data="x" * (1000 if how == "two" else 6000))]))
    d.next()
    assert not d.reply.final
    if state is S.OWE_CONTINUATION:
        d.send(d.status() + [d.alert(1222)], final=False)


def feed(inp, state, d):
    """Applies ``inp`` through the public API; returns (events, message or None)."""
    if inp is I.START:
        return d.send(d.pkg1()), None
    if inp is I.START_PARTIAL:
        return d.send(d.pkg1(), final=False), None
    if inp is I.FINAL:
        return d.send(d.status()), None
    if inp is I.PARTIAL:
        return d.send(d.status(), final=False), None
    if inp is I.NEXT:
        return d.send(d.status() + [d.alert(1222)], final=False), None
    if inp is I.ABORT:
        return d.send([d.alert(1223, "1")]), None
    if inp is I.RETRANSMIT:
        return d.send(same=True), None
    if inp in (I.AUTH_FAIL, I.AUTH_EXHAUSTED):
        if state in WAITING:
            return d.send(d.status(), good=False), None
        return d.send(d.pkg1(), good=False), None
    if inp is I.SEND_FINAL:
        d.queue(1)
        return d.s.take_events(), d.next()
    if inp is I.SEND_PARTIAL:
        d.queue(60)
        return d.s.take_events(), d.next()
    if inp in (I.SEND_END, I.SEND_NEXT, I.SEND_CHALLENGE):
        m = d.next()
        return d.s.take_events(), m
    if inp is I.SERVER_ABORT:
        m = d.s.abort("test")
        return d.s.take_events(), m
    if inp is I.CLOSE:
        return d.s.close("closed"), None
    raise AssertionError(inp)


def device_for(state, inp):
    require = "hmac" if (state in WAITING and inp in (I.AUTH_FAIL, I.AUTH_EXHAUSTED)) else "md5"
    max_auth = 3
    if inp is I.AUTH_EXHAUSTED:
        max_auth = 2 if state is S.AUTH_PENDING else 1
    if state is S.OWE_AUTH_END:
        max_auth = 1
    return Device(require=require, max_auth=max_auth)


# The rows that matter, written down from PROTOCOL.md and not read from TRANSITIONS (issue 18: a
# test that takes its expectations from the table it checks cannot notice a wrong row).
EXPECTED = {
    # package 1 starts the session; a package 1 in several messages asks for the rest first
    (S.IDLE, I.START): (A.START, S.OWE_PACKAGE),
    (S.IDLE, I.START_PARTIAL): (A.START, S.OWE_NEXT),
    # wrong or missing credentials in package 1: challenge (401/407 + Chal), and the retry
    # after the challenge starts the session; too many failures end it
    (S.IDLE, I.AUTH_FAIL): (A.CHALLENGE, S.OWE_CHALLENGE),
    (S.IDLE, I.AUTH_EXHAUSTED): (A.AUTH_END, S.OWE_AUTH_END),
    (S.OWE_CHALLENGE, I.SEND_CHALLENGE): (A.SENT, S.AUTH_PENDING),
    (S.AUTH_PENDING, I.START): (A.START, S.OWE_PACKAGE),
    (S.AUTH_PENDING, I.AUTH_FAIL): (A.CHALLENGE, S.OWE_CHALLENGE),
    (S.AUTH_PENDING, I.AUTH_EXHAUSTED): (A.AUTH_END, S.OWE_AUTH_END),
    # once in session, a message that fails authentication ends the session (no new challenge)
    (S.WAIT_CLIENT, I.AUTH_FAIL): (A.AUTH_END, S.OWE_AUTH_END),
    (S.WAIT_NEXT_REQUEST, I.AUTH_FAIL): (A.AUTH_END, S.OWE_AUTH_END),
    (S.CLIENT_STREAMING, I.AUTH_FAIL): (A.AUTH_END, S.OWE_AUTH_END),
    (S.OWE_AUTH_END, I.SEND_END): (A.SENT, S.ENDED),
    # our package: complete (wait for the client's), in several messages (wait for 1222), or
    # nothing left to say (the session ends)
    (S.OWE_PACKAGE, I.SEND_FINAL): (A.SENT, S.WAIT_CLIENT),
    (S.OWE_PACKAGE, I.SEND_PARTIAL): (A.SENT, S.WAIT_NEXT_REQUEST),
    (S.OWE_PACKAGE, I.SEND_END): (A.SENT, S.ENDED),
    (S.WAIT_NEXT_REQUEST, I.NEXT): (A.PROCESS, S.OWE_CONTINUATION),
    (S.OWE_CONTINUATION, I.SEND_FINAL): (A.SENT, S.WAIT_CLIENT),
    (S.OWE_CONTINUATION, I.SEND_END): (A.SENT, S.ENDED),
    # the client's package 3: complete, or in several messages (we answer each with 1222)
    (S.WAIT_CLIENT, I.FINAL): (A.PROCESS, S.OWE_PACKAGE),
    (S.WAIT_CLIENT, I.PARTIAL): (A.PROCESS, S.OWE_NEXT),
    (S.OWE_NEXT, I.SEND_NEXT): (A.SENT, S.CLIENT_STREAMING),
    (S.CLIENT_STREAMING, I.FINAL): (A.PROCESS, S.OWE_PACKAGE),
    (S.CLIENT_STREAMING, I.PARTIAL): (A.PROCESS, S.OWE_NEXT),
    # the same message again (the reply was lost) gets the same reply, even after the end
    (S.WAIT_CLIENT, I.RETRANSMIT): (A.REPLAY, S.WAIT_CLIENT),
    (S.AUTH_PENDING, I.RETRANSMIT): (A.REPLAY, S.AUTH_PENDING),
    (S.ENDED, I.RETRANSMIT): (A.REPLAY, S.ENDED),
    # Alert 1223 from the device: acknowledge and end
    (S.IDLE, I.ABORT): (A.ABORT_ACK, S.OWE_ABORT_ACK),
    (S.WAIT_CLIENT, I.ABORT): (A.ABORT_ACK, S.OWE_ABORT_ACK),
    (S.OWE_ABORT_ACK, I.SEND_END): (A.SENT, S.ENDED),
    # our abort and the caller's close end the session from any live state
    (S.WAIT_CLIENT, I.SERVER_ABORT): (A.SERVER_ABORT, S.ENDED),
    (S.OWE_PACKAGE, I.CLOSE): (A.CLOSE, S.ENDED),
}
# …and pairs that must have no row (a protocol error ends the session)
NOT_ROWS = [(S.ENDED, I.START), (S.ENDED, I.FINAL), (S.WAIT_CLIENT, I.START),
            (S.WAIT_CLIENT, I.NEXT), (S.OWE_PACKAGE, I.FINAL), (S.IDLE, I.FINAL),
            (S.IDLE, I.RETRANSMIT), (S.WAIT_NEXT_REQUEST, I.START)]


@pytest.mark.parametrize("pair", list(EXPECTED), ids=[f"{s.name}-{i.name}" for s, i in EXPECTED])
def test_rows_that_matter_are_as_the_protocol_says(pair):
    assert TRANSITIONS.get(pair) == EXPECTED[pair]


@pytest.mark.parametrize("pair", NOT_ROWS, ids=[f"{s.name}-{i.name}" for s, i in NOT_ROWS])
def test_pairs_the_protocol_forbids_have_no_row(pair):
    assert pair not in TRANSITIONS


# every row of the table, driven by real messages; for the rows above the expected outcome is
# the independent one (so a wrong row fails here too, not only in the table check)
ROWS = sorted((k, EXPECTED.get(k, v)) for k, v in TRANSITIONS.items())


@pytest.mark.parametrize("row", ROWS, ids=[f"{s.name}-{i.name}" for (s, i), _ in ROWS])
def test_row(row):
    (state, inp), (action, nxt) = row
    d = device_for(state, inp)
    how = {I.SEND_END: "statuses", I.SEND_PARTIAL: "many"}.get(inp, "two")
    reach(state, d, how)
    assert d.s.state is state
    before = d.reply
    ended_before = d.s.end_reason
    ev, msg = feed(inp, state, d)
    assert d.s.state is nxt
    if msg is not None:
        wire = xmlcodec.decode(xmlcodec.encode(msg))              # a real, encodable message
        assert [c.cmd_id for c in wire.commands] == [str(i) for i in range(1, len(msg.commands) + 1)]
        for w, c in zip(wire.commands, msg.commands):
            if c.cmd_id is None:                                  # numbered by the encoder
                w.cmd_id = None
        assert wire == msg
    if action is A.START:
        # START identifies the device at once; START_PARTIAL when package 1's last message comes
        assert any(isinstance(e, DeviceIdentified) for e in ev) == (inp is I.START)
    elif action is A.CHALLENGE:
        assert any(isinstance(e, AuthFailed) for e in ev) and any(isinstance(e, NonceIssued) for e in ev)
        assert d.next().commands[0].data in ("401", "407")
    elif action is A.AUTH_END:
        assert SessionEnded in [type(e) for e in ev] and d.s.end_reason == "auth_failed"
    elif action is A.ABORT_ACK:
        assert ev[-1] == SessionEnded("aborted_by_client", "Alert 1223 from the device")
    elif action is A.REPLAY:
        assert ev == [] and d.next() is before
    elif action is A.SERVER_ABORT:
        assert msg.commands[-1].data == "1223" and msg.final
        if ended_before is None:
            assert any(isinstance(e, SessionEnded) and e.reason == "aborted_by_server" for e in ev)
        else:                                      # already over (client abort, auth end)
            assert SessionEnded not in [type(e) for e in ev] and d.s.end_reason == ended_before
    elif action is A.CLOSE:
        if ended_before is None:
            assert ev[-1] == SessionEnded("closed", "")
        else:
            assert SessionEnded not in [type(e) for e in ev] and d.s.end_reason == ended_before
    elif action is A.SENT:
        if inp is I.SEND_FINAL:
            assert msg.final and len(msg.commands) > 1
        elif inp is I.SEND_PARTIAL or inp is I.SEND_NEXT:
            assert not msg.final
        elif inp is I.SEND_END:
            assert msg.final and d.s.ended
        elif inp is I.SEND_CHALLENGE:
            assert msg.commands[0].chal is not None


def test_every_state_has_rows_and_every_input_is_used():
    assert {s for s, _ in TRANSITIONS} == set(S)
    assert {i for _, i in TRANSITIONS} == set(I)
    assert all(n in S and a in A for a, n in TRANSITIONS.values())


@given(state=sampled_from(SessionState), inp=sampled_from(SessionInput))
def test_every_pair_is_a_row_or_a_protocol_error(state, inp):
    cfg = SessionConfig(server_id="acme-dms", server_uri=SERVER)
    machine = DmSession._debug_at(cfg, state)
    try:
        result = machine._process_input(inp)
    except ProtocolError as exc:
        assert (state, inp) not in TRANSITIONS
        assert machine.state is SessionState.ENDED and exc.status >= 400
    else:
        assert result is machine.state is TRANSITIONS[state, inp][1]


@pytest.mark.parametrize("state", [s for s in S if s is not S.IDLE])
def test_receive_in_a_state_without_a_row_ends_with_protocol_error(state):
    """A real message that the table refuses: ProtocolError with a status, session ENDED."""
    d = Device()
    reach(state, d)
    start_again = (state, I.START) not in TRANSITIONS
    with pytest.raises(ProtocolError) as err:
        if start_again:
            d.send(d.pkg1())
        else:
            d.send(d.status() if d.reply is not None else [], final=True)
    assert err.value.status >= 400 and d.s.state is S.ENDED
    reply = d.s.error_reply(err.value)
    assert reply.commands[-1].data == "1223" and xmlcodec.encode(reply)
