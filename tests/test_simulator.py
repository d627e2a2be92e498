"""The virtual device's client engine, sans-IO, on the protocol vectors and built messages.

Server messages are real bytes: the vectors of ../shared/vectors or messages built with the
model and encoded by the project's codecs.  Over-HTTP behaviour is in test_server.py.
"""
from __future__ import annotations

import asyncio

import pytest

from dmengine import _wbxml
from dmengine.auth import basic_cred, decode_nonce, md5_digest
from dmengine.message import Chal, Command, Item, Message, Meta, SyncHdr
from dmengine.simulator.device import (ClientSession, DeviceProfile, FaultPlan, VirtualDevice,
                                       norm_uri)

try:
    from dmengine import xmlcodec as _xmlmod
except ImportError:
    from dmengine import _xml as _xmlmod

CODECS = {"wbxml": _wbxml, "xml": _xmlmod}


def _dev(encoding: str = "wbxml", **kw) -> VirtualDevice:
    faults = kw.pop("faults", None)
    return VirtualDevice(7, DeviceProfile(encoding=encoding, **kw), faults=faults)


def _server_msg(cmds: list[Command], *, final: bool = True, msg_id: str = "1",
                hdr_code: str = "212", chal: Chal | None = None,
                resp_uri: str | None = "http://srv/dm/tok", max_msg: str | None = None) -> Message:
    status = Command(name="Status", msg_ref="1", cmd_ref="0", cmd="SyncHdr", data=hdr_code,
                     chal=chal)
    for i, c in enumerate([status] + cmds, 1):
        c.cmd_id = str(i)
    return Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id=msg_id,
                               target="IMEI:356938030000007", source="http://srv/dm",
                               resp_uri=resp_uri,
                               meta=Meta(max_msg_size=max_msg) if max_msg else None),
                   commands=[status] + cmds, final=final)


def _exchange(cs: ClientSession, msg: Message) -> Message | None:
    codec = CODECS[cs.encoding]
    cs.receive(codec.encode(msg))
    out = cs.next()
    return None if out is None else codec.decode(out.body)


def _statuses(msg: Message) -> dict[str, str]:
    return {c.cmd_ref: c.data for c in msg.commands if c.name == "Status"}


@pytest.mark.parametrize("encoding", ["wbxml", "xml"])
def test_package1_carries_devinfo_alert_and_md5_cred(encoding):
    dev = _dev(encoding)
    dev.client_nonce = b"\x01\x02"
    cs = dev.session(session_id="1A2B", alert=1200)
    out = cs.first()
    assert out.content_type == f"application/vnd.syncml.dm+{encoding}"
    msg = CODECS[encoding].decode(out.body)
    assert msg.hdr.session_id == "1A2B" and msg.hdr.msg_id == "1" and msg.final
    assert msg.hdr.source == dev.dev_id and msg.hdr.source_name == "dev7"
    assert msg.hdr.cred.meta.type == "syncml:auth-md5"
    assert msg.hdr.cred.data == md5_digest("dev7", "clientpw-7", b"\x01\x02")
    alert, replace = msg.commands
    assert (alert.name, alert.data) == ("Alert", "1200")
    assert {i.source: i.data for i in replace.items} == {
        "./DevInfo/DevId": dev.dev_id, "./DevInfo/Man": "Acme", "./DevInfo/Mod": "EX100",
        "./DevInfo/DmV": "1.2", "./DevInfo/Lang": "en-US"}


def test_vector_02_get_replace_exec(vectors_dir):
    dev = _dev("wbxml")
    cs = dev.session()
    cs.first()
    cs.receive((vectors_dir / "02-pkg2-server-get-replace-exec.wbxml").read_bytes())
    assert cs.url == "https://dm.example.com/dm?s=1A2B-7f3c"       # RespURI followed
    assert [(j.kind, j.url, j.correlator) for j in cs.jobs] == [
        ("downloadandupdate", "https://fw.example.com/dd/ex100-2.4.1.dd", "fw-job-8842")]
    out = _wbxml.decode(cs.next().body)
    assert out.hdr.target == "https://dm.example.com/dm?s=1A2B-7f3c"
    st = _statuses(out)
    assert st == {"0": "212", "4": "200", "5": "200", "6": "202"}
    results = [c for c in out.commands if c.name == "Results"][0]
    assert [(i.source, i.data) for i in results.items] == [
        ("./DevDetail/FwV", "2.3.9"), ("./DevDetail/SwV", "2.3.9_r1")]
    # Results come right after the Status of their Get
    names = [(c.name, c.cmd_ref) for c in out.commands]
    assert names.index(("Results", "4")) == names.index(("Status", "4")) + 1
    assert dev.value("./FUMO/1/DownloadAndUpdate/PkgURL").endswith("ex100-2.4.1.dd")
    # the next message has no commands: the session is over, no bare Status goes back
    cs.receive(_wbxml.encode(_server_msg([], msg_id="2")))
    assert cs.next() is None and cs.outcome == "completed"


