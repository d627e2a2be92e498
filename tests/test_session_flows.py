"""Whole sessions from the protocol vectors (PROTOCOL.md §4, vectors/README.md storylines), each run
with the XML and the WBXML codec: the device's messages are the vector files decoded by the real
codecs, our replies are encoded by the real codecs and compared with the vector replies."""
from __future__ import annotations

import base64
import hashlib

import pytest

from dmengine import _wbxml, auth, xmlcodec
from dmengine._message import Command, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, SessionConfig, SessionState, ui_alert
from dmengine.errors import CommandRejected, ProtocolError
from dmengine.events import (
    ClientEvent, CommandNotDelivered, DeviceIdentified, GenericAlert, LargeObjectFailed,
    NonceIssued, ResultsReceived, SessionEnded, StatusReceived, UserAlertAnswered,
)

IMEI = "IMEI:356938035643809"
SERVER = "https://dm.example.com/dm"
N01 = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
N02 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
N05 = bytes.fromhex("5566778899aabbccddeeff0011223344")
OBJECT = bytes((i * 37 + 11) & 0xFF for i in range(1536))
CODECS = {"xml": xmlcodec, "wbxml": _wbxml}


@pytest.fixture(params=["xml", "wbxml"])
def enc(request):
    return request.param


def load(vectors_dir, name, enc):
    ext = "xml" if enc == "xml" else "wbxml"
    return CODECS[enc].decode((vectors_dir / f"{name}.{ext}").read_bytes())


def account(nonce=N01):
    return auth.DmAccount(dev_id=IMEI, username="dmclient01", client_secret="clientpw-1",
                          client_nonce=nonce, server_id="acme-dms", server_secret="srv-secret-42",
                          server_nonce=N02)


def session(enc, resp="https://dm.example.com/dm?s=1A2B-7f3c", random_bytes=None, **kw):
    cfg = SessionConfig(server_id="acme-dms", server_uri=SERVER, encoding=enc, **kw)
    if random_bytes is None:
        return DmSession(cfg, session_key="k", resp_uri=resp, now=0)
    return DmSession(cfg, session_key="k", resp_uri=resp, now=0, random_bytes=random_bytes)


def roundtrip(enc, msg):
    """Our reply through the real encoder and decoder: what the device would see."""
    codec = CODECS[enc]
    return codec.decode(codec.encode(msg))


def on_wire(msg):
    """The reply as the device reads it: commands the session shares between devices carry
    no CmdID in the model (Message.number_commands); the encoder numbers them."""
    return _wbxml.decode(_wbxml.encode(msg)) if msg.number_commands else msg


def device_message(enc, session_id, msg_id, cmds, final):
    """A message from the device as the server reads it (through the real codec)."""
    codec = CODECS[enc]
    return codec.decode(codec.encode(Message(
        hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=session_id, msg_id=str(msg_id),
                    target=SERVER, source=IMEI), commands=cmds, final=final)))


def strip_ids(cmd):
    cmd.cmd_id = None
    for sub in cmd.commands or ():
        strip_ids(sub)
    return cmd


def answer(reply, msg_id, *, codes=None, final=None):
    """A simple device: Status for the header and every command (213 for chunks), 1222 when
    the server message had no Final."""
    reply = on_wire(reply)
    cmds = [Command(name="Status", cmd_id="1", msg_ref=reply.hdr.msg_id, cmd_ref="0", cmd="SyncHdr",
                    target_refs=[IMEI], source_refs=[SERVER], data="212")]

    def walk(c):
        if c.name == "Status":
            return
        code = "200"
        if c.items and c.items[-1].more_data:
            code = "213"
        if codes and c.cmd_id in codes:
            code = codes[c.cmd_id]
        cmds.append(Command(name="Status", cmd_id=str(len(cmds) + 1), msg_ref=reply.hdr.msg_id,
                            cmd_ref=c.cmd_id, cmd=c.name, data=code))
        for sub in c.commands or ():
            walk(sub)

    for c in reply.commands:
        walk(c)
    if not reply.final:
        cmds.append(Command(name="Alert", cmd_id=str(len(cmds) + 1), data="1222",
                            items=[Item(target=SERVER, source=IMEI)]))
    return Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=reply.hdr.session_id,
                               msg_id=str(msg_id), target=reply.hdr.resp_uri or SERVER, source=IMEI),
                   commands=cmds, final=reply.final if final is None else final)


# --- session 1A2B: 01 -> 02 -> 03 -> end ---------------------------------------------------

