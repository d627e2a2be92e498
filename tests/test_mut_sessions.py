"""Issue 18, mutmut's survivors in dmengine/sessions.py: the device port's handler driven with
real DM sessions (the session engine authenticates a package 1 and queues the commands; its
events come from it, or are the records it would emit for a device's answers) over a real
LMDB store, each outcome compared whole — the task's state, cause, DM status, result code,
result and history; the commands queued (name, target, data, correlator, handle); the device
record the session wrote (account, nonces, DevInfo, DevDetail)."""
from __future__ import annotations

import asyncio
import base64
import logging
import pathlib
from typing import Any, Awaitable, Callable

import pytest

from dmengine import auth, logs, xmlcodec
from dmengine._message import Command, Cred, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, SessionConfig
from dmengine.commands import Commands
from dmengine.config import BrokerConfig
from dmengine.content import ContentService
from dmengine.errors import StoreError
from dmengine.events import (AuthFailed, Authenticated, CommandNotDelivered, DeviceIdentified,
                             GenericAlert, NonceIssued, ResultsReceived, ServerNonceReceived,
                             SessionEnded, StatusReceived, UserAlertAnswered)
from dmengine.model import (BootstrapOp, Capability, Content, Device, DiagOp, DmAccount, ExecOp,
                            FumoMode, NodeChange, QueryOp, SetOp, Task, TaskResult, TaskState,
                            UpdateOp)
from dmengine.sessions import (BY_USERNAME_SIZE, CommandHandle, DeviceSessions, SessionWork,
                               TaskRun, _Recent, _text, stored_nonce, waiting_alert)
from dmengine.store.lmdb import LmdbStore
from dmengine.tasks import Tasks

S = TaskState
NOW = 1_800_000_000.0
SERVER = "https://dm.example.com/dm"
DEV = "IMEI:356938035643809"
IMEI = "356938035643809"
SHA = "ef" * 32
FUMO_DL = "org.openmobilealliance.dm.firmwareupdate.download"
FUMO_DU = "org.openmobilealliance.dm.firmwareupdate.downloadandupdate"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dm_session(dev_id: str = DEV, *, username: str | None = None,
               password: str = "pw") -> tuple[DmSession, list[Any]]:
    """A real session after the device's package 1 (no authentication asked, or BASIC with
    ``username``), and the events that package made."""
    cfg = SessionConfig(server_id="dmengine", server_uri=SERVER, encoding="xml",
                        require_auth="basic" if username else "none")
    s = DmSession(cfg, session_key=f"k-{dev_id}-{username}", resp_uri=SERVER, now=0)
    cred = None
    account = None
    if username:
        cred = Cred(meta=Meta(format="b64", type="syncml:auth-basic"),
                    data=auth.basic_cred(username, password))
        account = auth.DmAccount(dev_id=dev_id, username=username, client_secret=password)
    ev = s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="5",
                                       msg_id="1", target=SERVER, source=dev_id, cred=cred),
                           commands=[Command(name="Alert", cmd_id="1", data="1201"),
                                     Command(name="Replace", cmd_id="2", items=[
                                         Item(source="./DevInfo/Mod", data="EX100")])],
                           final=True), now=0, account=account)
    assert s.authenticated
    return s, ev


def sent(s: DmSession) -> list[tuple[Any, ...]]:
    """The management commands of the session's next message: (name, correlator, data,
    [(target, data)]).  The device acknowledges the message (the events of that are not
    handed to the handler: each test hands it the answers it is about), so that the session
    builds its next message from what is queued then."""
    # as the device reads it: a shared (prepared) command has no CmdID before it is encoded
    msg = xmlcodec.decode(xmlcodec.encode(s.next_message(now=1)))
    out = [(c.name, c.correlator, c.data, [(it.target, it.data) for it in c.items or ()])
           for c in msg.commands if c.name not in ("Status", "Results")]
    mid = msg.hdr.msg_id
    answers = [Command(name="Status", cmd_id="1", msg_ref=mid, cmd_ref="0", cmd="SyncHdr",
                       data="200")]
    answers += [Command(name="Status", cmd_id=str(i + 2), msg_ref=mid, cmd_ref=c.cmd_id,
                        cmd=c.name, data="200")
                for i, c in enumerate(c for c in msg.commands if c.name != "Status")]
    s.receive(Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="5",
                                  msg_id=str(int(mid) + 1), target=SERVER, source=s.device_id),
                      commands=answers, final=True), now=1)
    return out


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, store: LmdbStore, h: DeviceSessions, clock: Clock) -> None:
        self.store, self.h, self.clock = store, h, clock

    async def device(self, dev_id: str = DEV, *, imei: str | None = IMEI,
                     account: DmAccount | None = None, **kw: Any) -> Device:
        return await self.store.create_device(Device(dev_id=dev_id, imei=imei, account=account,
                                                     **kw))

    async def task(self, op: Any, task_id: str = "t1", *, dev_id: str = DEV,
                   state: TaskState = S.NOTIFIED, **kw: Any) -> Task:
        await self.h.tasks.create(Task(task_id=task_id, dev_id=dev_id, op=op,
                                       correlator=kw.pop("correlator", f"c-{task_id}"), **kw))
        if state != S.PENDING:
            await self.store.transition(task_id, state, cause="set up")
        return await self.store.get_task(task_id)

    async def get(self, task_id: str = "t1") -> Task:
        return await self.store.get_task(task_id)

    async def history(self, task_id: str = "t1") -> list[tuple[Any, ...]]:
        return [(h.to_state, h.cause, h.dm_status, h.result_code)
                for h in await self.h.tasks.history(task_id)]

    async def connect(self, dev_id: str = DEV, **kw: Any) -> DmSession:
        """A session of the device: its package 1's events handled."""
        s, ev = dm_session(dev_id, **kw)
        await self.h.on_events(s, ev)
        return s

    async def answer(self, s: DmSession, *events: Any) -> None:
        await self.h.on_events(s, list(events))


def run(tmp_path: pathlib.Path, scenario: Callable[[World], Awaitable[None]], *,
        config: BrokerConfig | None = None) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=1 << 24)
        clock = Clock()
        cfg = config or BrokerConfig(retry_delays=(7.0,), retry_jitter=0.0, alert_wait=600.0,
                                     alert_followups=2, optin_timeout=45, optin_text="OK?",
                                     content_base_url="http://h/c")
        tasks = Tasks(store, cfg, None, clock)
        content = ContentService(store, tmp_path / "content")
        h = DeviceSessions(store, tasks, Commands(store, cfg, content), cfg, clock=clock)
        try:
            await scenario(World(store, h, clock))
        finally:
            await store.close()
    asyncio.run(main())


def cmd(tid: str = "t1", i: int = 0) -> CommandHandle:
    return CommandHandle(tid, "cmd", i)


# --- account_for ----------------------------------------------------------------------------

def _acc(a: Any) -> tuple[Any, ...]:
    return (a.dev_id, a.username, a.client_secret, a.client_key(), a.client_nonce,
            a.server_id, a.server_secret, a.server_key(), a.server_nonce, a.resync)


