"""Issue 13, device port: each finding driven the way an attacker would, with raw HTTP against a
real engine (LMDB store, device port, broker).  Every test here failed on the code before the
fix it names (see SECURITY.md)."""
from __future__ import annotations

import asyncio
import base64
import pathlib
import re
import time
from typing import Any, Awaitable, Callable

import msgspec
import pytest
import uvloop

from dmengine import _wbxml, auth
from dmengine.broker import BrokerConfig
from dmengine.engine import Engine, EngineConfig
from dmengine.errors import CodecError
from dmengine.message import Command, Item, Message, SyncHdr
from dmengine.model import Device, DmAccount, QueryOp, Task, TaskResult, TaskState, UpdateOp
from dmengine.notify.loopback import LoopbackGateway

S = TaskState
VICTIM = "IMEI:356938035643809"
ATTACKER = "IMEI:490154203237518"
CLIENT_NONCE = b"client-nonce-0001"
SERVER_NONCE = b"server-nonce-0001"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def account(name: str, password: str | None = "pw-" + "x" * 12, **kw: Any) -> DmAccount:
    return DmAccount(server_id="dmengine", client_name=name, client_password=password,
                     server_password="srv-secret", client_nonce=b64(CLIENT_NONCE),
                     server_nonce=b64(SERVER_NONCE), **kw)


# --- raw messages ----------------------------------------------------------------------------


def cred_md5(name: str, password: str, nonce: bytes) -> str:
    return (f"<Cred><Meta><Format xmlns='syncml:metinf'>b64</Format>"
            f"<Type xmlns='syncml:metinf'>syncml:auth-md5</Type></Meta>"
            f"<Data>{auth.md5_digest(name, password, nonce)}</Data></Cred>")


def message(source: str, body: str, *, session_id: str = "1A2B", msg_id: int = 1,
            name: str | None = None, cred: str = "", target: str = "http://dm/dm",
            final: bool = True) -> bytes:
    loc_name = f"<LocName>{name}</LocName>" if name else ""
    return (f"<SyncML xmlns='SYNCML:SYNCML1.2'><SyncHdr><VerDTD>1.2</VerDTD>"
            f"<VerProto>DM/1.2</VerProto><SessionID>{session_id}</SessionID>"
            f"<MsgID>{msg_id}</MsgID><Target><LocURI>{target}</LocURI></Target>"
            f"<Source><LocURI>{source}</LocURI>{loc_name}</Source>{cred}</SyncHdr>"
            f"<SyncBody>{body}{'<Final/>' if final else ''}</SyncBody></SyncML>").encode()


def alert(cmd_id: int, code: int) -> str:
    return f"<Alert><CmdID>{cmd_id}</CmdID><Data>{code}</Data></Alert>"


def devinfo(cmd_id: int, dev_id: str) -> str:
    return (f"<Replace><CmdID>{cmd_id}</CmdID><Item><Source><LocURI>./DevInfo/DevId</LocURI>"
            f"</Source><Data>{dev_id}</Data></Item></Replace>")


def generic_alert(cmd_id: int, correlator: str, result: int = 200) -> str:
    return (f"<Alert><CmdID>{cmd_id}</CmdID><Data>1226</Data><Correlator>{correlator}</Correlator>"
            f"<Item><Source><LocURI>./FUMO/1</LocURI></Source><Meta>"
            f"<Type xmlns='syncml:metinf'>org.openmobilealliance.dm.firmwareupdate."
            f"downloadandupdate</Type><Format xmlns='syncml:metinf'>int</Format></Meta>"
            f"<Data>{result}</Data></Item></Alert>")


def server_chal_status(cmd_id: int, msg_ref: int, nonce: bytes) -> str:
    """A Status for the server's SyncHdr carrying a Chal: the device's nonce for the server."""
    return (f"<Status><CmdID>{cmd_id}</CmdID><MsgRef>{msg_ref}</MsgRef><CmdRef>0</CmdRef>"
            f"<Cmd>SyncHdr</Cmd><Chal><Meta><Format xmlns='syncml:metinf'>b64</Format>"
            f"<Type xmlns='syncml:metinf'>syncml:auth-md5</Type>"
            f"<NextNonce xmlns='syncml:metinf'>{b64(nonce)}</NextNonce></Meta></Chal>"
            f"<Data>401</Data></Status>")


