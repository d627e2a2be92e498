"""PreparedCommand: commands checked and sized once and shared by many sessions, numbered by
the encoder (Message.number_commands) — never copied or changed per session."""
from __future__ import annotations

import pytest

from dmengine import _wbxml, xmlcodec
from dmengine._message import Command, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, PreparedCommand, SessionConfig, prepare
from dmengine.errors import CommandRejected
from dmengine.events import StatusReceived

IMEI = "IMEI:356938035643809"
SERVER = "https://dm.example.com/dm"
CODECS = {"xml": xmlcodec, "wbxml": _wbxml}


@pytest.fixture(params=["xml", "wbxml"])
def enc(request):
    return request.param


def opened(enc, sid="1", max_msg_size=None):
    s = DmSession(SessionConfig(server_id="acme", server_uri=SERVER, encoding=enc, require_auth="none"),
                  session_key=sid, resp_uri=f"{SERVER}/{sid}", now=0)
    meta = Meta(max_msg_size=str(max_msg_size)) if max_msg_size else None
    s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=sid, msg_id="1",
                                  target=SERVER, source=IMEI, meta=meta),
                      commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True), now=0)
    return s


def sent(wire):
    """The management commands of a server message (its Status commands left out)."""
    return [c for c in wire.commands if c.name != "Status"]


def statuses_for(wire, codes):
    """The device's package 3: Status for the header and for each command (``codes`` by CmdID)."""
    cmds = [Command(name="Status", cmd_id="1", msg_ref=wire.hdr.msg_id, cmd_ref="0", cmd="SyncHdr",
                    data="200")]

    def walk(c):
        if c.name != "Status":
            cmds.append(Command(name="Status", cmd_id=str(len(cmds) + 1), msg_ref=wire.hdr.msg_id,
                                cmd_ref=c.cmd_id, cmd=c.name, data=codes.get(c.cmd_id, "200")))
        for sub in c.commands or ():
            walk(sub)

    for c in wire.commands:
        walk(c)
    return Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=wire.hdr.session_id, msg_id="2",
                               target=SERVER, source=IMEI), commands=cmds, final=True)


def test_one_prepared_command_serves_many_sessions_unchanged(enc):
    codec = CODECS[enc]
    get = Command(name="Get", items=[Item(target="./DevDetail/FwV")])
    rep = Command(name="Replace", items=[Item(target="./Vendor/X", data="1")])
    p_get, p_rep = prepare(get), prepare(rep)
    assert isinstance(p_get, PreparedCommand) and p_get.shared and p_get.command is get
    for n in range(3):
        s = opened(enc, sid=str(n + 1))
        s.queue(("get", n), p_get)
        s.queue_many([(("rep", n), p_rep)])
        reply = s.next_message(now=1)
        assert reply.number_commands
        assert reply.commands[-2] is get and reply.commands[-1] is rep      # shared, not copied
        wire = codec.decode(codec.encode(reply))
        assert [c.cmd_id for c in wire.commands] == ["1", "2", "3", "4"]  # 2 Status, Get, Replace
        assert [c.name for c in sent(wire)] == ["Get", "Replace"]
        ev = s.receive(statuses_for(wire, {"4": "405"}), now=2)
        got = [(e.handle, e.status) for e in ev if isinstance(e, StatusReceived)]
        assert got == [(("get", n), 200), (("rep", n), 405)]
    assert get.cmd_id is None and rep.cmd_id is None                    # never numbered in place


def test_prepare_rejects_what_queue_rejects():
    with pytest.raises(CommandRejected):
        prepare(Command(name="Status", items=[Item(target="./X")]))
    with pytest.raises(CommandRejected):
        prepare(Command(name="Get"))                                    # no Item
    with pytest.raises(CommandRejected):
        prepare(Command(name="Alert", data="1200"))
    with pytest.raises(CommandRejected):
        prepare(Command(name="Atomic", commands=[Command(name="Atomic", commands=[
            Command(name="Get", items=[Item(target="./X")])])]))


def test_binary_data_refused_in_xml_sessions_only():
    p = prepare(Command(name="Replace", items=[Item(target="./X", data=b"\xff\xfe\x00")]))
    s = opened("xml")
    with pytest.raises(CommandRejected) as info:
        s.queue("bin", p)
    assert info.value.handle == "bin" and "Format b64" in str(info.value)
    w = opened("wbxml")
    w.queue("bin", p)
    wire = _wbxml.decode(_wbxml.encode(w.next_message(now=1)))
    assert sent(wire)[0].items[0].data == b"\xff\xfe\x00"