def test_account_for_maps_the_stored_account(tmp_path):
    async def scenario(w: World) -> None:
        await w.device(account=DmAccount(
            server_id="srv", client_name="u1", client_password="cpw", client_key="ck",
            server_password="spw", server_key="sk", client_nonce=b64(b"cn"),
            server_nonce=b64(b"sn"), resync_until=NOW + 1))
        got = await w.h.account_for(DEV, "u1")
        # with the passwords kept, the keys given are not used (MD5 of the password is)
        assert _acc(got) == (DEV, "u1", "cpw", auth.md5_key("u1", "cpw"), b"cn", "srv", "spw",
                             None, b"sn", True)
        assert _acc(await w.h.account_for(DEV, None))[1] == "u1"     # no user name: by DevId
        w.clock.now = NOW + 1                      # the re-synchronisation window is over
        assert (await w.h.account_for(DEV, "u1")).resync is False
        # keys only: the keys go; no nonces on record: none
        await w.device("IMEI:2", imei=None, account=DmAccount(
            server_id="srv", client_name="u2", client_key="ck", server_key="sk"))
        got = await w.h.account_for("IMEI:2", "u2")
        assert _acc(got) == ("IMEI:2", "u2", None, b"ck", None, "srv", None, b"sk", None, False)
        await w.device("IMEI:3", imei=None, account=DmAccount(
            server_id="srv", client_name="u3", client_password="p", client_nonce=""))
        assert (await w.h.account_for("IMEI:3", "u3")).client_nonce is None
    run(tmp_path, scenario)


def test_account_for_refuses_other_names_unknown_devices_and_empty_accounts(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device(account=DmAccount(server_id="s", client_name="u1", client_password="p"))
        assert await w.h.account_for(DEV, "intruder") is None
        assert await w.h.account_for("IMEI:404", "u1") is None
        assert await w.h.account_for(None, None) is None
        await w.device("IMEI:2", imei=None)                     # no account at all
        assert await w.h.account_for("IMEI:2", None) is None
        await w.device("IMEI:3", imei=None, account=DmAccount(server_id="s", client_name="u3"))
        with caplog.at_level(logging.WARNING, logger="dmengine.sessions"):
            assert await w.h.account_for("IMEI:3", "u3") is None
        assert [r.getMessage() for r in caplog.records if r.name == "dmengine.sessions"] == [
            "device IMEI:3 has a DM account without a password or key: refused"]
        # an account without a user name is the device's whatever name it gives
        await w.device("IMEI:4", imei=None, account=DmAccount(server_id="s", client_password="p"))
        assert (await w.h.account_for("IMEI:4", "anyone")).username == ""
    run(tmp_path, scenario)


def test_account_for_uses_the_bootstrapped_account_when_the_device_does(tmp_path):
    async def scenario(w: World) -> None:
        old = DmAccount(server_id="s", client_name="old", client_password="p-old")
        new = DmAccount(server_id="s", client_name="new", client_password="p-new")
        await w.device(account=old, pending_account=new)
        assert _acc(await w.h.account_for(DEV, "new"))[1:3] == ("new", "p-new")
        assert _acc(await w.h.account_for(DEV, "old"))[1:3] == ("old", "p-old")
        assert _acc(await w.h.account_for(DEV, None))[1:3] == ("old", "p-old")
        await w.device("IMEI:2", imei=None, pending_account=new)      # only the new one
        assert _acc(await w.h.account_for("IMEI:2", None))[1:3] == ("new", "p-new")
        assert await w.h.account_for("IMEI:2", "old") is None
    run(tmp_path, scenario)


def test_the_record_is_found_by_devid_imei_or_the_notified_user_name(tmp_path):
    async def scenario(w: World) -> None:
        acc = DmAccount(server_id="s", client_name="u1", client_password="p")
        await w.device("MSISDN:+4915100000001", imei=IMEI, account=acc)
        a = await w.h.account_for(DEV, "u1")                 # the IMEI in the DevId
        assert a is not None and a.dev_id == DEV
        assert await w.h.account_for("IMEI:490154203237518", "u1") is None
        w.h.by_username["u1"] = "MSISDN:+4915100000001"     # notified: a replaced phone
        a = await w.h.account_for("IMEI:490154203237518", "u1")
        assert a is not None and a.dev_id == "IMEI:490154203237518"
        a = await w.h.account_for(None, "u1")
        assert a is not None and a.dev_id == "MSISDN:+4915100000001"
        assert await w.h.account_for(None, "u2") is None
        w.h.by_username["u9"] = "IMEI:gone"
        assert await w.h.account_for(None, "u9") is None
    run(tmp_path, scenario)


# --- a task's run: commands, statuses, results ------------------------------------------------

def test_a_query_runs_to_success_and_keeps_the_devdetail_it_learned(tmp_path):
    async def scenario(w: World) -> None:
        await w.device(devdetail={"./DevDetail/HwV": "h1"})
        await w.task(QueryOp(nodes=["./DevDetail/FwV", "./DevInfo/Lang"]), next_attempt=NOW + 99)
        s = await w.connect()
        dev = await w.store.get_device(DEV)
        assert (dev.last_contact, dev.devinfo) == (NOW, {"./DevInfo/Mod": "EX100"})
        t = await w.get()
        assert (t.state, t.cause, t.next_attempt) == (S.IN_PROGRESS,
                                                      "device connected; commands sent", None)
        assert s.pending_handles == [cmd("t1", 0), cmd("t1", 1)]
        assert sent(s) == [("Get", None, None, [("./DevDetail/FwV", None)]),
                           ("Get", None, None, [("./DevInfo/Lang", None)])]
        assert w.h.in_session("t1")
        await w.answer(s, StatusReceived(cmd("t1", 0), "Get", 200, target="./DevDetail/FwV"),
                       StatusReceived(cmd("t1", 1), "Get", 200, target="./DevInfo/Lang"),
                       ResultsReceived(cmd("t1", 0), (("./DevDetail/FwV", "chr", None, b"2.3"),)))
        assert (await w.get()).state == S.IN_PROGRESS        # one Results still owed
        await w.answer(s, ResultsReceived(cmd("t1", 1), (("./DevInfo/Lang", None, None, "de"),
                                                         (None, None, None, "no uri"))))
        t = await w.get()
        assert (t.state, t.cause) == (S.SUCCEEDED, "all commands succeeded")
        assert t.result == TaskResult(
            statuses={"Get ./DevDetail/FwV": 200, "Get ./DevInfo/Lang": 200},
            nodes={"./DevDetail/FwV": "2.3", "./DevInfo/Lang": "de"},
            message="all commands succeeded")
        assert (await w.store.get_device(DEV)).devdetail == {"./DevDetail/HwV": "h1",
                                                             "./DevDetail/FwV": "2.3"}
        assert not w.h.in_session("t1") and "t1" not in w.h.running
        # answers about a task that is done, and handles that are not ours, change nothing
        await w.answer(s, StatusReceived(cmd("t1", 0), "Get", 500, target="./X"),
                       StatusReceived(("other", 1), "Get", 500),
                       ResultsReceived("nope", ()))
        assert (await w.get()).state == S.SUCCEEDED
    run(tmp_path, scenario)


def test_a_get_answered_204_owes_no_results_and_a_get_that_fails_none(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A"]), "t1")
        await w.task(QueryOp(nodes=["./B"]), "t2")
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd("t1"), "Get", 204, target="./A"))
        t = await w.get("t1")
        assert (t.state, t.result.statuses, t.result.nodes) == (S.SUCCEEDED, {"Get ./A": 204}, {})
        await w.answer(s, StatusReceived(cmd("t2"), "Get", 404))
        t = await w.get("t2")
        # (a status that names no target: the command alone, one space)
        assert (t.state, t.cause) == (S.FAILED, "Get failed with status 404")
        assert (await w.history("t2"))[-1] == (S.FAILED, "Get failed with status 404",
                                               404, None)
    run(tmp_path, scenario)