async def post(url: str, body: bytes, *, ctype: str = "application/vnd.syncml.dm+xml",
               source_address: str | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 POST over a fresh TCP connection (no client library in between), from
    ``source_address`` if given (any 127.x address reaches a loopback server)."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", url)
    assert m, url
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(source_address, 0) if source_address else None)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def status_of_synchdr(reply: bytes) -> str | None:
    m = re.search(rb"<Cmd>SyncHdr</Cmd>.*?<Data>(\d+)</Data>", reply, re.S)
    return m.group(1).decode() if m else None


def resp_uri(reply: bytes) -> str | None:
    m = re.search(rb"<RespURI>([^<]+)</RespURI>", reply)
    return m.group(1).decode() if m else None


# --- the engine ----------------------------------------------------------------------------


def run_engine(tmp_path: pathlib.Path, scenario: Callable[[Engine], Awaitable[None]], *,
               overrides: dict[str, Any] | None = None, gateway: Any = None,
               broker: BrokerConfig | None = None) -> None:
    async def main() -> None:
        sent: list[tuple[str, bytes]] = []

        async def on_pkg0(msisdn: str, pkg0: bytes) -> object:
            sent.append((msisdn, pkg0))
            return True

        engine = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                                     broker=broker or BrokerConfig(tick_interval=3600),
                                     server_overrides=overrides or {}),
                        gateway=gateway or LoopbackGateway(on_pkg0))
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.stop()

    uvloop.run(main())


async def pending_query(engine: Engine, dev_id: str) -> str:
    """A QUERY waiting for the device: its session stays open after package 2."""
    assert engine.broker is not None
    return await engine.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), dev_id=dev_id,
                                            notify=False)


async def waiting_fumo_task(engine: Engine, dev_id: str) -> Task:
    """A FUMO task whose Exec the device accepted: it waits for the Generic Alert 1226."""
    assert engine.store is not None
    task = Task(task_id="t-fumo-victim", dev_id=dev_id, op=UpdateOp(content_id="c1"),
                state=S.IN_PROGRESS, correlator="t-fumo-victim",
                result=TaskResult(statuses={"Exec ./FUMO/1/DownloadAndUpdate": 200}),
                deadline=time.time() + 3600)
    return await engine.store.create_task(task)


# --- 1. a message that never authenticated changes tasks --------------------------------------


def test_unauthenticated_abort_message_does_not_reach_the_tasks(tmp_path):
    """Alert 1223 first skips authentication; the Generic Alert after it must not act."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        task = await waiting_fumo_task(engine, VICTIM)
        body = message(VICTIM, alert(1, 1223) + generic_alert(2, task.task_id, 200),
                       name="victim")
        status, reply = await post(engine.device_url, body)
        assert status == 200
        assert b"1223" in reply or b"SyncHdr" in reply
        after = await store.get_task(task.task_id)
        assert after.state == S.IN_PROGRESS, after.cause
        assert await store.due_entries(time.time() + 10) == []     # no charging event either

    run_engine(tmp_path, scenario)


def test_generic_alert_acts_only_on_the_devices_own_tasks(tmp_path):
    """An authenticated device reporting a Generic Alert for another device's task."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        await store.create_device(Device(dev_id=ATTACKER, msisdn="+15550002",
                                         account=account("attacker", "attacker-pw-1")))
        task = await waiting_fumo_task(engine, VICTIM)
        body = message(ATTACKER, alert(1, 1201) + devinfo(2, ATTACKER)
                       + generic_alert(3, task.task_id, 200),
                       name="attacker", cred=cred_md5("attacker", "attacker-pw-1", CLIENT_NONCE))
        status, reply = await post(engine.device_url, body)
        assert status == 200
        assert status_of_synchdr(reply) == "212"          # the attacker did authenticate
        await asyncio.sleep(0.1)
        after = await store.get_task(task.task_id)
        assert after.state == S.IN_PROGRESS, after.cause
        assert await store.due_entries(time.time() + 10) == []

    run_engine(tmp_path, scenario)