def test_storyline_01_02_03(vectors_dir, enc):
    s = session(enc, random_bytes=lambda n: base64.b64decode("VWZ3iJmqu8zd7v8AESIzRA=="))
    ev = s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=1, account=account())
    ident = next(e for e in ev if isinstance(e, DeviceIdentified))
    assert ident == DeviceIdentified(IMEI, {"DevId": IMEI, "Man": "ExampleCorp", "Mod": "EX-100",
                                            "DmV": "1.2", "Lang": "en-US"}, "1A2B", 1200)
    assert s.peer_max_msg_size == 10000 and s.peer_max_obj_size == 524288
    v02 = load(vectors_dir, "02-pkg2-server-get-replace-exec", enc)
    for i, c in enumerate(v02.commands[3:]):
        s.queue(("task", i), strip_ids(c))
    reply = s.next_message(now=2)
    seen = roundtrip(enc, reply)
    # header: same identity, our Cred as in 02, RespURI
    assert (seen.hdr.session_id, seen.hdr.msg_id, seen.hdr.target, seen.hdr.source) == ("1A2B", "1", IMEI, SERVER)
    assert seen.hdr.cred == v02.hdr.cred and seen.hdr.source_name == "acme-dms"
    assert seen.hdr.resp_uri == v02.hdr.resp_uri
    # the header Status is 02's exactly (212, Chal with the nonce our random source gave)
    assert seen.commands[0] == v02.commands[0]
    assert seen.commands[1] == v02.commands[1]
    st = seen.commands[2]
    assert (st.cmd_id, st.msg_ref, st.cmd_ref, st.cmd, st.data) == ("3", "1", "2", "Replace", "200")
    assert st.source_refs == [f"./DevInfo/{n}" for n in ("DevId", "Man", "Mod", "DmV", "Lang")]
    assert seen.commands[3:] == load(vectors_dir, "02-pkg2-server-get-replace-exec", enc).commands[3:]
    assert seen.final and s.state is SessionState.WAIT_CLIENT
    # package 3
    ev = s.receive(load(vectors_dir, "03-pkg3-client-results", enc), now=3, account=account())
    assert StatusReceived(("task", 0), "Get", 200, None, "./DevDetail/FwV", -1) in ev
    assert all(type(e.items) is tuple for e in ev if isinstance(e, ResultsReceived))   # immutable
    assert ResultsReceived(("task", 0), (("./DevDetail/FwV", "chr", "text/plain", "2.3.9"),
                                         ("./DevDetail/SwV", "chr", "text/plain", "EX100_2.3.9_r17"))) in ev
    assert StatusReceived(("task", 1), "Replace", 200, None, "./FUMO/1/DownloadAndUpdate/PkgURL", -1) in ev
    assert StatusReceived(("task", 2), "Exec", 202, None, "./FUMO/1/DownloadAndUpdate", -1) in ev
    nonce = next(e.nonce for e in ev if type(e).__name__ == "ServerNonceReceived")
    assert nonce == base64.b64decode("wP/uAMD/7gDA/+4AwP/uAA==")
    assert s.server_authenticated
    end = s.next_message(now=4)
    assert [c.name for c in end.commands] == ["Status"] and end.final and end.hdr.cred is None
    assert end.commands[0].msg_ref == "2"
    assert s.ended and s.end_reason == "completed"
    assert s.take_events() == [SessionEnded("completed", "")]
    assert s.pending_handles == []


def test_retransmission_gets_the_same_reply(vectors_dir, enc):
    s = session(enc)
    m1 = load(vectors_dir, "01-pkg1-client-init", enc)
    s.receive(m1, now=1, account=account())
    s.queue("g", Command(name="Get", items=[Item(target="./DevDetail/FwV")]))
    r1 = s.next_message(now=2)
    ev = s.receive(m1, now=3, account=account())          # the reply was lost; same MsgID again
    assert ev == []
    assert s.next_message(now=4) is r1
    m3 = answer(r1, 2)
    ev = s.receive(m3, now=5, account=account())
    assert [type(e) for e in ev] == [StatusReceived]
    r2 = s.next_message(now=6)
    assert s.ended
    assert s.receive(m3, now=7, account=account()) == []   # retransmission after the end
    assert s.next_message(now=8) is r2
    with pytest.raises(ProtocolError) as err:              # same MsgID, other content
        s.receive(answer(r1, 2, final=False), now=9, account=account())
    assert err.value.status == 400


def test_retransmission_from_kept_reply_bytes(vectors_dir, enc):
    codec = _wbxml if enc == "wbxml" else xmlcodec
    s = session(enc)
    m1 = load(vectors_dir, "01-pkg1-client-init", enc)
    s.receive(m1, now=1, account=account())
    assert s.devinfo is not None
    s.queue("g", Command(name="Get", items=[Item(target="./DevDetail/FwV")]))
    r1 = s.next_message(now=2)
    assert s.devinfo is None                      # the DeviceIdentified event keeps it
    out = codec.encode(r1)
    s.keep_reply_bytes(out)
    assert s.replay_bytes() is None               # nothing to replay yet
    assert s.receive(m1, now=3, account=account()) == []
    assert s.replay_bytes() is out                # the same bytes again, no rebuild
    assert s.replay_bytes() is None
    assert s.receive(m1, now=4, account=account()) == []
    assert s.next_message(now=5).astuple() == on_wire(r1).astuple()   # decoded from the bytes
    ev = s.receive(answer(r1, 2), now=6, account=account())
    assert [type(e) for e in ev] == [StatusReceived]
    with pytest.raises(ValueError):
        session(enc).keep_reply_bytes(b"x")      # no reply yet


# --- challenge: 04a / 04 / 07 (session 5F0) ---------------------------------------------