def test_a_set_records_each_status_and_fails_on_the_first_error(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(SetOp(changes=[NodeChange(uri="./A", value="1"),
                                    NodeChange(uri="./B", value="2"),
                                    NodeChange(uri="./C", value="3")]))
        s = await w.connect()
        assert [c[0] for c in sent(s)] == ["Replace"] * 3
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200, target="./A"),
                       StatusReceived(cmd("t1", 1), "Replace", 405, target="./B"),
                       # statuses inside an Atomic: recorded, not counted
                       StatusReceived(cmd("t1", 2), "Replace", 500, target="./C", index=0),
                       StatusReceived(cmd("t1", 2), "Replace", 500, target="./C", index=1))
        assert (await w.get()).state == S.IN_PROGRESS
        await w.answer(s, StatusReceived(cmd("t1", 2), "Replace", 418))
        t = await w.get()
        assert (t.state, t.cause) == (S.FAILED, "Replace ./B failed with status 405")
        assert t.result.statuses == {"Replace ./A": 200, "Replace ./B": 405,
                                     "Replace ./C [0]": 500, "Replace ./C [1]": 500,
                                     "Replace": 418}
        assert (await w.history())[-1][2] == 405
    run(tmp_path, scenario)


def test_a_failure_without_a_status_code_and_a_later_sessions_result_merge(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A"]), result=TaskResult(
            statuses={"Get ./Z": 200}, nodes={"./Z": "z"}, fumo_result=3))
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd(), "Get", 200, target="./A"),
                       ResultsReceived(cmd(), (("./A", None, None, None),)))
        t = await w.get()
        assert t.result == TaskResult(statuses={"Get ./Z": 200, "Get ./A": 200},
                                      nodes={"./Z": "z", "./A": ""}, fumo_result=3,
                                      message="all commands succeeded")
    run(tmp_path, scenario)


def test_a_command_not_delivered_puts_the_task_back_for_a_retry(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A", "./B"]))
        s = await w.connect()
        await w.answer(s, CommandNotDelivered(cmd("t1", 1), "too large"))
        t = await w.get()
        assert (t.state, t.cause, t.next_attempt) == (
            S.PENDING, "session ended before the device answered (too large)", NOW + 7.0)
        assert not w.h.in_session("t1")
        # its other answers are not the task's any more, nor is a second refusal
        await w.answer(s, CommandNotDelivered(cmd("t1", 0), "again"),
                       StatusReceived(cmd("t1", 0), "Get", 500, target="./A"),
                       SessionEnded("completed"))
        t = await w.get()
        assert (t.state, t.cause) == (S.PENDING, "session ended before the device answered "
                                                 "(too large)")
        assert [h[0] for h in await w.history()].count(S.PENDING) == 2   # created, retried
    run(tmp_path, scenario)


@pytest.mark.parametrize("end", ["ended", "closed"])
def test_a_session_that_ends_before_the_answers_retries_its_tasks(tmp_path, end):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A"]), "t1")
        await w.task(ExecOp(uri="./X"), "t2")
        s = await w.connect()
        assert w.h.in_session("t1") and w.h.in_session("t2")
        # t2's Exec was answered (all it owed): the end completes it instead
        run2 = w.h.works[id(s)].runs["t2"]
        run2.outstanding = 0
        run2.statuses["Exec ./X"] = 200
        if end == "ended":
            await w.answer(s, SessionEnded("timeout"))
            why = "session ended (timeout) before the device answered"
        else:
            await w.h.on_session_closed(s, "dropped")
            why = "session closed (dropped) before the device answered"
        assert id(s) not in w.h.works and w.h.running == {}
        t = await w.get("t1")
        assert (t.state, t.cause, t.next_attempt) == (S.PENDING, why, NOW + 7.0)
        t = await w.get("t2")
        assert (t.state, t.cause) == (S.SUCCEEDED, "all commands succeeded")
        await w.h.on_session_closed(s, "again")              # nothing left: nothing happens
        assert (await w.get("t1")).cause == why
    run(tmp_path, scenario)


def test_a_cancelled_task_is_dropped_from_its_session(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./DevDetail/FwV"]))
        s = await w.connect()
        await w.h.tasks.cancel("t1", "operator")
        w.h.drop_task("t1")
        w.h.drop_task("t1")                                  # twice: no harm
        assert not w.h.in_session("t1")
        await w.answer(s, StatusReceived(cmd(), "Get", 200, target="./DevDetail/FwV"),
                       ResultsReceived(cmd(), (("./DevDetail/FwV", None, None, "9"),)),
                       SessionEnded("completed"))
        t = await w.get()
        assert (t.state, t.cause) == (S.CANCELLED, "operator")
        # its answers are not read any more: nothing learned from them
        assert (await w.store.get_device(DEV)).devdetail == {}
    run(tmp_path, scenario)


def test_what_the_task_needs_decides_whether_it_starts(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        # a bad UPDATE fails at once, naming why; an empty DIAG succeeds at once
        await w.task(UpdateOp(), "bad")
        await w.store.create_capability(Capability(oid="cap-e", mo_paths={"diag": " , "}))
        await w.store.update_device(DEV, {"capability": "cap-e"})
        await w.task(DiagOp(), "empty")
        # waits for its FUMO alert; reported in this very message; worked on elsewhere
        await w.task(UpdateOp(content_id="fw"), "waiting", state=S.IN_PROGRESS,
                     result=TaskResult(statuses={"Exec ./FUMO/1/DownloadAndUpdate": 202}))
        await w.task(ExecOp(uri="./X"), "reported", correlator="corr-r", state=S.IN_PROGRESS)
        await w.task(ExecOp(uri="./Y"), "elsewhere")
        # an IN_PROGRESS task not waiting for an alert (its session broke): started again
        await w.task(ExecOp(uri="./Z"), "interrupted", state=S.IN_PROGRESS)
        other, _ = dm_session()
        w.h._add_run(w.h.works.setdefault(id(other), SessionWork()),
                     TaskRun(task=await w.get("elsewhere")))
        s, ev = dm_session()
        ev.append(GenericAlert("corr-r", None, None, None, None, "200"))
        ev.append(GenericAlert(None, None, "x", None, None, "1"))
        await w.h.on_events(s, ev)
        bad = await w.get("bad")
        assert (bad.state, bad.cause) == (
            S.FAILED, "the device's capability or firmware version is unknown: name the "
                      "content, or read ./DevDetail/FwV first (QUERY or DIAG)")
        empty = await w.get("empty")
        assert (empty.state, empty.cause) == (S.SUCCEEDED, "nothing to do")
        assert not w.h.in_session("bad") and not w.h.in_session("empty")
        assert (await w.get("waiting")).state == S.IN_PROGRESS
        assert (await w.history("waiting"))[-1][1] == "set up"
        r = await w.get("reported")
        assert (r.state, r.cause) == (S.SUCCEEDED, "Exec completed: result 200 (no type)")
        assert (await w.get("elsewhere")).state == S.NOTIFIED
        # every task after a skipped one is still looked at
        assert s.pending_handles == [cmd("interrupted")]
        assert (await w.history("interrupted"))[-1][1] == "device connected; commands sent"
    run(tmp_path, scenario)


def test_an_unknown_device_is_left_alone(tmp_path, caplog):
    async def scenario(w: World) -> None:
        with caplog.at_level(logging.INFO, logger="dmengine.sessions"):
            s = await w.connect("IMEI:490154203237518")
        assert "unknown device IMEI:490154203237518 connected; nothing to do" in [
            r.getMessage() for r in caplog.records]
        assert w.h.works[id(s)].dev_id is None and s.pending_handles == []
    run(tmp_path, scenario)


# --- opt-in -------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,state,cause", [
    (304, S.FAILED, "declined by the user"),
    (408, S.EXPIRED, "the user did not answer in time"),
    (214, S.FAILED, "cancelled by the user"),
    (500, S.FAILED, "the device could not ask the user (status 500)"),
])
def test_opt_in_answers(tmp_path, status, state, cause):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), b_optin=True, next_attempt=NOW + 5)
        s = await w.connect()
        t = await w.get()
        assert (t.state, t.cause, t.next_attempt) == (S.WAITING_USER, "asking the user (opt-in)",
                                                      None)
        assert s.pending_handles == [CommandHandle("t1", "optin")]
        assert sent(s) == [("Alert", None, "1101", [(None, "MAXDT=45&DR=1"), (None, "OK?")])]
        await w.answer(s, StatusReceived(CommandHandle("t1", "optin"), "Alert", 200))
        assert (await w.get()).state == S.WAITING_USER      # the status is not the answer
        await w.answer(s, UserAlertAnswered(CommandHandle("t1", "optin"), status, ()))
        t = await w.get()
        assert (t.state, t.cause) == (state, cause)
        assert (await w.history())[-1][2] == status
        await w.answer(s, UserAlertAnswered(CommandHandle("t1", "optin"), 200, ()))
        assert (await w.get()).state == state                 # done: a late answer is nothing
    run(tmp_path, scenario)