def test_vector_07_atomic_rolls_back_sequence_and_choice(vectors_dir):
    dev = _dev("xml", ui_answer="accept")
    cs = dev.session()
    cs.first()
    cs.receive((vectors_dir / "07-atomic-sequence.xml").read_bytes())
    out = _xmlmod.decode(cs.next().body)
    st = _statuses(out)
    # ./Vendor does not exist: the first Add fails 404, the Atomic fails 507, the rest 215
    assert (st["4"], st["5"], st["6"], st["7"]) == ("507", "404", "215", "215")
    assert dev.node("./Vendor/Acme/Proxy") is None
    # Sequence: confirm accepted, then Delete/Exec of missing nodes give 404
    assert (st["8"], st["9"], st["10"], st["11"]) == ("200", "200", "404", "404")
    choice = [c for c in out.commands if c.name == "Status" and c.cmd_ref == "12"][0]
    assert choice.data == "200" and [i.data for i in choice.items] == ["1"]


def test_tree_statuses_404_405_418_and_copy():
    dev = _dev("wbxml")
    cs = dev.session()
    cs.first()
    cmds = [
        Command(name="Get", items=[Item(target="./Nope")]),
        Command(name="Get", items=[Item(target="./DMAcc/1/AppAuth/1/AAuthSecret")]),
        Command(name="Replace", items=[Item(target="./DevInfo/Mod", data="x")]),
        Command(name="Add", items=[Item(target="./DevInfo/DevId", data="x")]),
        Command(name="Add", meta=Meta(format="node"), items=[Item(target="./FUMO/2")]),
        Command(name="Add", items=[Item(target="./FUMO/2/PkgName", data="pkg")]),
        Command(name="Copy", items=[Item(source="./FUMO/2/PkgName", target="./FUMO/2/Copy")]),
        Command(name="Get", items=[Item(target="./FUMO/2")]),
        Command(name="Delete", items=[Item(target="./DevInfo")]),
        Command(name="Delete", items=[Item(target="./FUMO/2")]),
        Command(name="Exec", items=[Item(target="./DevInfo/Man")]),
        Command(name="Get", items=[Item(target="./Inbox")]),
        Command(name="Get", items=[Item(target="DevDetail/URI/")]),
    ]
    out = _exchange(cs, _server_msg(cmds))
    st = _statuses(out)
    assert [st[str(i)] for i in range(2, 15)] == [
        "404", "405", "405", "418", "200", "200", "200", "200", "405", "200", "405", "405",
        "200"]
    res = {c.cmd_ref: c for c in out.commands if c.name == "Results"}
    assert res["9"].items[0].data == "PkgName/Copy"
    assert res["9"].items[0].meta.format == "node"
    assert res["14"].items[0].data == "MaxDepth/MaxTotLen/MaxSegLen"
    assert dev.node("./FUMO/2/PkgName") is None and dev.node("./FUMO/2") is None


def test_ui_alerts_answered_per_configuration():
    confirm = Command(name="Alert", data="1101", items=[Item(data=""), Item(data="Update?")])
    text = Command(name="Alert", data="1102", items=[Item(data="MAXLEN=8"), Item(data="PIN?")])
    for answer, want in (("accept", "200"), ("decline", "304"), ("cancel", "214"),
                         ("timeout", "408"), ("unsupported", "406")):
        cs = _dev("wbxml", ui_answer=answer).session()
        cs.first()
        out = _exchange(cs, _server_msg([confirm, text]))
        assert _statuses(out)["2"] == want
    cs = _dev("wbxml", faults=FaultPlan(decline_optin=True)).session()
    cs.first()
    out = _exchange(cs, _server_msg([confirm, text]))
    st = [c for c in out.commands if c.name == "Status"]
    assert st[1].data == "304" and st[2].data == "200" and st[2].items[0].data == "ok"