def test_storyline_04a_04_07(vectors_dir, enc):
    s = session(enc, resp="https://dm.example.com/dm?s=5F0-c1", random_bytes=lambda n: b"dmnonce-0002")
    retry = load(vectors_dir, "04-pkg1-md5-challenge-retry", enc)
    first = load(vectors_dir, "04-pkg1-md5-challenge-retry", enc)
    first.hdr.msg_id, first.hdr.cred, first.hdr.target = "1", None, SERVER
    first.commands = [c for c in first.commands if c.name != "Status"]
    first.commands[0].cmd_id, first.commands[1].cmd_id = "1", "2"
    ev = s.receive(first, now=1, account=account(nonce=None))
    assert any(type(e).__name__ == "AuthFailed" and e.status == 407 for e in ev)
    assert NonceIssued(IMEI, b"dmnonce-0002") in ev
    challenge = roundtrip(enc, s.next_message(now=2))
    v04a = load(vectors_dir, "04a-pkg2-md5-challenge", enc)
    assert challenge.commands[0].chal == v04a.commands[0].chal
    assert [(c.cmd, c.data) for c in challenge.commands] == [("SyncHdr", "407"), ("Alert", "407"), ("Replace", "407")]
    assert challenge.final and s.state is SessionState.AUTH_PENDING
    # the retry (vector 04) answers the challenge with the nonce we issued
    ev = s.receive(retry, now=3, account=account(nonce=None))
    assert any(type(e).__name__ == "Authenticated" for e in ev)
    v07 = load(vectors_dir, "07-atomic-sequence", enc)
    s.queue("atomic", strip_ids(v07.commands[3]))
    s.queue("sequence", strip_ids(v07.commands[4]))
    s.queue("choice", strip_ids(v07.commands[5]))
    reply = roundtrip(enc, s.next_message(now=4))
    v07 = load(vectors_dir, "07-atomic-sequence", enc)
    assert reply.hdr.msg_id == "2"
    assert [(c.cmd_id, c.msg_ref, c.cmd_ref, c.cmd) for c in reply.commands[:3]] == \
        [(c.cmd_id, c.msg_ref, c.cmd_ref, c.cmd) for c in v07.commands[:3]]
    assert reply.commands[0].data == "212"
    assert reply.commands[3:] == v07.commands[3:]
    # the device answers: Atomic ok, the confirm refused (304) so the rest of the Sequence is skipped
    dev = answer(reply, 3, codes={"9": "304", "10": "215", "11": "215"})
    dev.commands.append(Command(name="Status", cmd_id="99", msg_ref="2", cmd_ref="12", cmd="Alert",
                                data="200", items=[Item(data="2")]))
    dev.commands = [c for c in dev.commands if c.cmd_ref != "12" or c.cmd_id == "99"]
    ev = s.receive(dev, now=5, account=None)
    assert UserAlertAnswered("sequence", 304, [], 1101) in ev
    assert UserAlertAnswered("choice", 200, ["2"], 1103) in ev
    assert StatusReceived("sequence", "Delete", 215, None, "./Vendor/Acme/OldCache", 1) in ev
    assert StatusReceived("atomic", "Atomic", 200, None, None, -1) in ev
    assert StatusReceived("atomic", "Add", 200, None, "./Vendor/Acme/Proxy/Host", 1) in ev
    s.next_message(now=6)
    assert s.ended and s.end_reason == "completed"


# --- generic alert (05) -----------------------------------------------------------------

def test_generic_alert_session_05(vectors_dir, enc):
    s = session(enc)
    ev = s.receive(load(vectors_dir, "05-generic-alert-1226-fumo", enc), now=1, account=account(nonce=N05))
    assert GenericAlert("fw-job-8842", "./FUMO/1", "org.openmobilealliance.dm.firmwareupdate.downloadandupdate",
                        "int", "informational", "200") in ev
    reply = roundtrip(enc, s.next_message(now=2))
    assert [(c.cmd, c.data) for c in reply.commands] == [("SyncHdr", "212"), ("Alert", "200"),
                                                         ("Replace", "200"), ("Alert", "200")]
    assert reply.final and s.ended and s.end_reason == "completed"


def test_generic_alert_prefix_missing_parts_and_client_event(enc):
    s = session(enc, require_auth="none")
    msg = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="7", msg_id="1", target=SERVER, source=IMEI),
                  commands=[Command(name="Alert", cmd_id="1", data="1201"),
                            Command(name="Alert", cmd_id="2", data="1226", items=[Item(
                                source="./FUMO/1", meta=Meta(type="Reversed-Domain-Name: org.x.y", format="int"),
                                data="200")]),
                            Command(name="Alert", cmd_id="3", data="1226", items=[Item(source="./FUMO/2", data="1")]),
                            Command(name="Alert", cmd_id="4", data="1224", items=[Item(
                                source="./Ext/Battery", meta=Meta(type="x-battery", format="chr"), data="low")]),
                            Command(name="Alert", cmd_id="5", data="1101"),
                            Command(name="Alert", cmd_id="6", data="4711"),
                            Command(name="Get", cmd_id="7", items=[Item(target="./X")])],
                  final=True)
    ev = s.receive(msg, now=1, account=None)
    assert GenericAlert(None, "./FUMO/1", "org.x.y", "int", None, "200") in ev
    assert ClientEvent("./Ext/Battery", "x-battery", "chr", "low") in ev
    assert sum(isinstance(e, GenericAlert) for e in ev) == 1
    reply = s.next_message(now=2)
    assert [c.data for c in reply.commands] == ["200", "200", "200", "412", "200", "405", "406", "405"]


