"""The broker prepares an operation's commands once and shares them between the DM sessions
of every task that runs it (a campaign), and only where the commands depend on nothing else."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from dmengine._session import DmSession, PreparedCommand, SessionConfig
from dmengine.broker import Broker
from dmengine.commands import TEMPLATE_CACHE_SIZE, Commands
from dmengine.model import DiagOp, ExecOp, NodeChange, QueryOp, SetOp, UpdateOp
from dmengine.store.memory import MemoryStore

CFG = SessionConfig(server_id="dmengine", server_uri="https://dm.example.com/dm", encoding="wbxml")


def _session(key: str) -> DmSession:
    return DmSession(CFG, session_key=key, now=0.0)


def _task(op, correlator=None):
    return SimpleNamespace(op=op, correlator=correlator, dev_id="IMEI:1", task_id="t")


def _commands(broker, session, task):
    return asyncio.run(broker.commands.for_session(session, task))


def test_tasks_of_one_operation_share_prepared_commands():
    broker = Broker(MemoryStore(), None)
    op = SetOp(changes=[NodeChange(uri="./Vendor/X", value="1"), NodeChange(uri="./Vendor/Y", value="2")])
    first = _commands(broker, _session("a"), _task(op))
    again = _commands(broker, _session("b"), _task(SetOp(changes=list(op.changes))))   # equal op
    assert first is again and len(first) == 2
    assert all(type(c) is PreparedCommand for c in first)
    assert [c.command.name for c in first] == ["Replace", "Replace"]
    other = _commands(broker, _session("c"), _task(QueryOp(nodes=["./DevDetail/FwV"])))
    assert other is not first and other[0].command.name == "Get"


def test_exec_is_keyed_by_its_correlator_and_update_is_not_cached():
    broker = Broker(MemoryStore(), None)
    op = ExecOp(uri="./Vendor/Reboot")
    a = _commands(broker, _session("a"), _task(op, correlator="c1"))
    b = _commands(broker, _session("b"), _task(op, correlator="c2"))
    assert a is not b and a[0].command.correlator == "c1" and b[0].command.correlator == "c2"
    assert Commands.template_key(_task(UpdateOp(content_id="fw-1"))) is None
    assert Commands.template_key(_task(DiagOp())) is None             # nodes from the capability
    assert Commands.template_key(_task(DiagOp(nodes=["./DevDetail/SwV"]))) is not None


def test_other_session_engines_get_plain_commands_and_the_cache_is_bounded():
    broker = Broker(MemoryStore(), None)
    plain = _commands(broker, object(), _task(QueryOp(nodes=["./DevInfo/Mod"])))
    assert type(plain[0]).__name__ == "Command" and not broker.commands.templates
    for i in range(TEMPLATE_CACHE_SIZE + 5):
        _commands(broker, _session("s"), _task(QueryOp(nodes=[f"./Vendor/N{i}"])))
    assert len(broker.commands.templates) == TEMPLATE_CACHE_SIZE