def test_generic_alert_in_an_unauthenticated_message_does_not_act(tmp_path):
    """A package 1 with wrong credentials: the Generic Alert in it is not acted on."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        task = await waiting_fumo_task(engine, VICTIM)
        body = message(VICTIM, alert(1, 1201) + devinfo(2, VICTIM) + generic_alert(3, task.task_id),
                       name="victim", cred=cred_md5("victim", "guessed", CLIENT_NONCE))
        status, reply = await post(engine.device_url, body)
        assert status == 200 and status_of_synchdr(reply) == "401"
        assert (await store.get_task(task.task_id)).state == S.IN_PROGRESS

    run_engine(tmp_path, scenario)


# --- 2. session take-over without the RespURI token -------------------------------------------


def test_bare_path_does_not_route_into_a_live_session(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        await pending_query(engine, VICTIM)
        # the victim opens its session (authenticated) and is told its RespURI
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), session_id="7F01", name="victim",
            cred=cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)))
        assert status == 200 and status_of_synchdr(reply) == "212"
        uri = resp_uri(reply)
        assert uri and uri.startswith(engine.device_url + "/")
        token = uri.rsplit("/", 1)[1]
        # the attacker knows Source and SessionID (package 0 carries the SessionID) and posts
        # a package 3 to the bare path
        status, stolen = await post(engine.device_url, message(
            VICTIM, server_chal_status(1, 1, b"x" * 16).replace("401", "200"),
            session_id="7F01", msg_id=2))
        assert token.encode() not in stolen
        assert status_of_synchdr(stolen) != "200" or b"1223" in stolen
        # the victim's session goes on at its RespURI
        status, reply = await post(uri, message(
            VICTIM, "<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef>"
                    "<Cmd>SyncHdr</Cmd><Data>200</Data></Status>",
            session_id="7F01", msg_id=2, target=uri))
        assert status == 200 and status_of_synchdr(reply) == "200", reply

    run_engine(tmp_path, scenario)


def test_unauthenticated_package1_does_not_end_a_live_session(tmp_path):
    """A forged package 1 with the victim's Source and SessionID on the bare path: the live
    session is ended only by a package 1 that authenticates."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        await pending_query(engine, VICTIM)
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), session_id="7F02", name="victim",
            cred=cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)))
        uri = resp_uri(reply)
        assert uri
        status, forged = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), session_id="7F02", name="victim",
            cred=cred_md5("victim", "guess", CLIENT_NONCE)))
        assert status_of_synchdr(forged) == "401"
        token = uri.rsplit("/", 1)[1]
        assert token in engine.server.sessions, "the live session was ended by a forgery"
        status, reply = await post(uri, message(
            VICTIM, "<Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef>"
                    "<Cmd>SyncHdr</Cmd><Data>200</Data></Status>",
            session_id="7F02", msg_id=2, target=uri))
        assert status == 200 and status_of_synchdr(reply) == "200", reply

    run_engine(tmp_path, scenario)


def test_package0_session_ids_come_from_the_system_random_source(tmp_path):
    """The SessionID of package 0 is drawn from ``secrets`` (not a seedable Mersenne Twister
    whose outputs predict the next ones)."""
    import random
    from dmengine.scheduler import Scheduler
    random.seed(1)
    ids_a = [Scheduler.new_session_id() for _ in range(8)]
    random.seed(1)
    ids_b = [Scheduler.new_session_id() for _ in range(8)]
    assert ids_a != ids_b
    assert all(1 <= i <= 0xFFFF for i in ids_a)


# --- 3. unauthenticated writes to a device's stored nonces -----------------------------------