# --- multi-message packages ---------------------------------------------------------------

def test_client_streaming_gets_next_message_response_08(vectors_dir, enc):
    s = session(enc)
    s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=1, account=account())
    v02 = load(vectors_dir, "02-pkg2-server-get-replace-exec", enc)
    for i, c in enumerate(v02.commands[3:]):
        s.queue(i, strip_ids(c))
    s.next_message(now=2)
    part = load(vectors_dir, "03-pkg3-client-results", enc)
    part.final = False
    ev = s.receive(part, now=3, account=None)
    assert len([e for e in ev if isinstance(e, StatusReceived)]) == 3
    s.queue("later", Command(name="Get", items=[Item(target="./DevInfo/Lang")]))
    r = roundtrip(enc, s.next_message(now=4))
    v08 = load(vectors_dir, "08-alert-1222-continuation", enc)
    assert not r.final and s.state is SessionState.CLIENT_STREAMING
    assert r.commands[1] == v08.commands[1]                # Alert 1222 with Item Target/Source
    assert [(c.cmd_ref, c.cmd, c.data) for c in r.commands] == [("0", "SyncHdr", "200"), (None, None, "1222")]
    # the rest of the client's package, with Final: now our queued command goes out
    rest = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="3",
                               target=SERVER, source=IMEI),
                   commands=[Command(name="Status", cmd_id="1", msg_ref="2", cmd_ref="2", cmd="Alert", data="200")],
                   final=True)
    s.receive(rest, now=5, account=None)
    r2 = s.next_message(now=6)
    assert [c.name for c in r2.commands] == ["Status", "Get"] and r2.final


@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_server_package_split_to_fit_max_msg_size(vectors_dir, enc, size):
    limit = {"xml": {"tiny": 1300, "small": 2000, "medium": 4000},
             "wbxml": {"tiny": 450, "small": 1000, "medium": 3000}}[enc][size]
    s = session(enc)
    m1 = load(vectors_dir, "01-pkg1-client-init", enc)
    m1.hdr.meta.max_msg_size = str(limit)
    s.receive(m1, now=1, account=account())
    for i in range(40):
        s.queue(i, Command(name="Replace", items=[Item(target=f"./Vendor/Acme/Node{i}",
                                                      meta=Meta(format="chr"), data=f"value-{i}" * 3)]))
    codec = CODECS[enc]
    sent: list[str] = []
    answered = []
    msg_id = 2
    reply = s.next_message(now=2)
    messages = 1
    while True:
        assert len(codec.encode(reply)) <= limit
        sent += [c.items[0].target for c in reply.commands if c.name == "Replace"]
        if reply.final:
            break
        assert s.state is SessionState.WAIT_NEXT_REQUEST
        answered += s.receive(answer(reply, msg_id), now=msg_id, account=None)
        assert s.state is SessionState.OWE_CONTINUATION
        reply = s.next_message(now=msg_id)
        msg_id += 1
        messages += 1
    assert messages > 1 and sent == [f"./Vendor/Acme/Node{i}" for i in range(40)]
    answered += s.receive(answer(reply, msg_id), now=99, account=None)
    assert sorted(e.handle for e in answered if isinstance(e, StatusReceived)) == list(range(40))
    s.next_message(now=100)
    assert s.ended and s.end_reason == "completed"


# --- large objects ------------------------------------------------------------------------