def test_caller_cmd_id_and_refs_are_dropped_once_at_prepare(enc):
    codec = CODECS[enc]
    orig = Command(name="Get", cmd_id="77", msg_ref="9", cmd_ref="4", items=[Item(target="./X")])
    p = prepare(orig)
    assert p.command is not orig and p.command.cmd_id is None and p.command.msg_ref is None
    assert orig.cmd_id == "77"                                          # the caller's object as it was
    s = opened(enc)
    s.queue("g", p)
    get = sent(codec.decode(codec.encode(s.next_message(now=1))))[0]
    assert (get.cmd_id, get.msg_ref, get.cmd_ref) == ("3", None, None)


def test_atomic_goes_out_as_a_numbered_copy_and_children_report_their_index(enc):
    codec = CODECS[enc]
    atomic = Command(name="Atomic", commands=[Command(name="Replace", items=[Item(target="./A", data="1")]),
                                              Command(name="Delete", items=[Item(target="./B")])])
    p = prepare(atomic)
    assert not p.shared
    s = opened(enc)
    s.queue("plain-before", prepare(Command(name="Get", items=[Item(target="./G")])))
    s.queue("atomic", p)
    s.queue("plain-after", prepare(Command(name="Get", items=[Item(target="./H")])))
    reply = s.next_message(now=1)
    assert sent(reply)[1] is not atomic and atomic.cmd_id is None
    wire = codec.decode(codec.encode(reply))
    before, at, after = sent(wire)
    ids = [before.cmd_id, at.cmd_id, *[c.cmd_id for c in at.commands], after.cmd_id]
    assert ids == ["3", "4", "5", "6", "7"]
    ev = s.receive(statuses_for(wire, {"6": "500"}), now=2)
    got = [(e.handle, e.cmd, e.status, e.index) for e in ev if isinstance(e, StatusReceived)]
    assert got == [("plain-before", "Get", 200, -1), ("atomic", "Atomic", 200, -1),
                   ("atomic", "Replace", 200, 0), ("atomic", "Delete", 500, 1),
                   ("plain-after", "Get", 200, -1)]


def test_prepared_commands_split_across_messages_by_max_msg_size(enc):
    codec = CODECS[enc]
    s = opened(enc, sid="9", max_msg_size=2000)
    big = prepare(Command(name="Replace", items=[Item(target="./Vendor/Blob", data="x" * 700)]))
    for i in range(6):
        s.queue(i, big)
    sizes, handles = [], []
    msg_id = 1
    while True:
        reply = s.next_message(now=1)
        sizes.append(len(codec.encode(reply)))
        wire = codec.decode(codec.encode(reply))
        assert len(sent(wire)) >= 1
        if reply.final:
            break
        msg_id += 1                         # the device asks for the rest (Alert 1222)
        s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="9", msg_id=str(msg_id),
                                      target=SERVER, source=IMEI),
                          commands=statuses_for(wire, {}).commands + [
                              Command(name="Alert", cmd_id="99", data="1222")], final=False), now=1)
    assert max(sizes) <= 2000 and len(sizes) >= 3


def test_size_estimate_counts_the_cmdids_the_encoder_adds(enc):
    from dmengine._session import estimate_size
    codec = CODECS[enc]
    cmds = [Command(name="Get", items=[Item(target=f"./N{i}")]) for i in range(300)]
    m = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1", target=IMEI,
                            source=SERVER), commands=cmds, final=True)
    m.number_commands = True
    assert estimate_size(m, enc) >= len(codec.encode(m))


def test_md5_cred_with_a_lone_surrogate_in_the_name_is_a_protocol_error():
    from dmengine import auth
    from dmengine._message import Cred
    acc = auth.DmAccount(dev_id=IMEI, username="dev", client_secret="pw", client_nonce=b"n" * 16)
    s = DmSession(SessionConfig(server_id="acme", server_uri=SERVER, require_auth="md5"), session_key="x",
                  resp_uri=SERVER, now=0)
    hdr = SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1", target=SERVER, source=IMEI,
                  source_name="de\udc80v", cred=Cred(meta=Meta(format="b64", type=auth.AUTH_MD5),
                                                   data=auth.md5_digest("dev", "pw", b"n" * 16)))
    from dmengine.errors import ProtocolError
    with pytest.raises(ProtocolError) as info:        # only a model built in Python can hold one
        s.receive(Message(hdr=hdr, commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True),
                  now=0, account=acc)
    assert info.value.status == 400 and not s.authenticated


def test_session_object_stays_a_small_allocation():
    # CPython's small-object allocator serves requests up to 512 bytes; a session (created
    # per device session, thousands parked) must stay below, GC header (16 bytes) included
    from dmengine._session import DmSession
    assert DmSession.__basicsize__ + 16 <= 512, DmSession.__basicsize__