def test_md5_challenge_resends_package1_with_new_nonce():
    dev = _dev("wbxml")
    cs = dev.session()
    cs.first()
    chal = Chal(meta=Meta(type="syncml:auth-md5", format="b64",
                          next_nonce="obLD1OX2BxgpOktcbX6PkA=="))
    out = _exchange(cs, _server_msg([], hdr_code="401", chal=chal))
    assert dev.client_nonce == decode_nonce("obLD1OX2BxgpOktcbX6PkA==")
    assert out.hdr.msg_id == "2"
    assert out.hdr.cred.data == md5_digest("dev7", "clientpw-7", dev.client_nonce)
    assert [c.name for c in out.commands] == ["Status", "Alert", "Replace"]
    # still refused after MAX_AUTH_ATTEMPTS: the device gives up
    for _ in range(3):
        cs.receive(_wbxml.encode(_server_msg([], hdr_code="401", chal=chal)))
        if cs.done:
            break
        cs.next()
    assert cs.outcome == "auth_failed"


def test_large_object_from_server_213_then_assembled_and_size_checked():
    dev = _dev("wbxml")
    cs = dev.session()
    cs.first()
    payload = bytes(range(256)) * 6
    first = Command(name="Replace", items=[Item(target="./FUMO/1/Update/PkgData",
                                                meta=Meta(format="bin", size=str(len(payload))),
                                                data=payload[:1000], more_data=True)])
    out = _exchange(cs, _server_msg([first], final=False))
    assert _statuses(out)["2"] == "213"
    assert any(c.name == "Alert" and c.data == "1222" for c in out.commands)
    assert not out.final
    last = Command(name="Replace", items=[Item(target="./FUMO/1/Update/PkgData",
                                               meta=Meta(format="bin"), data=payload[1000:])])
    out = _exchange(cs, _server_msg([last], msg_id="2"))
    assert _statuses(out)["2"] == "200"
    assert dev.pkg_data == payload and dev.fumo_state == 50
    # a short object is refused with 424
    cs = _dev("wbxml").session()
    cs.first()
    _exchange(cs, _server_msg([first], final=False))
    short = Command(name="Replace", items=[Item(target="./FUMO/1/Update/PkgData", data=b"xy")])
    out = _exchange(cs, _server_msg([short], msg_id="2"))
    assert _statuses(out)["2"] == "424"


def test_new_command_during_large_object_gets_1225():
    cs = _dev("wbxml").session()
    cs.first()
    first = Command(name="Replace", items=[Item(target="./FUMO/1/Update/PkgData",
                                                meta=Meta(format="bin", size="3000"),
                                                data=b"a" * 1000, more_data=True)])
    _exchange(cs, _server_msg([first], final=False))
    out = _exchange(cs, _server_msg([Command(name="Get", items=[Item(target="./DevInfo/Mod")])],
                                    msg_id="2"))
    alerts = [c for c in out.commands if c.name == "Alert"]
    assert alerts[0].data == "1225" and alerts[0].items[0].target == "./FUMO/1/Update/PkgData"
    assert _statuses(out)["2"] == "200"


def test_big_results_split_over_messages_with_moredata():
    dev = _dev("wbxml")
    dev._set("./Diag/Log", ("chr", "G", None, "L" * 3000))
    cs = dev.session()
    cs.first()
    get = Command(name="Get", items=[Item(target="./Diag/Log")])
    cs.receive(_wbxml.encode(_server_msg([get], max_msg="1200")))
    sizes, chunks = [], []
    out = cs.next()
    for i in range(10):
        sizes.append(len(out.body))
        msg = _wbxml.decode(out.body)
        res = [c for c in msg.commands if c.name == "Results"]
        if res:
            chunks.append(res[0].items[0])
        if msg.final:
            break
        # the server's "next message" answer: Status 213 for the chunk, Alert 1222, no Final
        ack = Command(name="Status", msg_ref=msg.hdr.msg_id, cmd_ref="3", cmd="Results",
                      data="213")
        nxt = Command(name="Alert", data="1222")
        cs.receive(_wbxml.encode(_server_msg([ack, nxt], msg_id=str(i + 2), max_msg="1200",
                                             final=False)))
        out = cs.next()
        assert not any(c.name == "Alert" and c.data == "1222"
                       for c in _wbxml.decode(out.body).commands)
    assert all(s <= 1200 for s in sizes)
    assert len(chunks) >= 3
    assert chunks[0].meta.size == "3000" and all(c.more_data for c in chunks[:-1])
    assert not chunks[-1].more_data
    assert "".join(c.data for c in chunks) == "L" * 3000


def test_server_abort_ends_the_session_without_reply(vectors_dir):
    cs = _dev("xml").session()
    cs.first()
    cs.receive((vectors_dir / "10-session-abort-1223.xml").read_bytes())
    assert cs.next() is None and cs.outcome == "aborted"