def test_failed_package1_does_not_touch_the_stored_nonces(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        before = (await store.get_device(VICTIM)).account
        for body in (
            # wrong credentials, and a Chal giving the server a new nonce
            message(VICTIM, server_chal_status(1, 0, b"attacker-nonce!!") + alert(2, 1201)
                    + devinfo(3, VICTIM), name="victim",
                    cred=cred_md5("victim", "guess", CLIENT_NONCE)),
            # an abort (no authentication at all) with the same Chal
            message(VICTIM, server_chal_status(1, 0, b"attacker-nonce!!") + alert(2, 1223),
                    session_id="2B2B", name="victim"),
        ):
            status, reply = await post(engine.device_url, body)
            assert status == 200
        after = (await store.get_device(VICTIM)).account
        assert after.client_nonce == before.client_nonce
        assert after.server_nonce == before.server_nonce

    run_engine(tmp_path, scenario)


def test_authenticated_session_still_saves_its_nonces(tmp_path):
    """The fix keeps the rotation: after a right digest the issued nonce is stored."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
            cred=cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)))
        assert status_of_synchdr(reply) == "212"
        m = re.search(rb"<NextNonce[^>]*>([^<]+)</NextNonce>", reply)
        assert m
        for _ in range(50):
            acc = (await store.get_device(VICTIM)).account
            if acc.client_nonce == m.group(1).decode():
                break
            await asyncio.sleep(0.02)
        assert acc.client_nonce == m.group(1).decode()

    run_engine(tmp_path, scenario)


# --- 4. memory exhaustion without credentials ------------------------------------------------


def _string_table_bomb(n_items: int, size: int) -> bytes:
    """A package 1 whose Items all refer to one long string-table entry."""
    data = "A" * size
    items = [Item(data=data) for _ in range(n_items)]
    msg = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1", msg_id="1",
                              target="http://dm/dm", source=VICTIM),
                  commands=[Command(name="Alert", cmd_id="1", data="1201"),
                            Command(name="Replace", cmd_id="2", items=items)], final=True)
    return _wbxml.encode(msg, string_table=True)


def test_string_table_references_have_a_decoded_size_budget():
    bomb = _string_table_bomb(1200, 8000)
    assert len(bomb) < 17 * 1024                      # fits the device port's body limit
    with pytest.raises(CodecError, match="decoded"):
        _wbxml.decode(bomb)                           # ~9.6 MB of text from 17 KB
    # an honest message that uses the string table still decodes
    ok = _string_table_bomb(4, 200)
    assert len(_wbxml.decode(ok).commands[1].items) == 4


def test_string_table_bomb_is_refused_on_the_device_port(tmp_path):
    async def scenario(engine: Engine) -> None:
        bomb = _string_table_bomb(1200, 8000)
        status, reply = await post(engine.device_url, bomb,
                                   ctype="application/vnd.syncml.dm+wbxml")
        assert status == 400 and b"decoded" in reply
        assert not engine.server.sessions

    run_engine(tmp_path, scenario)


def test_token_path_package1_obeys_the_session_cap(tmp_path):
    async def scenario(engine: Engine) -> None:
        body = message(ATTACKER, alert(1, 1201) + devinfo(2, ATTACKER), name="nobody",
                       cred=cred_md5("nobody", "x", b"n"))
        status, _ = await post(engine.device_url, body)
        assert status == 200 and len(engine.server.sessions) == 1
        for i in range(5):
            status, _ = await post(f"{engine.device_url}/made-up-token-{i}",
                                   body.replace(b"1A2B", f"S{i}".encode()))
            assert status == 503
        assert len(engine.server.sessions) == 1

    run_engine(tmp_path, scenario, overrides={"max_sessions": 1})


def test_overlong_source_and_session_id_are_refused(tmp_path):
    async def scenario(engine: Engine) -> None:
        for body in (message("IMEI:" + "9" * 5000, alert(1, 1201)),
                     message(VICTIM, alert(1, 1201), session_id="F" * 5000)):
            status, reply = await post(engine.device_url, body)
            assert status == 200
            assert status_of_synchdr(reply) == "400", reply[:400]
        assert not engine.server.sessions

    run_engine(tmp_path, scenario)


def test_unauthenticated_sessions_are_kept_briefly_and_small(tmp_path):
    """A package 1 that fails authentication: its session waits for the retry only
    ``auth_timeout`` seconds (not the 300 s idle timeout), and its challenge reply does not
    repeat every Item's refs."""
    async def scenario(engine: Engine) -> None:
        items = "".join(f"<Item><Source><LocURI>./DevInfo/Ext/{'x' * 40}{i}</LocURI></Source>"
                        f"<Data>v</Data></Item>" for i in range(120))
        body = message(ATTACKER, alert(1, 1201) + f"<Replace><CmdID>2</CmdID>{items}</Replace>",
                       name="nobody", cred=cred_md5("nobody", "x", b"n"))
        status, reply = await post(engine.device_url, body)
        assert status == 200 and status_of_synchdr(reply) == "401"
        assert len(reply) < 2000, len(reply)          # no SourceRef per Item
        assert len(engine.server.sessions) == 1
        await asyncio.sleep(1.6)
        assert not engine.server.sessions

    run_engine(tmp_path, scenario, overrides={"auth_timeout": 0.5, "tick": 0.1})


# --- 5. an account without a password ------------------------------------------------------


def test_account_without_password_or_key_is_refused(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim", None)))
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
            cred=cred_md5("victim", "", CLIENT_NONCE)))
        assert status == 200
        assert status_of_synchdr(reply) == "401", reply

    run_engine(tmp_path, scenario)