def test_opt_in_accepted_sends_the_commands(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X", data="go"), b_optin=True)
        s = await w.connect()
        sent(s)
        await w.answer(s, UserAlertAnswered(CommandHandle("t1", "optin"), 200, ()))
        assert (await w.history())[-1] == (S.IN_PROGRESS, "the user accepted", 200, None)
        assert cmd() in s.pending_handles
        assert sent(s) == [("Exec", "c-t1", None, [("./X", "go")])]
        await w.answer(s, StatusReceived(cmd(), "Exec", 200, target="./X"))
        assert (await w.get()).state == S.SUCCEEDED
    run(tmp_path, scenario)


def test_opt_in_unanswered_when_the_session_ends_is_asked_again(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), b_optin=True)
        s = await w.connect()
        w.h.works[id(s)].runs["t1"].outstanding = 0     # (the Alert's status came)
        await w.answer(s, SessionEnded("completed"))
        assert [h[:2] for h in (await w.history())[-2:]] == [
            (S.IN_PROGRESS, "session ended (completed) before the device answered"),
            (S.PENDING, "session ended (completed) before the device answered")]
    run(tmp_path, scenario)


# --- Exec and FUMO outcomes ----------------------------------------------------------------------

async def _fw(w: World, mode: FumoMode = FumoMode.DOWNLOAD_AND_UPDATE) -> None:
    await w.store.create_capability(Capability(oid="cap-1", mo_paths={"fumo": "./FW"},
                                               fumo_mode=mode))
    await w.store.create_content(Content(content_id="fw", name="f", size=1, sha256=SHA,
                                         capability="cap-1", from_version="1.0",
                                         to_version="2.0"))
    await w.device(capability="cap-1", devdetail={"./DevDetail/FwV": "1.0",
                                                  "./DevDetail/HwV": "h"})


def test_an_update_waits_for_its_alert_then_succeeds(tmp_path):
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.task(UpdateOp(), correlator="corr")
        s = await w.connect()
        assert sent(s) == [("Replace", None, None, [("./FW/DownloadAndUpdate/PkgURL",
                                                     "http://h/c/fw")]),
                           ("Exec", "corr", None, [("./FW/DownloadAndUpdate", None)])]
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200, target="./FW/x"),
                       StatusReceived(cmd("t1", 1), "Exec", 200, target="./FW/y"))
        t = await w.get()
        assert (t.state, t.cause, t.next_attempt) == (
            S.IN_PROGRESS, "firmware update accepted; waiting for the result alert", NOW + 600)
        assert t.result.statuses == {"Replace ./FW/x": 200, "Exec ./FW/y": 200}
        assert waiting_alert(t)
        s2 = await w.connect()                         # reports in a later session
        assert s2.pending_handles == []
        await w.answer(s2, GenericAlert("corr", None, FUMO_DU, None, None, b"200"))
        t = await w.get()
        assert (t.state, t.cause, t.result.fumo_result) == (
            S.SUCCEEDED, "firmware updated: 200 Successful", 200)
        assert (await w.history())[-1][3] == 200
        assert (await w.store.get_device(DEV)).devdetail == {"./DevDetail/HwV": "h"}
        (ch,) = (await w.store.charging_events()).items
        assert (ch.content_id, ch.content_version, ch.result_code) == ("fw", "2.0", 200)
    run(tmp_path, scenario)


def test_without_followups_an_accepted_update_is_not_woken(tmp_path):
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.task(UpdateOp(content_id="fw"))
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200),
                       StatusReceived(cmd("t1", 1), "Exec", 202))
        t = await w.get()
        assert (t.state, t.next_attempt) == (S.IN_PROGRESS, None)
        # its alert in the same message as the statuses: the alert wins, kept final
        await w.answer(s, GenericAlert("c-t1", None, None, None, None, "200"),
                       StatusReceived(cmd("t1", 1), "Exec", 500))
        t = await w.get()
        assert (t.state, t.cause) == (S.SUCCEEDED, "firmware updated: 200 Successful")
        (ch,) = (await w.store.charging_events()).items
        assert ch.content_id == "fw"
    run(tmp_path, scenario, config=BrokerConfig(alert_followups=0, alert_wait=600.0,
                                                content_base_url="http://h/c"))


def test_the_alert_may_come_before_the_exec_status_is_processed(tmp_path):
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.task(UpdateOp(content_id="fw"))
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200))
        run_ = w.h.works[id(s)].runs["t1"]
        await w.h.tasks.finish(await w.get(), S.FAILED, "alert first")
        run_.waiting_alert = True
        await w.h._complete(run_)                      # the move refused: kept as it is
        assert (await w.get()).cause == "alert first"
    run(tmp_path, scenario)


@pytest.mark.parametrize("status,state,cause", [
    (202, S.IN_PROGRESS, "Exec accepted; waiting for the result alert"),
    (200, S.SUCCEEDED, "all commands succeeded"),
])
def test_a_generic_exec_waits_only_when_accepted_for_processing(tmp_path, status, state, cause):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"))
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd(), "Exec", status, target="./X"))
        t = await w.get()
        assert (t.state, t.cause) == (state, cause)
        assert waiting_alert(t) is (status == 202)
    run(tmp_path, scenario)


@pytest.mark.parametrize("data,state,cause,code", [
    ("200", S.SUCCEEDED, "Exec completed: result 200 (acme.reboot)", 200),
    (" 1200 ", S.FAILED, "Exec failed: result 1200 (acme.reboot)", 1200),
    ("ok", S.FAILED, "unreadable result 'ok'", None),
])
def test_a_generic_exec_alert_is_its_outcome(tmp_path, data, state, cause, code):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), state=S.IN_PROGRESS, correlator="cx",
                     result=TaskResult(statuses={"Exec ./X": 202}))
        s = await w.connect()
        assert s.pending_handles == []
        await w.answer(s, GenericAlert("cx", None, "acme.reboot", None, None, data))
        t = await w.get()
        assert (t.state, t.cause) == (state, cause)
        assert (await w.history())[-1][3] == code
        if code is not None:
            assert t.result.fumo_result == code and t.result.statuses == {"Exec ./X": 202}
        assert (await w.store.charging_events()).items == [] if state == S.FAILED else True
    run(tmp_path, scenario)


@pytest.mark.parametrize("kind,data,cause", [
    (FUMO_DU, "410", "firmware downloadandupdate failed: 410 Firmware update failed"),
    (None, "500", "firmware update failed: 500 Alternate download server error / firmware "
                  "update failed"),
    (FUMO_DL, "x1", "unreadable FUMO result 'x1'"),
])
def test_a_fumo_alert_that_fails_the_update(tmp_path, kind, data, cause):
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.task(UpdateOp(content_id="fw"), state=S.IN_PROGRESS, correlator="cf")
        s = await w.connect()
        await w.answer(s, GenericAlert("cf", None, kind, None, None, data))
        t = await w.get()
        assert (t.state, t.cause) == (S.FAILED, cause)
        if data.isdigit():
            assert (await w.history())[-1][3] == int(data)
            assert t.result.fumo_result == int(data)
        assert (await w.store.get_device(DEV)).devdetail["./DevDetail/FwV"] == "1.0"
        assert (await w.store.charging_events()).items == []
    run(tmp_path, scenario)