def test_fumo_jobs_and_generic_alert():
    dev = _dev("wbxml", faults=FaultPlan(fail_update=410))
    cs = dev.session()
    cs.first()
    cmds = [Command(name="Replace", items=[Item(target="./FUMO/1/DownloadAndUpdate/PkgURL",
                                                data="http://fw/pkg.bin")]),
            Command(name="Exec", correlator="c-1",
                    items=[Item(target="./FUMO/1/DownloadAndUpdate")]),
            Command(name="Exec", items=[Item(target="./FUMO/1/Update")])]
    cs.receive(_wbxml.encode(_server_msg(cmds)))
    assert [j.kind for j in cs.jobs] == ["downloadandupdate"]
    job = cs.jobs.pop()
    assert dev.update_result(100, 100) == 410 and dev.update_result(99, 100) == 402
    dev.finish_job(job, 410)
    out = _wbxml.decode(cs.next().body)
    st = _statuses(out)
    assert (st["2"], st["3"], st["4"]) == ("200", "202", "403")   # second update refused: busy
    ga = [c for c in out.commands if c.name == "Alert" and c.data == "1226"][0]
    assert ga.correlator == "c-1"
    assert ga.items[0].source == "./FUMO/1" and ga.items[0].data == "410"
    assert ga.items[0].meta.type == "org.openmobilealliance.dm.firmwareupdate.downloadandupdate"
    assert dev.fumo_state == 80 and dev.fwv == "2.3.9"


def test_norm_uri():
    assert norm_uri("DevInfo/Mod") == "./DevInfo/Mod"
    assert norm_uri("./DevInfo/Mod/") == "./DevInfo/Mod"
    assert norm_uri("./FUMO/1?list=Struct") == "./FUMO/1"
    assert norm_uri(None) == "."