def test_account_with_keys_only_authenticates(tmp_path):
    """DmAccount's keys (K = B64(MD5(name:password))) suffice for MD5: no password stored."""
    async def scenario(engine: Engine) -> None:
        store = engine.store
        key = auth.md5_key("victim", "the-real-password").decode()
        skey = auth.md5_key("dmengine", "srv-secret").decode()
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim", None, client_key=key,
                                                         server_key=skey)))
        acc = (await store.get_device(VICTIM)).account
        acc = msgspec.structs.replace(acc, server_password=None)
        await store.update_device(VICTIM, {"account": acc})
        for pw, want in (("", "401"), ("the-real-password", "212")):
            status, reply = await post(engine.device_url, message(
                VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
                session_id=f"K{len(pw)}",
                cred=cred_md5("victim", pw, CLIENT_NONCE)))
            assert status_of_synchdr(reply) == want, reply
        # and our own Cred for the device comes from the server key
        assert auth.server_cred("dmengine", "srv-secret", SERVER_NONCE).encode() in reply

    run_engine(tmp_path, scenario)


# --- 13. a full disk: outcomes are not dropped while the session goes on ----------------------


def test_full_store_ends_the_session_instead_of_dropping_outcomes(tmp_path):
    """The store's map cannot grow (a full disk): the device is told 500 and its session
    ends; the task is not reported done, and nothing acknowledged is lost."""
    from dmengine.errors import StoreError
    from dmengine.store.lmdb import LmdbStore

    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        tid = await pending_query(engine, VICTIM)
        with pytest.raises(StoreError):
            for r in range(1000):                 # fill the map until a write fails
                await store.import_devices(
                    [Device(dev_id=f"IMEI:{35000000000000 + r * 400 + i:015d}",
                            msisdn=f"+1666{r * 400 + i:07d}") for i in range(400)])
        for i in range(100_000):                  # and the pages a failed batch left free
            try:
                await store.create_device(Device(dev_id=f"IMEI:{36000000000000 + i:015d}"))
            except StoreError:
                break
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
            cred=cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)))
        assert status == 200
        assert b"<Get>" not in reply                   # the session does not go on
        assert b"1223" in reply and status_of_synchdr(reply) in ("500", "511"), reply
        assert not engine.server.sessions
        assert (await store.get_task(tid)).state == S.PENDING

    async def main() -> None:
        store = LmdbStore(tmp_path / "store", map_size=1 << 20, max_map_size=1 << 20)
        engine = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                                     broker=BrokerConfig(tick_interval=3600)),
                        gateway=None, store=store)
        await engine.start()
        try:
            await scenario(engine)
        finally:
            await engine.stop()

    uvloop.run(main())


# --- 6. brute force: failures count across sessions, per account and per address ------------


def test_password_guessing_is_slowed_down_and_the_device_recovers(tmp_path):
    from dmengine.authguard import AuthGuardConfig
    right = cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)

    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        answers = []
        for i in range(6):           # every guess in a new session: 3 tries each, before
            status, reply = await post(engine.device_url, message(
                VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim", session_id=f"G{i}",
                cred=cred_md5("victim", f"guess-{i}", CLIENT_NONCE)))
            answers.append(status if status != 200 else status_of_synchdr(reply))
        assert answers[:3] == ["401", "401", "401"]
        assert answers[3:] == [503, 503, 503], answers
        # while blocked, even the right password is not looked at
        status, _ = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim", session_id="R0",
            cred=right))
        assert status == 503
        # the attacker stops; once the backoff has run out the device gets in again
        await asyncio.sleep(2.2)
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim", session_id="R1",
            cred=right))
        assert status == 200 and status_of_synchdr(reply) == "212", reply
        import aiohttp
        async with aiohttp.ClientSession() as http:
            async with http.get(engine.api_url + "metrics") as r:
                text = await r.text()
        assert 'dmengine_device_auth_failures_total{' in text
        assert engine.registry.get_sample_value(
            "dmengine_device_auth_failures_total",
            {"scheme": "md5", "cause": "wrong_credentials"}) == 3.0
        assert 'dmengine_device_rejected_total{cap="auth_backoff"} 4.0' in text

    run_engine(tmp_path, scenario, overrides={"brute_force": AuthGuardConfig(
        account_free=3, address_free=1000, base_delay=2.0)})


