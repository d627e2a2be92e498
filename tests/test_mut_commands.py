"""Issue 18, mutmut's survivors in dmengine/commands.py: the SyncML commands each operation
becomes, compared whole (name, correlator, every Item's target, Meta and Data), the prepared-
command cache (what is shared, what is keyed by what, what is never cached) and every refusal
of an UPDATE (class, text, ``where``).  Real LMDB store, the real content service's package
choice, the real session engine's ``prepare``."""
from __future__ import annotations

import asyncio
import pathlib
from typing import Any, Awaitable, Callable

import pytest

from dmengine._session import DmSession, PreparedCommand, SessionConfig
from dmengine.commands import TEMPLATE_CACHE_SIZE, Commands
from dmengine.config import BrokerConfig
from dmengine.content import ContentService
from dmengine.errors import NotFound, ServiceError, UnknownResource
from dmengine.message import Command, Item, Meta
from dmengine.model import (BootstrapOp, Capability, Content, Device, DiagOp, DmAccount, ExecOp,
                            FumoMode, NodeChange, QueryOp, SetOp, Task, UpdateOp)
from dmengine.store.lmdb import LmdbStore

SHA = "cd" * 32
DEV = "IMEI:356938035643809"
CFG = SessionConfig(server_id="dmengine", server_uri="https://dm.example.com/dm", encoding="wbxml")


def session() -> DmSession:
    return DmSession(CFG, session_key="k", now=0.0)


def task(op: Any, *, correlator: str | None = "corr-1", dev_id: str = DEV) -> Task:
    return Task(task_id="t1", dev_id=dev_id, op=op, correlator=correlator)


class World:
    def __init__(self, store: LmdbStore, commands: Commands) -> None:
        self.store, self.commands = store, commands

    async def device(self, *, capability: str | None = "cap-1", fw: str | None = "1.0",
                     dev_id: str = DEV) -> Device:
        return await self.store.create_device(Device(
            dev_id=dev_id, capability=capability,
            devdetail={"./DevDetail/FwV": fw} if fw else {}))

    async def capability(self, oid: str = "cap-1", **kw: Any) -> None:
        await self.store.create_capability(Capability(oid=oid, **kw))

    async def content(self, content_id: str, **kw: Any) -> None:
        await self.store.create_content(Content(content_id=content_id, name="fw.bin", size=1,
                                                sha256=SHA, **kw))


def run(tmp_path: pathlib.Path, scenario: Callable[[World], Awaitable[None]], *,
        with_content: bool = True, config: BrokerConfig | None = None) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=1 << 24)
        content = ContentService(store, tmp_path / "content") if with_content else None
        cfg = config or BrokerConfig(content_base_url="http://dm.example.com:8080/content/")
        try:
            await scenario(World(store, Commands(store, cfg, content)))
        finally:
            await store.close()
    asyncio.run(main())


def get(uri: str) -> Command:
    return Command(name="Get", items=[Item(target=uri)])


# --- what each operation becomes ------------------------------------------------------------

def test_query_set_exec_commands_whole(tmp_path):
    async def scenario(w: World) -> None:
        c = w.commands
        assert await c.for_task(task(QueryOp(nodes=["./A", "./B"]))) == [get("./A"), get("./B")]
        assert await c.for_task(task(DiagOp(nodes=["./Diag/X"]))) == [get("./Diag/X")]
        got = await c.for_task(task(SetOp(changes=[
            NodeChange(uri="./S/chr", value="v"),
            NodeChange(uri="./S/empty"),                          # no value: empty data
            NodeChange(uri="./S/int", value="5", format="int"),
            NodeChange(uri="./S/typed", value="<x/>", type="text/xml"),
            NodeChange(uri="./S/b64", value="AAE=", format="b64", type="application/x"),
            NodeChange(uri="./S/new", action="Add", value="n"),
            NodeChange(uri="./S/old", action="Delete", value="ignored")])))
        assert got == [
            Command(name="Replace", items=[Item(target="./S/chr", data="v")]),
            Command(name="Replace", items=[Item(target="./S/empty", data="")]),
            Command(name="Replace", items=[Item(target="./S/int", meta=Meta(format="int"),
                                                data="5")]),
            Command(name="Replace", items=[Item(target="./S/typed", meta=Meta(type="text/xml"),
                                                data="<x/>")]),
            Command(name="Replace", items=[Item(target="./S/b64", meta=Meta(
                format="b64", type="application/x"), data="AAE=")]),
            Command(name="Add", items=[Item(target="./S/new", data="n")]),
            Command(name="Delete", items=[Item(target="./S/old")]),
        ]
        assert got[0].items[0].meta is None and got[6].items[0].data is None
        assert await c.for_task(task(ExecOp(uri="./Reboot", data="now"), correlator="c9")) == [
            Command(name="Exec", correlator="c9", items=[Item(target="./Reboot", data="now")])]
    run(tmp_path, scenario)