@pytest.mark.parametrize("enc,data_kind", [("xml", "b64"), ("wbxml", "b64"), ("wbxml", "bin")])
def test_large_object_to_device_06(vectors_dir, enc, data_kind):
    """Storyline 01 -> 02 -> 03 -> 06 -> 06b -> 06c: a 1536-byte object in chunks (raw binary
    only in WBXML: XML cannot carry it, see test_binary_refused_in_xml)."""
    s = session(enc)
    s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=1, account=account())
    v02 = load(vectors_dir, "02-pkg2-server-get-replace-exec", enc)
    for i, c in enumerate(v02.commands[3:]):
        s.queue(i, strip_ids(c))
    s.next_message(now=2)
    m3 = load(vectors_dir, "03-pkg3-client-results", enc)
    limit = 2000 if enc == "xml" else 1200
    m3.hdr.meta = Meta(max_msg_size=str(limit))    # a new MaxMsgSize applies from now on
    s.receive(m3, now=3, account=None)
    if data_kind == "b64":
        data = base64.b64encode(OBJECT).decode()
        meta = Meta(format="b64", type="application/octet-stream")
    else:
        data, meta = OBJECT, Meta(format="bin", type="application/octet-stream")
    s.queue("fw", Command(name="Replace", meta=meta, items=[Item(target="./FUMO/1/Update/PkgData", data=data)]))
    s.queue("exec", Command(name="Exec", correlator="fw-job-8843", items=[Item(target="./FUMO/1/Update")]))
    codec = CODECS[enc]
    chunks = []
    outcomes = []
    msg_id = 3
    reply = s.next_message(now=4)
    first = reply
    while True:
        assert len(codec.encode(reply)) <= limit
        seen = roundtrip(enc, reply)
        for c in seen.commands:
            if c.name == "Replace":
                chunks.append(c)
        if reply.final:
            break
        if reply is first and data_kind == "b64" and enc == "xml":
            ev = s.receive(load(vectors_dir, "06b-large-object-213-next", enc), now=5, account=None)
        else:
            ev = s.receive(answer(reply, msg_id), now=msg_id, account=None)
        outcomes += [e for e in ev if isinstance(e, StatusReceived)]
        assert all(e.status != 213 for e in outcomes)          # 213 is no outcome yet
        msg_id += 1
        reply = s.next_message(now=msg_id)
    assert len(chunks) >= 2
    assert chunks[0].items[0].meta.size == "1536" and all(c.items[0].meta is None or c.items[0].meta.size is None
                                                           for c in chunks[1:])
    assert all(c.items[0].more_data for c in chunks[:-1]) and not chunks[-1].items[0].more_data
    assert all(c.meta == meta for c in chunks)
    parts = [c.items[0].data for c in chunks]
    if data_kind == "b64":
        assert base64.b64decode("".join(parts)) == OBJECT
    else:
        whole = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
        assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(OBJECT).hexdigest()
    assert [c.name for c in reply.commands][-1] == "Exec"       # the Exec follows the last chunk (06c)
    outcomes += s.receive(answer(reply, msg_id), now=50, account=None)
    assert outcomes == [StatusReceived("fw", "Replace", 200, None, "./FUMO/1/Update/PkgData", -1),
                        StatusReceived("exec", "Exec", 200, None, "./FUMO/1/Update", -1)]


def test_binary_refused_in_xml():
    s = session("xml", require_auth="none")
    with pytest.raises(CommandRejected):
        s.queue("bin", Command(name="Replace", meta=Meta(format="bin"),
                               items=[Item(target="./FUMO/1/Update/PkgData", data=OBJECT)]))
    s.queue("utf8", Command(name="Replace", items=[Item(target="./X", data="é".encode())]))


def test_large_object_bigger_than_device_max_obj_size(vectors_dir, enc):
    s = session(enc)
    m1 = load(vectors_dir, "01-pkg1-client-init", enc)
    m1.hdr.meta.max_msg_size, m1.hdr.meta.max_obj_size = "2000", "1000"
    s.receive(m1, now=1, account=account())
    s.queue("big", Command(name="Replace", meta=Meta(format="b64"),
                           items=[Item(target="./FUMO/1/Update/PkgData", data=base64.b64encode(OBJECT).decode())]))
    r = s.next_message(now=2)
    assert CommandNotDelivered("big", "object of 1536 bytes is larger than the device's MaxObjSize 1000") \
        in s.take_events()
    assert [c.name for c in r.commands] == ["Status"] * 3
    assert r.final and s.ended


def _results_chunk(msg_id, data, *, more, size=None, final=False, cmd_ref="3", fmt="b64"):
    meta = Meta(size=size) if size is not None else None
    return Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id=str(msg_id),
                               target=SERVER, source=IMEI),
                   commands=[Command(name="Results", cmd_id="1", msg_ref="1", cmd_ref=cmd_ref,
                                     meta=Meta(format=fmt, type="application/octet-stream"),
                                     items=[Item(source="./Vendor/Log", meta=meta, data=data, more_data=more)])],
                   final=final)


def _session_with_get(enc, **kw):
    s = session(enc, require_auth="none", **kw)
    s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="1",
                                  target=SERVER, source=IMEI),
                      commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True),
              now=0, account=None)
    s.queue("log", Command(name="Get", items=[Item(target="./Vendor/Log")]))
    r = on_wire(s.next_message(now=0))
    assert (r.commands[2].name, r.commands[2].cmd_id) == ("Get", "3")
    return s


@pytest.mark.parametrize("size", ["1536", "2048"])         # decoded size or base64 length (§12)
def test_large_object_from_device(enc, size):
    s = _session_with_get(enc)
    text = base64.b64encode(OBJECT).decode()
    ev = s.receive(_results_chunk(2, text[:1364], more=True, size=size), now=1, account=None)
    assert ev == []
    r = s.next_message(now=1)
    assert [(c.cmd, c.data) for c in r.commands] == [("SyncHdr", "200"), ("Results", "213"), (None, "1222")]
    assert not r.final
    ev = s.receive(_results_chunk(3, text[1364:], more=False, final=True), now=2, account=None)
    assert ev == [ResultsReceived("log", (("./Vendor/Log", "b64", "application/octet-stream", text),))]
    r = s.next_message(now=2)
    assert [c.data for c in r.commands] == ["200"] and s.ended