def test_one_address_guessing_many_accounts_is_slowed_down_others_are_not(tmp_path):
    from dmengine.authguard import AuthGuardConfig

    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        answers = []
        for i in range(8):            # a different account each time: no account count grows
            dev = f"IMEI:{490154203237500 + i}"
            status, reply = await post(engine.device_url, message(
                dev, alert(1, 1201) + devinfo(2, dev), name=f"u{i}", session_id=f"H{i}",
                cred=cred_md5(f"u{i}", "guess", CLIENT_NONCE)), source_address="127.0.0.3")
            answers.append(status if status != 200 else status_of_synchdr(reply))
        assert answers[:5] == ["401"] * 5 and answers[5:] == [503] * 3, answers
        # a device behind another address is not held up by it
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
            cred=cred_md5("victim", "pw-" + "x" * 12, CLIENT_NONCE)), source_address="127.0.0.4")
        assert status == 200 and status_of_synchdr(reply) == "212", reply

    run_engine(tmp_path, scenario, overrides={"brute_force": AuthGuardConfig(
        account_free=100, address_free=5, base_delay=30.0)})


def test_devices_with_stale_nonces_are_not_taken_for_guessing(tmp_path):
    """Many devices behind one address whose stored nonce is stale fail their first try and
    authenticate on the challenge's new nonce: the address is not slowed down by them."""
    from dmengine.authguard import AuthGuardConfig

    async def scenario(engine: Engine) -> None:
        for i in range(8):
            dev = f"IMEI:{490154203237600 + i}"
            await engine.store.create_device(Device(dev_id=dev, msisdn=f"+1555010{i}",
                                                    account=account(f"s{i}")))
            status, reply = await post(engine.device_url, message(
                dev, alert(1, 1201) + devinfo(2, dev), name=f"s{i}", session_id=f"N{i}",
                cred=cred_md5(f"s{i}", "pw-" + "x" * 12, b"an-old-nonce")))
            assert status == 200 and status_of_synchdr(reply) == "401", (i, status, reply)
            nonce = base64.b64decode(re.search(rb"<NextNonce[^>]*>([^<]+)<", reply).group(1))
            retry_uri = resp_uri(reply)
            status, reply = await post(retry_uri, message(
                dev, alert(1, 1201) + devinfo(2, dev), name=f"s{i}", session_id=f"N{i}",
                msg_id=2, target=retry_uri, cred=cred_md5(f"s{i}", "pw-" + "x" * 12, nonce)))
            assert status == 200 and status_of_synchdr(reply) == "212", (i, reply)

    run_engine(tmp_path, scenario, overrides={"brute_force": AuthGuardConfig(
        account_free=100, address_free=3, base_delay=30.0)})


def test_failing_other_accounts_does_not_wash_out_a_blocked_accounts_count(tmp_path):
    """The auth guard's table is bounded; it drops the key whose last failure is oldest.  An
    attacker who has got the victim's account blocked must not free it by failing on other
    accounts until the table drops it: the table keeps keys by their last failure (it used
    to drop the key inserted first, here the victim's, and its block with it)."""
    from dmengine.authguard import AuthGuardConfig

    async def scenario(engine: Engine) -> None:
        await engine.store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                                account=account("victim")))
        n = iter(range(100))

        async def guess(name: str, dev: str) -> object:
            i = next(n)
            status, reply = await post(engine.device_url, message(
                dev, alert(1, 1201) + devinfo(2, dev), name=name, session_id=f"W{i}",
                cred=cred_md5(name, "guess", CLIENT_NONCE)), source_address=f"127.0.1.{i}")
            return status if status != 200 else status_of_synchdr(reply)

        others = [(f"o{i}", f"IMEI:{490154203237700 + i}") for i in range(3)]
        assert await guess("victim", VICTIM) == "401"     # the victim's first failure
        assert await guess(*others[0]) == "401"
        assert await guess(*others[1]) == "401"
        assert await guess("victim", VICTIM) == "401"     # its second: blocked from now on
        assert await guess("victim", VICTIM) == 503
        assert await guess(*others[2]) == "401"           # the table is full: one key goes
        assert await guess("victim", VICTIM) == 503       # still blocked (o0 went, not it)

    run_engine(tmp_path, scenario, overrides={"brute_force": AuthGuardConfig(
        account_free=2, address_free=1000, base_delay=30.0, max_keys=3)})