def test_an_operation_no_session_runs_is_refused_naming_the_field(tmp_path):
    async def scenario(w: World) -> None:
        op = BootstrapOp(account=DmAccount(server_id="dmengine"))
        with pytest.raises(ServiceError) as e:
            await w.commands.for_task(task(op))
        assert type(e.value) is ServiceError
        assert (str(e.value), e.value.where) == (
            "operation BootstrapOp cannot run in a DM session", "operation")
    run(tmp_path, scenario)


def test_diag_reads_the_capabilitys_nodes_else_the_configured_ones(tmp_path):
    async def scenario(w: World) -> None:
        c = w.commands
        await w.capability(mo_paths={"diag": " ./Diag/A , ./Diag/B,, ", "fumo": "./F"})
        await w.capability("cap-2", mo_paths={"fumo": "./F"})
        await w.device()
        assert await c.for_task(task(DiagOp())) == [get("./Diag/A"), get("./Diag/B")]
        await w.device(dev_id="IMEI:2", capability="cap-2")         # no diag path
        await w.device(dev_id="IMEI:3", capability="cap-gone")      # capability not stored
        await w.device(dev_id="IMEI:4", capability=None)
        for d in ("IMEI:2", "IMEI:3", "IMEI:4"):
            assert await c.for_task(task(DiagOp(), dev_id=d)) == [get("./X/1"), get("./X/2")]
        with pytest.raises(NotFound):
            await c.for_task(task(DiagOp(), dev_id="IMEI:none"))
    run(tmp_path, scenario, config=BrokerConfig(diag_nodes=("./X/1", "./X/2")))


