"""Message.number_commands: both encoders give a command without CmdID the number after the
previous command's (depth first), and leave given CmdIDs alone; off by default."""
from __future__ import annotations

import pytest

from dmengine import _wbxml, xmlcodec
from dmengine._message import Command, Item, Message, SyncHdr


@pytest.fixture(params=[xmlcodec, _wbxml], ids=["xml", "wbxml"])
def codec(request):
    return request.param


def msg(cmds, number=True):
    m = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1", target="IMEI:1",
                            source="https://s"), commands=cmds, final=True)
    m.number_commands = number
    return m


def ids(m):
    out = []

    def walk(c):
        out.append(c.cmd_id)
        for sub in c.commands or ():
            walk(sub)

    for c in m.commands:
        walk(c)
    return out


def get(uri="./X"):
    return Command(name="Get", items=[Item(target=uri)])


def test_numbers_follow_given_ids_depth_first(codec):
    m = msg([Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="0", cmd="SyncHdr", data="200"),
             Command(name="Status", cmd_id="2", msg_ref="1", cmd_ref="1", cmd="Alert", data="200"),
             get(), Command(name="Atomic", commands=[get(), get()]), get(),
             Command(name="Alert", cmd_id="40", data="1222"), get()])
    assert ids(codec.decode(codec.encode(m))) == ["1", "2", "3", "4", "5", "6", "7", "40", "41"]
    assert ids(m) == ["1", "2", None, None, None, None, None, "40", None]   # the model is not changed


def test_first_command_without_id_is_one_and_big_numbers_work(codec):
    m = msg([get() for _ in range(1205)])
    got = ids(codec.decode(codec.encode(m)))
    assert got[0] == "1" and got[9] == "10" and got[99] == "100" and got[-1] == "1205"


def test_a_given_id_that_is_not_a_number_is_kept_and_counted(codec):
    m = msg([Command(name="Get", cmd_id="x7", items=[Item(target="./A")]), get()])
    assert ids(codec.decode(codec.encode(m))) == ["x7", "2"]


def test_off_by_default_and_after_decoding(codec):
    m = msg([get()], number=False)
    assert not Message().number_commands
    back = codec.decode(codec.encode(m))
    assert ids(back) == [None] and not back.number_commands


def test_string_table_encoding_numbers_too():
    m = msg([get("./Same"), get("./Same"), get("./Same")])
    assert ids(_wbxml.decode(_wbxml.encode(m, string_table=True))) == ["1", "2", "3"]