def test_simulate_cli_against_a_device_port_process_then_sigterm(tmp_path, capsys):
    """`python -m dmengine.simulator.devport` in a subprocess, `simulate` in this process, then SIGTERM:
    the server drains and exits 0."""
    import json
    import signal
    import subprocess
    import sys

    from dmengine.simulator.cli import main

    proc = subprocess.Popen([sys.executable, "-m", "dmengine.simulator.devport", "--port", "0",
                             "--shutdown-deadline", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("device port: http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split(": ", 1)[1].strip()
        rc = main(["simulate", "--url", url, "--devices", "6", "--sessions", "2",
                   "--encoding", "xml", "--concurrency", "3"])
        summary = json.loads(capsys.readouterr().out)
        assert rc == 0
        assert summary["sessions"] == 12 and summary["outcomes"] == {"completed": 12}
        assert summary["messages"] >= 12 and summary["latency_p99_ms"] is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):       # no ResourceWarning when the GC gets them
            f.close()


# --- the per-message shortcuts keep the results of the slow paths ---------------------------------


def test_device_caches_follow_their_inputs():
    """The cached MD5 key / DevInfo items give what auth.md5_digest / the tree give, also after
    the nonce, the secret or the profile changed."""
    dev = _dev()
    for nonce in (b"\x01\x02", b"n2"):
        dev.client_nonce = nonce
        assert dev.md5_cred(dev.client_secret) == md5_digest(dev.username, dev.client_secret,
                                                             nonce)
    assert dev.md5_cred("other") == md5_digest(dev.username, "other", b"n2")
    assert [i.data for i in dev.devinfo_items()] == [dev.dev_id, "Acme", "EX100", "1.2", "en-US"]
    dev.profile.mod = "EX200"
    assert dev.devinfo_items()[2].data == "EX200"
    msg = _wbxml.decode(dev.session(session_id="1").first().body)
    replace = msg.commands[1]
    assert replace.name == "Replace" and replace.cmd_id == "2" and \
        replace.items[2].data == "EX200"


def test_http_split_fast_path_matches_urlsplit():
    from dmengine.simulator.fleet import HttpClient
    from urllib.parse import urlsplit
    for url in ("http://127.0.0.1:8080/dm", "http://Host.Example/dm?s=1A-2", "http://h:80",
                "http://h", "http://h?x=1", "http://u:p@h:81/x", "http://[::1]:8080/dm",
                "https://dm.example.com/dm", "http://h:81/a#frag"):
        u = urlsplit(url)
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        scheme = u.scheme
        want = ((scheme, u.hostname, u.port or (443 if scheme == "https" else 80)), path,
                u.netloc)
        assert HttpClient._split(url) == want, url



def test_raw_response_head_split_into_headers():
    from dmengine.simulator.fleet import _header_dict, _retry_after
    head = b"HTTP/1.1 503 Busy\r\nRetry-After: 5\r\nX-A:  b c \r\n\r\nbody: not a header"
    assert _header_dict(head) == {"retry-after": "5", "x-a": "b c"}
    assert _retry_after(head) == "5" and _retry_after(b"HTTP/1.1 503 Busy\r\n\r\n") == "1"


@pytest.mark.parametrize("encoding", ["wbxml", "xml"])
@pytest.mark.parametrize("scheme", ["md5", "basic", "hmac", "none"])
def test_package1_template_gives_what_the_encoder_gives(encoding, scheme):
    """first() fills the device's encoded package-1 template (from its second session with
    the same values: the first is encoded in full); the bytes are those of the message built
    and encoded in full, for every auth scheme, after the nonce, a fault or the profile
    changed, and with an alert of a different length."""
    dev = _dev(encoding, auth=scheme)
    for i, (nonce, alert) in enumerate(((b"\x01\x02", 1201), (b"n" * 16, 1200),
                                        (b"\xff", 1201), (b"m" * 8, 1200))):
        dev.client_nonce = nonce
        if i == 2:
            dev.faults = FaultPlan(wrong_credentials=True)
            dev.profile.mod = "EX2000-long-model-name"
        cs = dev.session(session_id=format(0xA + 0x1111 * i, "X"), alert=alert)
        out = cs.first()
        cred = None
        if scheme in ("md5", "basic"):
            secret = dev.client_secret + ("-wrong" if dev.faults.wrong_credentials else "")
            cred = dev.md5_cred(secret) if scheme == "md5" else \
                basic_cred(dev.username, secret)
        ref = dev.session(session_id=cs.session_id, alert=alert)
        want = ref._encode(ref._pkg1_message(cs.session_id, cred, str(alert)))
        assert out.body == want
        assert cs.msg_id == 1 and cs.messages_sent == 1
        msg = CODECS[encoding].decode(out.body)
        assert msg.hdr.session_id == cs.session_id and msg.commands[0].data == str(alert)
        assert msg.commands[1].items[2].data == dev.profile.mod
        if scheme == "hmac":
            assert any(k == "x-syncml-hmac" for k, _ in out.headers)
        # the template: built at the second session with the same values (i = 1, 3)
        assert dev._pkg1 is not None and (dev._pkg1[1] is False) == (i in (0, 2))
    assert dev._pkg1[1] is not None or scheme not in ("md5", "basic", "none", "hmac")


def test_request_heads_from_the_server_base_match_a_fresh_build():
    """A session's RespURI gets its request head from its server's cached base (not kept by
    URL); the bytes are those built from scratch for that URL."""
    from dmengine.simulator.fleet import HttpClient
    headers = (("User-Agent", "sim"), ("Accept", "a"), ("Content-Type", "b"))
    client = HttpClient()
    urls = ["http://127.0.0.1:8080/dm", "http://127.0.0.1:8080/dm/tok1",
            "http://127.0.0.1:8080/dm/tok2?s=1", "http://Host.Example/dm", "http://Host.Example/x",
            "http://h:81/a#frag", "http://h:81/b", "https://s/dm", "https://s/dm/t"]
    for url in urls * 2:
        for method in ("POST", "GET"):
            fresh = HttpClient()._head(method, url, headers)
            assert client._head(method, url, headers) == fresh, (method, url)


def test_idle_connections_are_reused_oldest_first():
    """The client's kept-alive connections to one origin are taken oldest first, each in turn
    (both the slow path and the fast POST path): requests then spread over a server's
    processes as the kernel spread the connections.  Newest first, one connection — the
    one whose answer came last — carried every request."""
    from dmengine.simulator.fleet import HttpClient

    writers: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        port = str(writer.get_extra_info("peername")[1]).encode()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")), b"0"))
                await reader.readexactly(n)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(port), port))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/dm"
        client = HttpClient(timeout=5)
        try:
            # three connections: three requests at once
            first = await asyncio.gather(*(client.request("POST", url, body=b"x")
                                           for _ in range(3)))
            ports = [body for _, _, body in first]
            assert len(set(ports)) == 3
            slow = [(await client.request("POST", url, body=b"x"))[2] for _ in range(6)]
            assert len(set(slow[:3])) == 3 and slow[3:] == slow[:3], slow
            fast = []
            for _ in range(6):
                conn = client.post_now(url, b"x", ())
                assert conn is not None
                fast.append((await conn.waiter)[2])
            assert len(set(fast[:3])) == 3 and fast[3:] == fast[:3], fast
        finally:
            client.close()
            server.close()
            for w in writers:
                w.close()
                await w.wait_closed()
            await server.wait_closed()
    asyncio.run(main())