def test_capability_lookup(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability(model="M1")
        cap = await w.commands.capability(Device(dev_id="d", capability="cap-1"))
        assert cap is not None and cap.oid == "cap-1" and cap.model == "M1"
        assert await w.commands.capability(Device(dev_id="d", capability="other")) is None
        assert await w.commands.capability(Device(dev_id="d")) is None
    run(tmp_path, scenario)


# --- UPDATE ---------------------------------------------------------------------------------

def test_update_commands_point_the_device_at_the_package(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability(mo_paths={"fumo": "./Vendor/FUMO/"})
        await w.content("fw-1", capability="cap-1", from_version="1.0", to_version="2.0")
        await w.device()
        got = await w.commands.for_task(task(UpdateOp(content_id="fw-1"), correlator="cc"))
        assert got == [
            Command(name="Replace", items=[Item(
                target="./Vendor/FUMO/DownloadAndUpdate/PkgURL",
                data="http://dm.example.com:8080/content/fw-1")]),
            Command(name="Exec", correlator="cc",
                    items=[Item(target="./Vendor/FUMO/DownloadAndUpdate")])]
        # the operation's own FUMO node wins; a device record given for another device is
        # not used (the task's own is read)
        other = Device(dev_id="IMEI:9", capability="cap-1",
                       devdetail={"./DevDetail/FwV": "9.9"})
        got = await w.commands.for_task(task(UpdateOp(content_id="fw-1", fumo_path="./My/F")),
                                        device=other)
        assert [it.target for c in got for it in c.items] == [
            "./My/F/DownloadAndUpdate/PkgURL", "./My/F/DownloadAndUpdate"]
    run(tmp_path, scenario)


def test_update_in_two_steps_and_the_default_fumo_node(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability(fumo_mode=FumoMode.DOWNLOAD_THEN_UPDATE)     # no fumo path
        await w.content("fw-1", capability="cap-1", to_version="2.0")
        dev = await w.device()
        got = await w.commands.for_task(task(UpdateOp(content_id="fw-1")), device=dev)
        assert [it.target for c in got for it in c.items] == [
            "./Dflt/FUMO/Download/PkgURL", "./Dflt/FUMO/Download"]
        assert got[0].items[0].data == "http://h/c/fw-1"
        # no capability at all: the default node, download-and-update
        await w.device(dev_id="IMEI:2", capability=None, fw=None)
        got = await w.commands.for_task(task(UpdateOp(content_id="fw-1"), dev_id="IMEI:2"))
        assert [it.target for c in got for it in c.items] == [
            "./Dflt/FUMO/DownloadAndUpdate/PkgURL", "./Dflt/FUMO/DownloadAndUpdate"]
        content, node, mode = await w.commands.content_for(UpdateOp(content_id="fw-1"), dev)
        assert (content.content_id, node, mode) == ("fw-1", "./Dflt/FUMO",
                                                    FumoMode.DOWNLOAD_THEN_UPDATE)
    run(tmp_path, scenario, config=BrokerConfig(content_base_url="http://h/c",
                                                default_fumo_path="./Dflt/FUMO/"))


def test_update_picks_the_package_for_the_devices_firmware(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability()
        await w.content("fw-a", capability="cap-1", from_version="1.0", to_version="1.5")
        await w.content("fw-b", capability="cap-1", from_version="1.0", to_version="2.0")
        await w.content("fw-c", capability="cap-1", from_version="0.9", to_version="3.0")
        dev = await w.device(fw="1.0")
        content, node, mode = await w.commands.content_for(UpdateOp(), dev)
        assert (content.content_id, node, mode) == ("fw-b", "./FUMO/1",
                                                    FumoMode.DOWNLOAD_AND_UPDATE)
    run(tmp_path, scenario)


async def _refusal(w: World, op: UpdateOp, dev: Device) -> tuple[type, str, str | None]:
    with pytest.raises(ServiceError) as e:
        await w.commands.content_for(op, dev)
    return type(e.value), str(e.value), e.value.where


def test_update_refusals_name_the_field(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability()
        await w.content("fw-1", capability="cap-1", from_version="1.0", to_version="2.0")
        await w.content("fw-x", capability="cap-9", to_version="2.0")
        dev = await w.device(fw="1.0")
        unknown = ("the device's capability or firmware version is unknown: name the content, "
                   "or read ./DevDetail/FwV first (QUERY or DIAG)")
        for d in (await w.device(dev_id="IMEI:2", fw=None),
                  await w.device(dev_id="IMEI:3", capability=None)):
            assert await _refusal(w, UpdateOp(), d) == (ServiceError, unknown,
                                                        "operation.content_id")
        # through the content service: its reason, with where under operation.
        assert await _refusal(w, UpdateOp(content_id="gone"), dev) == (
            ServiceError, "no content 'gone'", "operation.content_id")
        assert await _refusal(w, UpdateOp(content_id="fw-x"), dev) == (
            ServiceError, "content 'fw-x' is for capability 'cap-9', the device is 'cap-1'",
            "operation.capability")
        dev2 = await w.device(dev_id="IMEI:4", fw="2.0")
        assert await _refusal(w, UpdateOp(content_id="fw-1"), dev2) == (
            ServiceError, "content 'fw-1' updates from firmware '1.0', the device runs '2.0'",
            "operation.from_version")
        assert await _refusal(w, UpdateOp(), await w.device(dev_id="IMEI:5",
                                                            capability="cap-0")) == (
            ServiceError, "no package for capability 'cap-0'", "operation.capability")
    run(tmp_path, scenario)


def test_update_without_the_content_service_reads_the_named_package(tmp_path):
    async def scenario(w: World) -> None:
        await w.capability()
        await w.content("fw-1", capability="cap-1", to_version="2.0")
        await w.content("fw-any", to_version="2.0")                  # for any capability
        await w.content("fw-x", capability="cap-9", to_version="2.0")
        dev = await w.device(fw="1.0")
        c, node, _ = await w.commands.content_for(UpdateOp(content_id="fw-1"), dev)
        assert (c.content_id, node) == ("fw-1", "./FUMO/1")
        c, _, _ = await w.commands.content_for(UpdateOp(content_id="fw-any"), dev)
        assert c.content_id == "fw-any"
        bare = await w.device(dev_id="IMEI:2", capability=None, fw=None)
        c, _, _ = await w.commands.content_for(UpdateOp(content_id="fw-x"), bare)
        assert c.content_id == "fw-x"                 # no capability on record: not compared
        with pytest.raises(UnknownResource) as e:
            await w.commands.content_for(UpdateOp(content_id="gone"), dev)
        assert (str(e.value), e.value.where) == ("no content 'gone'", "operation.content_id")
        assert await _refusal(w, UpdateOp(content_id="fw-x"), dev) == (
            ServiceError, "content fw-x is for capability cap-9, the device is cap-1",
            "operation.content_id")
        assert await _refusal(w, UpdateOp(), dev) == (
            ServiceError, "the device's capability or firmware version is unknown: name the "
            "content, or read ./DevDetail/FwV first (QUERY or DIAG)", "operation.content_id")
    run(tmp_path, scenario, with_content=False)


# --- the prepared-command cache ---------------------------------------------------------------

def test_template_keys_say_what_the_commands_depend_on():
    q = QueryOp(nodes=["./A"])
    assert Commands.template_key(task(q)) == Commands.template_key(task(QueryOp(nodes=["./A"])))
    assert Commands.template_key(task(q)) != Commands.template_key(task(QueryOp(nodes=["./B"])))
    s = SetOp(changes=[NodeChange(uri="./A", value="1")])
    assert Commands.template_key(task(s)) is not None
    assert Commands.template_key(task(s)) != Commands.template_key(task(q))
    d = DiagOp(nodes=["./A"])
    assert Commands.template_key(task(d)) is not None
    assert Commands.template_key(task(d)) != Commands.template_key(task(q))
    e = ExecOp(uri="./X")
    assert Commands.template_key(task(e, correlator="a")) != \
        Commands.template_key(task(e, correlator="b"))
    assert Commands.template_key(task(e, correlator="a")) == \
        Commands.template_key(task(ExecOp(uri="./X"), correlator="a"))
    assert Commands.template_key(task(e, correlator="a")) != \
        Commands.template_key(task(ExecOp(uri="./Y"), correlator="a"))
    assert Commands.template_key(task(DiagOp())) is None
    assert Commands.template_key(task(UpdateOp(content_id="c"))) is None
    assert Commands.template_key(task(BootstrapOp(account=DmAccount(server_id="s")))) is None


def test_for_session_shares_prepared_commands_and_keeps_the_newest(tmp_path):
    async def scenario(w: World) -> None:
        c = w.commands
        first = await c.for_session(session(), task(QueryOp(nodes=["./A", "./B"])))
        assert [type(p) for p in first] == [PreparedCommand, PreparedCommand]
        assert [p.command for p in first] == [get("./A"), get("./B")]
        assert await c.for_session(session(), task(QueryOp(nodes=["./A", "./B"]))) is first
        assert len(c.templates) == 1
        # fill the cache: the oldest goes first, the newest stay
        for i in range(TEMPLATE_CACHE_SIZE):
            await c.for_session(session(), task(QueryOp(nodes=[f"./N{i}"])))
        assert len(c.templates) == TEMPLATE_CACHE_SIZE
        assert Commands.template_key(task(QueryOp(nodes=["./A", "./B"]))) not in c.templates
        assert Commands.template_key(task(QueryOp(nodes=["./N0"]))) in c.templates
        again = await c.for_session(session(), task(QueryOp(nodes=["./A", "./B"])))
        assert again is not first and [p.command for p in again] == [get("./A"), get("./B")]
        assert Commands.template_key(task(QueryOp(nodes=["./N0"]))) not in c.templates
    run(tmp_path, scenario)


def test_for_session_does_not_cache_device_dependent_or_foreign_session_commands(tmp_path):
    async def scenario(w: World) -> None:
        c = w.commands
        await w.capability(mo_paths={"diag": "./Diag/A"})
        dev = await w.device()
        got = await c.for_session(session(), task(DiagOp()), device=dev)
        assert got == [get("./Diag/A")] and c.templates == {}
        plain = await c.for_session(object(), task(QueryOp(nodes=["./A"])))
        assert plain == [get("./A")] and c.templates == {}
    run(tmp_path, scenario)


def test_commands_the_engine_refuses_are_handed_back_unprepared(tmp_path):
    """An EXEC without a target cannot be prepared: the session's queue() refuses it and
    says why; nothing is cached."""
    async def scenario(w: World) -> None:
        bad = task(ExecOp(uri=None))            # type: ignore[arg-type]  (not validated)
        got = await w.commands.for_session(session(), bad)
        assert got == [Command(name="Exec", correlator="corr-1", items=[Item(target=None)])]
        assert w.commands.templates == {}
    run(tmp_path, scenario)


def test_trailing_slashes_go_and_nothing_else(tmp_path):
    """Only "/" is stripped from the end of the FUMO node and the download base URL (a node
    or a path may well end in another character)."""
    async def scenario(w: World) -> None:
        await w.capability(mo_paths={"fumo": "./Vendor/FUMOX//"})
        await w.content("fw-1", capability="cap-1", to_version="2.0")
        await w.device()
        got = await w.commands.for_task(task(UpdateOp(content_id="fw-1")))
        assert [(it.target, it.data) for c in got for it in c.items] == [
            ("./Vendor/FUMOX/DownloadAndUpdate/PkgURL", "http://h/contentX/fw-1"),
            ("./Vendor/FUMOX/DownloadAndUpdate", None)]
    run(tmp_path, scenario, config=BrokerConfig(content_base_url="http://h/contentX//"))


def test_for_session_builds_from_the_device_record_it_is_given(tmp_path):
    """The session hands the record it just wrote (DevDetail learned in this session): the
    package is picked from it, not from a second read."""
    async def scenario(w: World) -> None:
        await w.capability()
        await w.content("fw-1", capability="cap-1", from_version="1.0", to_version="2.0")
        stored = await w.device(fw=None)
        fresh = Device(dev_id=stored.dev_id, capability="cap-1",
                       devdetail={"./DevDetail/FwV": "1.0"})
        got = await w.commands.for_session(session(), task(UpdateOp()), device=fresh)
        assert got[0].items[0].data == "http://dm.example.com:8080/content/fw-1"
        assert w.commands.templates == {}
    run(tmp_path, scenario)