def test_large_object_from_device_size_mismatch_and_too_large(enc):
    s = _session_with_get(enc)
    s.receive(_results_chunk(2, "AAAA", more=True, size="100"), now=1, account=None)
    s.next_message(now=1)
    ev = s.receive(_results_chunk(3, "AAAA", more=False, final=True), now=2, account=None)
    assert ev == [LargeObjectFailed("log", "./Vendor/Log", 424, "object size does not match Meta Size 100")]
    assert [c.data for c in s.next_message(now=2).commands] == ["200", "424"]
    s2 = _session_with_get(enc, max_obj_size=1000)
    s2.receive(_results_chunk(2, "AAAA", more=True, size="5000"), now=1, account=None)
    assert [c.data for c in s2.next_message(now=1).commands] == ["200", "413", "1222"]
    ev = s2.receive(_results_chunk(3, "AAAA", more=False, final=True), now=2, account=None)
    assert [e.status for e in ev] == [413]


def test_large_object_from_device_interrupted_1225(enc):
    s = _session_with_get(enc)
    s.receive(_results_chunk(2, "AAAA", more=True, size="6"), now=1, account=None)
    s.next_message(now=1)
    other = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="3",
                                target=SERVER, source=IMEI),
                    commands=[Command(name="Alert", cmd_id="1", data="1226", items=[Item(
                        source="./FUMO/1", meta=Meta(type="t", format="int"), data="200")])],
                    final=True)
    ev = s.receive(other, now=2, account=None)
    assert LargeObjectFailed("log", "./Vendor/Log", 1225,
                             "the device started something else before the last chunk") in ev
    r = s.next_message(now=2)
    assert [(c.name, c.data) for c in r.commands] == [("Status", "200"), ("Status", "200"), ("Alert", "1225")]
    assert r.commands[2].items[0].source == "./Vendor/Log" and r.final and not s.ended


# --- abort ----------------------------------------------------------------------------------

def test_server_abort_10(vectors_dir, enc):
    s = session(enc)
    s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=1, account=account())
    s.queue("never", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    r = roundtrip(enc, s.abort("maintenance"))
    v10 = load(vectors_dir, "10-session-abort-1223", enc)
    assert [(c.name, c.data) for c in r.commands] == [("Status", "212"), ("Status", "200"), ("Status", "200"),
                                                      ("Alert", "1223")]
    assert r.commands[-1].data == v10.commands[-1].data and r.final
    ev = s.take_events()
    assert CommandNotDelivered("never", "not sent before the session ended") in ev
    assert SessionEnded("aborted_by_server", "maintenance") in ev
    assert s.ended
    with pytest.raises(CommandRejected):
        s.queue("x", Command(name="Get", items=[Item(target="./X")]))


def test_client_abort(vectors_dir, enc):
    s = session(enc)
    s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=1, account=account())
    s.queue("g", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    r1 = s.next_message(now=2)
    abort = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="2",
                                target=SERVER, source=IMEI),
                    commands=[Command(name="Alert", cmd_id="1", data="1223")], final=True)
    ev = s.receive(abort, now=3, account=None)
    assert CommandNotDelivered("g", "no Status before the session ended") in ev
    assert ev[-1] == SessionEnded("aborted_by_client", "Alert 1223 from the device")
    r = s.next_message(now=4)
    assert [(c.cmd, c.data) for c in r.commands] == [("SyncHdr", "200"), ("Alert", "200")] and r.final
    assert s.ended and r1 is not r


# --- UI alerts ------------------------------------------------------------------------------

def test_ui_alerts_parameters_and_answers(enc):
    s = session(enc, require_auth="none")
    s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="9", msg_id="1",
                                  target=SERVER, source=IMEI),
                      commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True), now=0, account=None)
    s.queue("confirm", ui_alert(1101, "Update now?", mindt=5, maxdt=120, dr=1))
    s.queue("text", ui_alert(1102, "Your PIN", maxlen=4, it="N", et="P"))
    s.queue("multi", ui_alert(1104, "Pick", choices=["a", "b", "c"], dr=[2, 3]))
    with pytest.raises(CommandRejected):
        ui_alert(1103, "no choices")
    with pytest.raises(CommandRejected):
        ui_alert(1100, "x", it="N")
    with pytest.raises(CommandRejected):
        s.queue("bad", Command(name="Alert", data="1103", items=[Item(data=""), Item(data="t")]))
    with pytest.raises(CommandRejected):
        s.queue("bad", Command(name="Results", items=[Item(target="./X")]))
    with pytest.raises(CommandRejected):
        s.queue("bad", Command(name="Atomic", commands=[Command(name="Get", items=[Item(target="./X")])]))
    r = roundtrip(enc, s.next_message(now=1))
    alerts = [c for c in r.commands if c.name == "Alert"]
    assert [a.items[0].data for a in alerts] == ["MINDT=5&MAXDT=120&DR=1", "MAXLEN=4&IT=N&ET=P", "DR=2-3"]
    assert [i.data for i in alerts[2].items] == ["DR=2-3", "Pick", "a", "b", "c"]
    dev = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="9", msg_id="2", target=SERVER, source=IMEI),
                  commands=[Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref=alerts[0].cmd_id, cmd="Alert", data="304"),
                            Command(name="Status", cmd_id="2", msg_ref="1", cmd_ref=alerts[1].cmd_id, cmd="Alert",
                                    data="200", items=[Item(data="1234")]),
                            Command(name="Status", cmd_id="3", msg_ref="1", cmd_ref=alerts[2].cmd_id, cmd="Alert",
                                    data="200", items=[Item(data="3"), Item(data="1")])],
                  final=True)
    ev = s.receive(dev, now=2, account=None)
    assert ev == [UserAlertAnswered("confirm", 304, [], 1101), UserAlertAnswered("text", 200, ["1234"], 1102),
                  UserAlertAnswered("multi", 200, ["3", "1"], 1104)]