def test_download_then_update_installs_in_the_same_session(tmp_path):
    async def scenario(w: World) -> None:
        await _fw(w, FumoMode.DOWNLOAD_THEN_UPDATE)
        await w.task(UpdateOp(), correlator="cd")
        s = await w.connect()
        assert [c[3][0][0] for c in sent(s)] == ["./FW/Download/PkgURL", "./FW/Download"]
        assert s.pending_handles == []               # the device answered both
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200),
                       StatusReceived(cmd("t1", 1), "Exec", 202))
        await w.answer(s, GenericAlert("cd", None, FUMO_DL, None, None, "200"))
        t = await w.get()
        assert (t.state, t.cause, t.correlator) == (S.IN_PROGRESS,
                                                    "download complete; installing", "t1.u")
        assert t.result.fumo_result == 200
        assert (await w.history())[-1][3] == 200
        # the install's Exec is the run's only command: queued under its first position
        assert s.pending_handles == [cmd("t1", 0)]
        assert sent(s) == [("Exec", "t1.u", None, [("./FW/Update", None)])]
        assert w.h.in_session("t1")
        await w.answer(s, StatusReceived(cmd("t1", 0), "Exec", 202),
                       GenericAlert("t1.u", None, FUMO_DU, None, None, "200"))
        t = await w.get()
        assert (t.state, t.cause) == (S.SUCCEEDED, "firmware updated: 200 Successful")
        assert [h[1] for h in (await w.history())[-3:]] == [
            "download complete; installing",
            "firmware update accepted; waiting for the result alert",
            "firmware updated: 200 Successful"]
        # the package the content store picked for the firmware before the update
        (ch,) = (await w.store.charging_events()).items
        assert (ch.content_id, ch.content_version) == ("fw", "2.0")
        assert "./DevDetail/FwV" not in (await w.store.get_device(DEV)).devdetail
    run(tmp_path, scenario)


