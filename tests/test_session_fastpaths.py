"""The session's fast paths for the common Status and Results (_status_fast, _results_fast)
give exactly the events and replies of the general path, whatever the device answers: right,
failed, twice, for another message, for an unknown command, not at all, with Results of one or
two Items, under a SyncHdr name (hypothesis, both encodings)."""
from __future__ import annotations

import gc
import sys
import weakref

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmengine import _session, _wbxml, xmlcodec
from dmengine._message import Command, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, SessionConfig, prepare

IMEI = "IMEI:004999010640002"
SERVER = "https://dm.example.com/dm"
CODECS = {"xml": xmlcodec, "wbxml": _wbxml}
ANSWERS = ["ok", "fail", "twice", "other_msg", "unknown_ref", "silent", "two_items", "synchdr_name",
           "results_for_replace"]


def _script(cmds, enc, answers, share, handle=lambda i: i):
    codec = CODECS[enc]
    s = DmSession(SessionConfig(server_id="acme", server_uri=SERVER, encoding=enc, require_auth="none"),
                  session_key="f", resp_uri=SERVER, now=0)
    hdr = dict(ver_dtd="1.2", ver_proto="DM/1.2", session_id="7", target=SERVER, source=IMEI)
    log = [s.receive(Message(hdr=SyncHdr(msg_id="1", meta=Meta(max_msg_size="1400"), **hdr),
                             commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True), now=0)]
    for i, kind in enumerate(cmds):
        if kind == "get":
            c = Command(name="Get", items=[Item(target=f"./N/{i}")])
        elif kind == "noresp":
            c = Command(name="Replace", no_resp=True, items=[Item(target=f"./Q/{i}", data="q")])
        else:
            c = Command(name="Replace", items=[Item(target=f"./R/{i}", data="v" * (40 * i))])
        s.queue(handle(i), prepare(c) if share else c)
    msg_id, k = 1, 0
    for _ in range(40):
        reply = s.next_message(now=1)
        raw = codec.encode(reply)
        log.append(raw)
        log.append(s.take_events())
        if s.ended:
            break
        wire = codec.decode(raw)
        msg_id += 1
        ref = wire.hdr.msg_id
        out = [Command(name="Status", msg_ref=ref, cmd_ref="0", cmd="SyncHdr", data="200")]
        for c in wire.commands:
            if c.name == "Status":
                continue
            how = answers[k % len(answers)]
            k += 1
            st_ = Command(name="Status", msg_ref=ref, cmd_ref=c.cmd_id, cmd=c.name, data="200")
            if how == "silent" or c.no_resp:
                continue
            if how == "fail":
                st_.data = "404"
            elif how == "other_msg":
                st_.msg_ref = "99"
            elif how == "unknown_ref":
                st_.cmd_ref = "77"
            elif how == "synchdr_name":
                st_.cmd = "SyncHdr"
            out.append(st_)
            if how == "twice":
                out.append(Command(name="Status", msg_ref=ref, cmd_ref=c.cmd_id, cmd=c.name, data="500"))
            if (c.name == "Get" and how != "fail") or how == "results_for_replace":
                items = [Item(source=(c.items[0].target if c.items else "./X"), data="value",
                              meta=Meta(format="chr", type="text/plain"))]
                if how == "two_items":
                    items.append(Item(source="./Y", data="y"))
                out.append(Command(name="Results", msg_ref=ref, cmd_ref=c.cmd_id, items=items))
        for n, c in enumerate(out, 1):
            c.cmd_id = str(n)
        log.append(s.receive(Message(hdr=SyncHdr(msg_id=str(msg_id), **hdr), commands=out,
                                     final=wire.final), now=1))
    return log


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=st.lists(st.sampled_from(["get", "replace", "noresp"]), min_size=1, max_size=10),
       enc=st.sampled_from(["xml", "wbxml"]),
       answers=st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=12), share=st.booleans())
def test_fast_paths_give_the_general_paths_events(cmds, enc, answers, share):
    fast = _script(cmds, enc, answers, share)
    _session._use_fast_paths(False)
    try:
        general = _script(cmds, enc, answers, share)
    finally:
        _session._use_fast_paths(True)
    assert fast == general


def test_session_events_hold_their_fields_and_let_cycles_go():
    # the session builds events from a free list with fields stored directly (_events.raw_*):
    # every field is a counted reference, released with the event, and an event stays
    # visible to the cycle collector (a handle that keeps its own outcome is freed)
    class Handle:
        pass

    handles = [Handle() for _ in range(8)]
    before = [sys.getrefcount(h) for h in handles]
    for _ in range(200):                     # more events than the free list keeps
        log = _script(["get", "replace"] * 4, "wbxml", ["ok", "two_items"], True,
                      handle=lambda i: handles[i])
        outcomes = [e for part in log if isinstance(part, list) for e in part
                    if getattr(e, "handle", None) in handles]
        assert {e.handle for e in outcomes} == set(handles)
        assert all(gc.is_tracked(e) for e in outcomes)
        del log, outcomes
    assert [sys.getrefcount(h) for h in handles] == before
    log = _script(["get"], "xml", ["ok"], True, handle=lambda i: handles[0])
    handles[0].outcomes = [e for part in log if isinstance(part, list) for e in part
                           if getattr(e, "handle", None) is handles[0]]
    assert handles[0].outcomes
    gone = weakref.ref(handles[0])
    del log, handles
    gc.collect()
    assert gone() is None