def test_protocol_errors_carry_status_and_end_the_session(vectors_dir, enc):
    for mutate, status in [(lambda m: setattr(m.hdr, "ver_dtd", "1.1"), 505),
                           (lambda m: setattr(m.hdr, "ver_proto", "DM/1.1"), 513),
                           (lambda m: setattr(m.hdr, "msg_id", "x"), 400),
                           (lambda m: setattr(m.hdr.meta, "max_msg_size", "100"), 400)]:
        s = session(enc)
        m = load(vectors_dir, "01-pkg1-client-init", enc)
        mutate(m)
        with pytest.raises(ProtocolError) as err:
            s.receive(m, now=1, account=account())
        assert err.value.status == status and s.ended and s.end_reason == "protocol_error"
        assert SessionEnded in [type(e) for e in err.value.events]
        reply = s.error_reply(err.value)
        assert reply.commands[0].data == str(status) and reply.commands[-1].data == "1223"
        CODECS[enc].encode(reply)          # the error reply is encodable
    s = session(enc)
    with pytest.raises(ProtocolError):     # the first message must open the session
        s.receive(load(vectors_dir, "03-pkg3-client-results", enc), now=1, account=None)


def test_wrong_model_objects_are_protocol_errors(enc):
    bad_items = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1",
                                    target=SERVER, source=IMEI),
                        commands=[Command(name="Alert", cmd_id="1", data="1201"),
                                  Command(name="Replace", cmd_id="2", items=[Command(name="Get")])],
                        final=True)
    for msg in (bad_items, Message(hdr=bad_items.hdr, commands=[Item()], final=True)):
        s = session(enc, require_auth="none")
        with pytest.raises(ProtocolError) as err:
            s.receive(msg, now=1, account=None)
        assert err.value.status == 400 and s.ended
        CODECS[enc].encode(s.error_reply(err.value))


@pytest.mark.parametrize("inflate", [1.3, 2.0])
def test_a_codec_bigger_than_the_estimate_is_trimmed(vectors_dir, inflate):
    """encoded_size says more than the estimate (e.g. a pretty-printing encoder): with
    verify_ratio < 1 the session measures and takes commands back until the message fits."""
    sizer = lambda m: int(len(xmlcodec.encode(m)) * inflate)   # noqa: E731
    s = session("xml", encoded_size=sizer, verify_ratio=0.3)
    m1 = load(vectors_dir, "01-pkg1-client-init", "xml")
    m1.hdr.meta.max_msg_size = "5000"
    s.receive(m1, now=1, account=account())
    for i in range(30):
        s.queue(i, Command(name="Replace", items=[Item(target=f"./Vendor/Acme/N{i}", data=f"v{i}" * 20)]))
    got, msg_id, outcomes = [], 2, []
    reply = s.next_message(now=2)
    while True:
        assert sizer(reply) <= 5000
        got += [c.items[0].target for c in reply.commands if c.name == "Replace"]
        if reply.final:
            break
        outcomes += s.receive(answer(reply, msg_id), now=msg_id, account=None)
        msg_id += 1
        reply = s.next_message(now=msg_id)
    assert got == [f"./Vendor/Acme/N{i}" for i in range(30)]
    outcomes += s.receive(answer(reply, msg_id), now=msg_id, account=None)
    assert sorted(e.handle for e in outcomes if isinstance(e, StatusReceived)) == list(range(30))