def test_alerts_that_are_not_the_devices_to_report(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.device("IMEI:490154203237518", imei=None)
        await w.task(UpdateOp(content_id="fw"), "mine", state=S.IN_PROGRESS, correlator="c1")
        await w.task(UpdateOp(content_id="fw"), "done", state=S.FAILED, correlator="c2")
        s = await w.connect("IMEI:490154203237518")
        with caplog.at_level(logging.INFO, logger="dmengine.sessions"):
            await w.answer(s, GenericAlert("c1", None, FUMO_DU, None, None, "200"),
                           GenericAlert("c404", None, FUMO_DU, None, None, "200"),
                           GenericAlert("", None, "t", None, None, "200"))
        msgs = [r.getMessage() for r in caplog.records if r.name == "dmengine.sessions"]
        assert msgs == [
            "device IMEI:490154203237518 reported a generic alert for task mine of device "
            f"{DEV}: ignored",
            "generic alert for unknown correlator 'c404'",
            "generic alert without correlator from IMEI:490154203237518: t"]
        assert (await w.get("mine")).state == S.IN_PROGRESS
        s2 = await w.connect()
        await w.answer(s2, GenericAlert("c2", None, FUMO_DU, None, None, "200"))
        assert ((await w.get("done")).state, (await w.get("done")).cause) == (S.FAILED, "set up")
    run(tmp_path, scenario)


# --- the device's account and nonces ----------------------------------------------------------

def test_nonces_of_the_message_are_saved_with_the_devinfo_in_one_write(tmp_path):
    async def scenario(w: World) -> None:
        acc = DmAccount(server_id="dmengine", client_name="u1", client_password="pw",
                        server_nonce=b64(b"old"))
        await w.device(account=acc)
        s, ev = dm_session(username="u1")
        issued = [e for e in ev if isinstance(e, NonceIssued)]
        assert len(issued) == 1
        ev.insert(-1, ServerNonceReceived(DEV, b"srv-n"))     # before DeviceIdentified
        before = (await w.store.get_device(DEV)).version
        await w.h.on_events(s, ev)
        dev = await w.store.get_device(DEV)
        assert dev.version == before + 1
        assert (dev.account.client_nonce, dev.account.server_nonce) == (
            b64(issued[0].nonce), b64(b"srv-n"))
        assert dev.account.client_password == "pw"
        # nonces without DevInfo: written by themselves after the message
        await w.answer(s, NonceIssued(DEV, b"n2"))
        dev = await w.store.get_device(DEV)
        assert (dev.account.client_nonce, dev.account.server_nonce) == (b64(b"n2"),
                                                                        b64(b"srv-n"))
        assert w.h.works[id(s)].nonces == {}
    run(tmp_path, scenario)


def test_a_resynchronised_account_keeps_the_nonce_it_used(tmp_path):
    async def scenario(w: World) -> None:
        acc = DmAccount(server_id="dmengine", client_name="u1", client_password="pw",
                        server_nonce=b64(b"old"), resync_until=NOW + 60)
        await w.device(account=acc)
        s, ev = dm_session(username="u1")
        ev = [Authenticated("u1", "md5", b"\x00" * 16) if isinstance(e, Authenticated) else e
              for e in ev if not isinstance(e, NonceIssued)]
        await w.h.on_events(s, ev)
        a = (await w.store.get_device(DEV)).account
        assert (a.server_nonce, a.resync_until, a.client_password) == (b64(b"\x00" * 16), None,
                                                                       "pw")
        # a window still open, a device that did not need it: the window is closed
        await w.store.update_device(DEV, {"account": {"resync_until": NOW + 60}})
        s, ev = dm_session(username="u1")
        await w.h.on_events(s, [e for e in ev if not isinstance(e, NonceIssued)])
        a = (await w.store.get_device(DEV)).account
        assert (a.server_nonce, a.resync_until) == (b64(b"\x00" * 16), None)
        # neither: the account is not rewritten
        v = (await w.store.get_device(DEV)).account
        s, ev = dm_session(username="u1")
        await w.h.on_events(s, [e for e in ev if not isinstance(e, NonceIssued)])
        assert (await w.store.get_device(DEV)).account == v
    run(tmp_path, scenario)


def test_nonces_of_a_resynchronised_account_go_in_the_same_write(tmp_path):
    async def scenario(w: World) -> None:
        acc = DmAccount(server_id="dmengine", client_name="u1", client_password="pw",
                        resync_until=NOW + 60)
        await w.device(account=acc)
        s, ev = dm_session(username="u1")
        (issued,) = [e for e in ev if isinstance(e, NonceIssued)]
        await w.h.on_events(s, ev)
        a = (await w.store.get_device(DEV)).account
        assert (a.client_nonce, a.resync_until) == (b64(issued.nonce), None)
    run(tmp_path, scenario)


def test_a_device_without_an_account_gets_no_nonces_written(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        s = await w.connect()
        await w.answer(s, NonceIssued(DEV, b"n"), ServerNonceReceived(DEV, b"m"))
        assert (await w.store.get_device(DEV)).account is None
        # a session whose device has no record: nothing to write either
        s2 = await w.connect("IMEI:490154203237518")
        await w.answer(s2, NonceIssued("IMEI:490154203237518", b"n"))
        with pytest.raises(Exception):
            await w.store.get_device("IMEI:490154203237518")
    run(tmp_path, scenario)


def test_the_bootstrapped_account_is_adopted_and_the_bootstrap_succeeds(tmp_path):
    async def scenario(w: World) -> None:
        old = DmAccount(server_id="dmengine", client_name="old", client_password="p0")
        new = DmAccount(server_id="dmengine", client_name="new", client_password="p1")
        await w.device(account=old, pending_account=new)
        await w.task(BootstrapOp(account=new), state=S.NOTIFIED)
        await w.task(QueryOp(nodes=["./A"]), "q1")
        s = await w.connect(username="old")              # still the old account: not yet
        dev = await w.store.get_device(DEV)
        assert (dev.account.client_name, dev.pending_account.client_name) == ("old", "new")
        assert (await w.get()).state == S.NOTIFIED and s.pending_handles == [cmd("q1")]
        await w.task(QueryOp(nodes=["./B"]), "q2")
        s = await w.connect(username="new", password="p1")
        assert s.pending_handles == [cmd("q2")]          # looked at after the bootstrap
        dev = await w.store.get_device(DEV)
        assert (dev.account.client_name, dev.pending_account) == ("new", None)
        assert [h[:2] for h in (await w.history())[-2:]] == [
            (S.IN_PROGRESS, "device connected with the new account"),
            (S.SUCCEEDED, "device opened a session with the new account")]
    run(tmp_path, scenario)


def test_a_pending_account_is_not_adopted_for_another_name(tmp_path):
    async def scenario(w: World) -> None:
        new = DmAccount(server_id="dmengine", client_name="new", client_password="p1")
        await w.device(pending_account=new)
        s, ev = dm_session(username="new", password="p1")
        await w.h.on_events(s, [Authenticated("someone", "basic")])
        assert (await w.store.get_device(DEV)).pending_account == new
        await w.device("IMEI:2", imei=None)
        s, _ = dm_session("IMEI:2", username="x", password="p")
        await w.h.on_events(s, [Authenticated("x", "basic")])
        assert (await w.store.get_device("IMEI:2")).account is None
    run(tmp_path, scenario)


# --- sessions that did not authenticate, a store that fails -------------------------------------

def test_nothing_acts_before_the_session_authenticated(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), correlator="cx", state=S.IN_PROGRESS)
        s = DmSession(SessionConfig(server_id="dmengine", server_uri=SERVER, encoding="xml"),
                      session_key="k", now=0)
        assert not s.authenticated
        with caplog.at_level(logging.INFO, logger="dmengine.sessions"):
            await w.h.on_events(s, [
                AuthFailed("u1", "md5", 401, "bad digest", "client"),
                DeviceIdentified(DEV, {"Mod": "X"}, "1", 1201),
                GenericAlert("cx", None, None, None, None, "200")])
        assert [r.getMessage() for r in caplog.records if r.name == "dmengine.sessions"] == [
            "authentication failed (md5, client side): bad digest"]
        assert (await w.get()).state == S.IN_PROGRESS
        assert (await w.store.get_device(DEV)).devinfo == {}
        assert id(s) not in w.h.works
        # work left from before (a session that lost its authentication): settled
        w.h.works[id(s)] = work = SessionWork()
        w.h._add_run(work, TaskRun(task=await w.get(), outstanding=1))
        await w.h.on_events(s, [])
        t = await w.get()
        assert (t.state, t.cause) == (S.PENDING, "session ended before it authenticated before "
                                                 "the device answered")
        assert id(s) not in w.h.works and "t1" not in w.h.running
    run(tmp_path, scenario)


def test_a_store_that_fails_ends_the_message_with_the_error(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device()
        s, ev = dm_session()
        await w.store.close()
        with caplog.at_level(logging.ERROR, logger="dmengine.sessions"):
            with pytest.raises(StoreError):
                await w.h.on_events(s, ev)
        (rec,) = [r for r in caplog.records if r.name == "dmengine.sessions"]
        # the error's own text is in the line (what failed and why, for the operator)
        closed = f"store {str(tmp_path / 'db')!r} is closed"
        assert rec.getMessage() == f"store failed while handling Authenticated: {closed}"
        caplog.clear()
        w.h.works[id(s)].dev_id = DEV
        with caplog.at_level(logging.ERROR, logger="dmengine.sessions"):
            with pytest.raises(StoreError):
                await w.h.on_events(s, [NonceIssued(DEV, b"n")])
        (rec,) = [r for r in caplog.records if r.name == "dmengine.sessions"]
        assert rec.getMessage() == f"store failed while handling the session's nonces: {closed}"
    run(tmp_path, scenario)


# --- device policy, early targets ---------------------------------------------------------------

def test_a_device_with_another_devid_is_judged_by_the_tasks_policy(tmp_path):
    async def scenario(w: World) -> None:
        await w.device("MSISDN:+4915100000001", imei=IMEI, account=DmAccount(
            server_id="dmengine", client_name="u1", client_password="pw"))
        w.h.by_username["u1"] = "MSISDN:+4915100000001"       # notified: found by its account
        await w.task(ExecOp(uri="./X"), "same-tac", dev_id="MSISDN:+4915100000001",
                     accept_device_policy=10)
        await w.task(ExecOp(uri="./Y"), "strict", dev_id="MSISDN:+4915100000001",
                     accept_device_policy=20)
        await w.task(ExecOp(uri="./Z"), "carrier", dev_id="MSISDN:+4915100000001",
                     accept_device_policy=40)
        asked = []

        async def carrier(record, reported, task_id):
            asked.append((record.dev_id, reported, task_id))
            return True
        w.h.carrier_callback = carrier
        s = await w.connect("IMEI:356938039999999", username="u1")  # same TAC, another phone
        assert (await w.get("same-tac")).state == S.IN_PROGRESS
        t = await w.get("strict")
        assert (t.state, t.cause) == (
            S.FAILED, f"refused by acceptDevicePolicy 20: the record has IMEI {IMEI}, device "
                      "reported IMEI:356938039999999")
        assert s.pending_handles == [cmd("same-tac"), cmd("carrier")]
        assert asked == [("MSISDN:+4915100000001", "IMEI:356938039999999", "carrier")]
    run(tmp_path, scenario)


# --- small parts ---------------------------------------------------------------------------------

def test_waiting_alert_reads_the_exec_status_on_record():
    def t(op, statuses=None):
        return Task(task_id="t", dev_id="d", op=op,
                    result=None if statuses is None else TaskResult(statuses=statuses))
    up, ex = UpdateOp(content_id="c"), ExecOp(uri="./X")
    assert not waiting_alert(t(up))
    assert waiting_alert(t(up, {"Replace ./A": 200, "Exec ./F": 200}))
    assert waiting_alert(t(up, {"Exec ./F": 202}))
    assert not waiting_alert(t(up, {"Exec ./F": 500, "Replace ./Exec": 200}))
    assert not waiting_alert(t(up, {"Replace ./A": 200}))
    assert waiting_alert(t(ex, {"Exec ./X": 202}))
    assert not waiting_alert(t(ex, {"Exec ./X": 200}))
    assert not waiting_alert(t(ex, {"Get ./X": 202}))
    assert not waiting_alert(t(QueryOp(nodes=["./A"]), {"Exec ./X": 202}))


def test_stored_nonces_and_texts():
    assert stored_nonce(None) == b"" and stored_nonce("") == b""
    assert stored_nonce(b64(b"\x00\xffab")) == b"\x00\xffab"
    assert stored_nonce("not base64!") == b"not base64!"          # kept as it was written
    assert stored_nonce("abcd!") == b"abcd!"          # strict: not "abcd" with the ! dropped
    assert _text(None) == "" and _text(b"a\xffb") == "a\ufffdb" and _text(12) == "12"


def test_the_user_name_index_keeps_the_most_recent_names():
    r = _Recent(3)
    for k in "abc":
        r[k] = k.upper()
    r["a"] = "A2"                       # set again: the most recent now
    r["d"] = "D"                        # the oldest (b) goes
    assert list(r.items()) == [("c", "C"), ("a", "A2"), ("d", "D")]
    assert r.size == 3
    assert BY_USERNAME_SIZE == 200_000


def test_concurrent_devdetail_changes_are_all_kept(tmp_path):
    """Sessions learning DevDetail nodes of one device at the same time: each write names
    the version it read and is done again on a conflict, so none is lost."""
    async def scenario(w: World) -> None:
        await w.device(devdetail={"./DevDetail/FwV": "1"})
        keys = [f"./DevDetail/K{i}" for i in range(4)]
        await asyncio.gather(*(w.h._change_devdetail(DEV, lambda snap, k=k: {**snap, k: "v"})
                               for k in keys))
        dev = await w.store.get_device(DEV)
        assert dev.devdetail == {"./DevDetail/FwV": "1", **{k: "v" for k in keys}}
        assert dev.version == 4                    # one write each
        await w.h._forget_firmware(DEV)
        await w.h._forget_firmware(DEV)            # nothing to forget: no write
        dev = await w.store.get_device(DEV)
        assert ("./DevDetail/FwV" in dev.devdetail, dev.version) == (False, 5)
        await w.h._change_devdetail("IMEI:404", lambda snap: {"x": "y"})   # no record: nothing
    run(tmp_path, scenario)


def test_a_devdetail_that_keeps_changing_is_given_up_with_a_warning(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device()
        read = w.store.get_device
        reads = 0

        async def racing_read(dev_id: str) -> Device:
            # another writer changes the record right after each read: every write conflicts
            nonlocal reads
            reads += 1
            d = await read(dev_id)
            await w.store.update_device(dev_id, {"tz": f"Europe/Z{reads}"})
            return d
        w.store.get_device = racing_read           # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="dmengine.sessions"):
            await w.h._change_devdetail(DEV, lambda snap: {**snap, "./DevDetail/Mine": "x"})
        assert reads == 5
        assert (await read(DEV)).devdetail == {}
        assert [r.getMessage() for r in caplog.records if r.name == "dmengine.sessions"] == [
            f"device {DEV}: DevDetail snapshot not updated (kept changing)"]
    run(tmp_path, scenario)


def test_every_hook_names_the_session_and_its_device_in_the_log(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A"]))
        s = await w.connect()
        label = {"session": s.session_key, "device": DEV}
        assert logs.current() == label
        logs.bind()
        await w.answer(s, StatusReceived(cmd(), "Get", 404, target="./A"))
        assert logs.current() == label
        logs.bind()
        with caplog.at_level(logging.DEBUG, logger="dmengine.sessions"):
            await w.h.on_session_closed(s, "dropped")
        assert logs.current() == label
        assert "session closed (dropped)" in [r.getMessage() for r in caplog.records
                                              if r.name == "dmengine.sessions"]
        # a session that did not authenticate: the device it claimed, and why it failed
        bad = DmSession(SessionConfig(server_id="dmengine", server_uri=SERVER, encoding="xml",
                                      require_auth="basic"), session_key="k-bad", now=0)
        ev = bad.receive(Message(
            hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="5", msg_id="1",
                        target=SERVER, source=DEV,
                        cred=Cred(meta=Meta(format="b64", type="syncml:auth-basic"),
                                  data=auth.basic_cred("u1", "wrong"))),
            commands=[Command(name="Alert", cmd_id="1", data="1201")], final=True),
            now=0, account=auth.DmAccount(dev_id=DEV, username="u1", client_secret="pw"))
        assert not bad.authenticated
        logs.bind()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dmengine.sessions"):
            await w.h.on_events(bad, ev)
        assert logs.current() == {"session": "k-bad", "device": DEV}
        assert [r.getMessage() for r in caplog.records if r.name == "dmengine.sessions"] == [
            "authentication failed (basic, client side): wrong password"]
        assert (await w.store.get_device(DEV)).account is None       # its nonce not written
    run(tmp_path, scenario)


def test_statuses_after_the_alert_in_one_message_are_not_read(tmp_path, caplog):
    """The device reports the update's result before the Exec's status (one message): the
    alert is the outcome; the status behind it is not counted (a failing one would try to
    fail the finished task)."""
    async def scenario(w: World) -> None:
        await _fw(w)
        await w.task(UpdateOp(content_id="fw"))
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200))
        with caplog.at_level(logging.INFO):
            await w.answer(s, GenericAlert("c-t1", None, FUMO_DU, None, None, "200"),
                           StatusReceived(cmd("t1", 1), "Exec", 500))
        t = await w.get()
        assert (t.state, t.cause) == (S.SUCCEEDED, "firmware updated: 200 Successful")
        assert [r.getMessage() for r in caplog.records if r.name == "dmengine.tasks"] == []
    run(tmp_path, scenario)


def test_a_session_that_ends_while_the_user_is_asked_or_the_install_runs(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), "optin", b_optin=True)
        s = await w.connect()
        await w.answer(s, SessionEnded("timeout"))
        assert [h[:2] for h in (await w.history("optin"))[-2:]] == [
            (S.IN_PROGRESS, "session ended (timeout) before the device answered"),
            (S.PENDING, "session ended (timeout) before the device answered")]
    run(tmp_path, scenario)