def test_idle_timeout_close_and_pending_handles(vectors_dir, enc):
    s = session(enc, idle_timeout=30)
    s.receive(load(vectors_dir, "01-pkg1-client-init", enc), now=100, account=account())
    s.queue("sent", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    s.next_message(now=101)
    s.queue("waiting", Command(name="Get", items=[Item(target="./DevInfo/Lang")]))
    assert s.pending_handles == ["waiting", "sent"]
    assert not s.expired(120) and s.expired(132)
    ev = s.close("timeout", "no message for 30 s")
    assert ev == [CommandNotDelivered("waiting", "not sent before the session ended"),
                  CommandNotDelivered("sent", "no Status before the session ended"),
                  SessionEnded("timeout", "no message for 30 s")]
    assert s.ended and s.pending_handles == [] and s.close("timeout") == []


# --- package 1 in two messages ----------------------------------------------------------------

def test_package_1_in_two_messages_identifies_the_device_with_all_of_devinfo(enc):
    """Package 1 without Final, then the rest of DevInfo with Final: DeviceIdentified comes
    once, when package 1 is complete, and carries the DevInfo of both messages."""
    s = session(enc, require_auth="none")

    def msg(msg_id, cmds, final):
        return device_message(enc, "77", msg_id, cmds, final)

    first = msg(1, [Command(name="Alert", cmd_id="1", data="1201"),
                    Command(name="Replace", cmd_id="2", items=[
                        Item(source="./DevInfo/DevId", data=IMEI), Item(source="./DevInfo/Man", data="ExampleCorp")])],
                False)
    ev = s.receive(first, now=1)
    assert not [e for e in ev if isinstance(e, DeviceIdentified)]
    reply = roundtrip(enc, s.next_message(now=1))          # statuses + "send the rest" (1222)
    assert not reply.final and any(c.name == "Alert" and c.data == "1222" for c in reply.commands)
    second = msg(2, [Command(name="Replace", cmd_id="1", items=[
        Item(source="./DevInfo/Mod", data="EX-100"), Item(source="./DevInfo/DmV", data="1.2"),
        Item(source="./DevInfo/Lang", data="en-US")])], True)
    ev = s.receive(second, now=2)
    ident = [e for e in ev if isinstance(e, DeviceIdentified)]
    assert ident == [DeviceIdentified(IMEI, {"DevId": IMEI, "Man": "ExampleCorp", "Mod": "EX-100",
                                             "DmV": "1.2", "Lang": "en-US"}, "77", 1201)]
    s.queue("fw", Command(name="Get", items=[Item(target="./DevDetail/FwV")]))
    pkg2 = on_wire(s.next_message(now=2))
    assert pkg2.final and [c.name for c in pkg2.commands] == ["Status", "Status", "Get"]
    assert s.state is SessionState.WAIT_CLIENT


# --- a generic alert with a large Data (MoreData from the device) -----------------------------

def _chunked_alert_session(enc, first_data, rest_data, size):
    s = session(enc, require_auth="none")

    def msg(msg_id, cmds, final):
        return device_message(enc, "78", msg_id, cmds, final)

    meta = Meta(type="org.openmobilealliance.dm.diag.log", format="chr", size=str(size))
    one = msg(1, [Command(name="Alert", cmd_id="1", data="1201"),
                  Command(name="Replace", cmd_id="2", items=[Item(source="./DevInfo/DevId", data=IMEI)]),
                  Command(name="Alert", cmd_id="3", data="1226", correlator="c-9", items=[
                      Item(source="./Diag/Log", meta=meta, data=first_data, more_data=True)])], False)
    ev1 = s.receive(one, now=1)
    r1 = roundtrip(enc, s.next_message(now=1))
    two = msg(2, [Command(name="Alert", cmd_id="1", data="1226", correlator="c-9", items=[
        Item(source="./Diag/Log", meta=Meta(type=meta.type, format="chr"), data=rest_data)])], True)
    ev2 = s.receive(two, now=2)
    r2 = roundtrip(enc, s.next_message(now=2))
    return ev1, r1, ev2, r2


def test_generic_alert_data_in_two_chunks_is_reassembled(enc):
    log = "line of the device log\n" * 60
    ev1, r1, ev2, r2 = _chunked_alert_session(enc, log[:700], log[700:], len(log))
    assert not [e for e in ev1 if isinstance(e, GenericAlert)]
    chunk_status = [c for c in r1.commands if c.name == "Status" and c.cmd == "Alert" and c.cmd_ref == "3"]
    assert [c.data for c in chunk_status] == ["213"]            # chunk accepted and buffered
    alerts = [e for e in ev2 if isinstance(e, GenericAlert)]
    assert alerts == [GenericAlert("c-9", "./Diag/Log", "org.openmobilealliance.dm.diag.log", "chr", None, log)]
    assert [c.data for c in r2.commands if c.name == "Status" and c.cmd == "Alert"] == ["200"]


def test_generic_alert_chunks_that_do_not_add_up_get_424(enc):
    ev1, r1, ev2, r2 = _chunked_alert_session(enc, "a" * 100, "b" * 10, 500)
    assert not [e for e in ev2 if isinstance(e, GenericAlert)]
    assert [c.data for c in r2.commands if c.name == "Status" and c.cmd == "Alert"] == ["424"]


def test_generic_alert_interrupted_by_another_command_gets_1225(enc):
    codec = CODECS[enc]
    s = session(enc, require_auth="none")
    hdr = dict(ver_dtd="1.2", ver_proto="DM/1.2", session_id="79", target=SERVER, source=IMEI)
    s.receive(codec.decode(codec.encode(Message(hdr=SyncHdr(msg_id="1", **hdr), commands=[
        Command(name="Alert", cmd_id="1", data="1201"),
        Command(name="Alert", cmd_id="2", data="1226", items=[
            Item(source="./Diag/Log", meta=Meta(type="t.x", format="chr", size="900"), data="x" * 300,
                 more_data=True)])], final=False))), now=1)
    s.next_message(now=1)
    ev = s.receive(codec.decode(codec.encode(Message(hdr=SyncHdr(msg_id="2", **hdr), commands=[
        Command(name="Alert", cmd_id="1", data="1226", items=[
            Item(source="./Other", meta=Meta(type="t.y", format="chr"), data="small")])], final=True))), now=2)
    assert [e.source for e in ev if isinstance(e, GenericAlert)] == ["./Other"]   # the new one only
    reply = roundtrip(enc, s.next_message(now=2))
    assert [(c.name, c.data) for c in reply.commands if c.name == "Alert"] == [("Alert", "1225")]