def test_the_install_exec_is_owed_until_its_status_comes(tmp_path):
    async def scenario(w: World) -> None:
        await _fw(w, FumoMode.DOWNLOAD_THEN_UPDATE)
        await w.task(UpdateOp(), correlator="cd")
        s = await w.connect()
        await w.answer(s, StatusReceived(cmd("t1", 0), "Replace", 200),
                       StatusReceived(cmd("t1", 1), "Exec", 202),
                       GenericAlert("cd", None, FUMO_DL, None, None, "200"),
                       SessionEnded("aborted_by_client"))
        t = await w.get()
        assert (t.state, t.cause) == (
            S.PENDING, "session ended (aborted_by_client) before the device answered")
    run(tmp_path, scenario)


def test_operations_of_a_session_share_their_prepared_commands(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(QueryOp(nodes=["./A"]))
        await w.connect()
        assert list(w.h.commands.templates) == [
            w.h.commands.template_key(await w.get())]
    run(tmp_path, scenario)


def test_a_device_that_connects_on_its_own_starts_its_pending_job_target(tmp_path, caplog):
    from dmengine.model import Job, JobState, TimeWindow

    async def scenario(w: World) -> None:
        await w.device()
        await w.store.create_job(Job(job_id="run", state=JobState.RUNNING, owner="crm",
                                     op=QueryOp(nodes=["./DevInfo/Mod"]), deadline=NOW + 50))
        await w.store.create_job(Job(job_id="sched", state=JobState.SCHEDULED,
                                     op=QueryOp(nodes=["./B"])))
        # a window that is closed now (an hour, twelve hours away, every day)
        shut = int(NOW % 86400 + 12 * 3600) % 86400
        await w.store.create_job(Job(job_id="closed", state=JobState.RUNNING,
                                     op=QueryOp(nodes=["./C"]),
                                     windows=[TimeWindow(start=shut, end=min(shut + 3600,
                                                                             86400))]))
        for j in ("run", "sched", "closed"):
            await w.store.add_job_targets(j, [DEV])
        with caplog.at_level(logging.INFO, logger="dmengine.sessions"):
            s = await w.connect()
        (t,) = [t for t in await w.h.tasks.open_for_device(DEV)]
        assert (t.job_id, t.state, t.dev_id, t.owner, t.deadline) == (
            "run", S.IN_PROGRESS, DEV, "crm", NOW + 50)
        assert s.pending_handles == [CommandHandle(t.task_id, "cmd", 0)]
        assert (await w.store.get_job("run")).total == 1
        assert (await w.store.get_job("sched")).total == 0
        assert (await w.store.get_job("closed")).total == 0
        assert sorted(await w.store.pending_job_targets(DEV)) == ["closed", "sched"]
        assert f"device {DEV} connected on its own: its task {t.task_id} of job run starts " \
               f"now" in [r.getMessage() for r in caplog.records]
        # another DevId for the record: not started early (the device policy decides first)
    run(tmp_path, scenario)


def test_an_ended_jobs_pending_target_is_forgotten_when_its_device_connects(tmp_path):
    from dmengine.model import Job, JobState

    async def scenario(w: World) -> None:
        await w.device()
        await w.store.create_job(Job(job_id="done", state=JobState.RUNNING,
                                     op=QueryOp(nodes=["./A"])))
        await w.store.add_job_targets("done", [DEV])
        await w.store.update_job("done", {"state": JobState.CANCELLED}) \
            if hasattr(w.store, "update_job") else None
        assert await w.store.pending_job_targets(DEV) == ["done"]
        s = await w.connect()
        assert await w.store.pending_job_targets(DEV) == []
        assert s.pending_handles == [] and await w.h.tasks.open_for_device(DEV) == []
        assert (await w.store.get_job("done")).total == 0
    run(tmp_path, scenario)


def test_a_session_end_settles_every_run_after_a_finished_one(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.device()
        await w.task(ExecOp(uri="./X"), "t1")
        await w.task(QueryOp(nodes=["./A"]), "t2")
        with caplog.at_level(logging.DEBUG, logger="dmengine.sessions"):
            s = await w.connect()
        assert "device identified in an authenticated session" in [
            r.getMessage() for r in caplog.records]
        await w.answer(s, StatusReceived(cmd("t1"), "Exec", 200, target="./X"))
        assert (await w.get("t1")).state == S.SUCCEEDED
        await w.answer(s, SessionEnded("timeout"))
        t = await w.get("t2")
        assert (t.state, t.cause) == (S.PENDING,
                                      "session ended (timeout) before the device answered")
    run(tmp_path, scenario)


def test_nonces_of_a_device_without_an_account_are_not_written_with_its_devinfo(tmp_path):
    async def scenario(w: World) -> None:
        await w.device()
        s, ev = dm_session()
        await w.h.on_events(s, [NonceIssued(DEV, b"n"), *ev])
        dev = await w.store.get_device(DEV)
        assert (dev.account, dev.devinfo) == (None, {"./DevInfo/Mod": "EX100"})
    run(tmp_path, scenario)


def test_nonces_go_to_the_record_the_session_proved_by_its_user_name(tmp_path):
    async def scenario(w: World) -> None:
        acc = DmAccount(server_id="dmengine", client_name="u1", client_password="pw")
        await w.device("MSISDN:+4915100000001", imei=None, account=acc)
        w.h.by_username["u1"] = "MSISDN:+4915100000001"
        s, _ = dm_session("IMEI:490154203237518", username="u1")
        await w.answer(s, NonceIssued("IMEI:490154203237518", b"n1"))
        a = (await w.store.get_device("MSISDN:+4915100000001")).account
        assert a.client_nonce == b64(b"n1")
        await w.answer(s, NonceIssued("IMEI:490154203237518", b"n2"))
        a = (await w.store.get_device("MSISDN:+4915100000001")).account
        assert a.client_nonce == b64(b"n2")
        assert w.h.works[id(s)].dev_id == "MSISDN:+4915100000001"
    run(tmp_path, scenario)


def test_the_carrier_callback_given_is_the_one_asked(tmp_path):
    async def carrier(record, reported, task_id):
        return False

    async def scenario(w: World) -> None:
        h = DeviceSessions(w.store, w.h.tasks, w.h.commands, w.h.config,
                           carrier_callback=carrier, clock=w.clock)
        assert h.carrier_callback is carrier
    run(tmp_path, scenario)


def test_every_pending_job_of_a_device_is_looked_at_not_only_the_first(tmp_path):
    """A device with several jobs' pending targets: a job that is gone (an index row left
    behind) and a cancelled job's target do not stop the running job's target from starting
    early — each is passed over, not the end of the look (and the early start is counted)."""
    from prometheus_client import CollectorRegistry

    from dmengine.metrics import TaskMetrics
    from dmengine.model import Job, JobState
    from dmengine.store.kv import SEP, _e, u64

    async def scenario(w: World) -> None:
        w.h.tasks.metrics = m = TaskMetrics(CollectorRegistry())
        await w.device()
        await w.store._write(lambda ctx: ctx.put("dev_targets", _e(DEV) + SEP + _e("a-gone"),
                                                 u64(0)))
        # an ended job without an operation (a bootstrap list's): nothing to make, kept
        await w.store.create_job(Job(job_id="a-boot", state=JobState.RUNNING))
        await w.store.add_job_targets("a-boot", [DEV])
        await w.store.update_job("a-boot", {"state": JobState.CANCELLED})
        await w.store.create_job(Job(job_id="b-done", state=JobState.RUNNING,
                                     op=QueryOp(nodes=["./B"])))
        await w.store.add_job_targets("b-done", [DEV])
        await w.store.update_job("b-done", {"state": JobState.CANCELLED})
        await w.store.create_job(Job(job_id="c-run", state=JobState.RUNNING,
                                     op=QueryOp(nodes=["./C"])))
        await w.store.add_job_targets("c-run", [DEV])
        assert await w.store.pending_job_targets(DEV) == ["a-boot", "a-gone", "b-done", "c-run"]
        s = await w.connect()
        (t,) = await w.h.tasks.open_for_device(DEV)
        assert (t.job_id, t.state) == ("c-run", S.IN_PROGRESS)
        assert s.pending_handles == [CommandHandle(t.task_id, "cmd", 0)]
        assert await w.store.pending_job_targets(DEV) == ["a-boot", "a-gone"]   # (kept)
        assert (await w.store.get_job("b-done")).total == 0
        assert m.created == {"QUERY": 1}
    run(tmp_path, scenario)


def test_a_pending_targets_window_is_read_in_the_devices_own_zone(tmp_path):
    """A job's daily window is the device's local time when its record has a zone: at
    08:00 UTC a device in Tokyo (17:00 there) starts the target whose window is 16:00–18:00,
    not the one whose window is 07:00–09:00 (open in UTC, the job's own zone)."""
    from dmengine.model import Job, JobState, TimeWindow

    async def scenario(w: World) -> None:
        assert NOW % 86400 == 8 * 3600
        await w.device(tz="Asia/Tokyo")
        for job_id, (start, end) in (("tokyo-evening", (16, 18)), ("utc-morning", (7, 9))):
            await w.store.create_job(Job(job_id=job_id, state=JobState.RUNNING,
                                         op=QueryOp(nodes=[f"./{job_id}"]),
                                         windows=[TimeWindow(start=start * 3600,
                                                             end=end * 3600)]))
            await w.store.add_job_targets(job_id, [DEV])
        s = await w.connect()
        (t,) = await w.h.tasks.open_for_device(DEV)
        assert (t.job_id, t.state) == ("tokyo-evening", S.IN_PROGRESS)
        assert s.pending_handles == [CommandHandle(t.task_id, "cmd", 0)]
        assert await w.store.pending_job_targets(DEV) == ["utc-morning"]
        assert [(await w.store.get_job(j)).total
                for j in ("tokyo-evening", "utc-morning")] == [1, 0]
    run(tmp_path, scenario)
