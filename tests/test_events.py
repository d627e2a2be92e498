"""The session's events (dmengine.events, compiled in _events.pyx): what callers rely on."""
from __future__ import annotations

import gc
import pickle

import pytest

from dmengine.events import (
    EVENT_TYPES, AuthFailed, CommandNotDelivered, EventBase, GenericAlert, ResultsReceived,
    SessionEnded, StatusReceived,
)


def test_construction_defaults_and_fields():
    ev = StatusReceived(("task", 0), "Get", 200)
    assert (ev.handle, ev.cmd, ev.status, ev.items, ev.target, ev.index) == (("task", 0), "Get", 200,
                                                                            None, None, -1)
    assert StatusReceived(handle=1, cmd="Exec", status=202, index=2).index == 2
    assert AuthFailed("u", "md5", 401, "wrong digest").side == "client"
    assert SessionEnded("completed").detail == ""
    assert StatusReceived._fields == ("handle", "cmd", "status", "items", "target", "index")
    with pytest.raises(TypeError):
        StatusReceived(1, "Get")                       # status is required


def test_equality_compares_class_and_fields():
    assert SessionEnded("closed", "") == SessionEnded("closed")
    assert SessionEnded("closed") != SessionEnded("timeout")
    assert CommandNotDelivered("x", "y") != SessionEnded("x", "y")    # same fields, other class
    assert StatusReceived(1, "Get", 200) != (1, "Get", 200, None, None, -1)
    assert hash(SessionEnded("closed")) == hash(SessionEnded("closed", ""))
    with pytest.raises(TypeError):
        hash(ResultsReceived(1, []))                   # a list inside: unhashable, like a tuple


def test_immutable_iterable_repr_pickle():
    ev = GenericAlert("c1", "./FUMO/1", "org.openmobilealliance.dm.firmwareupdate.devicerequest",
                      "chr", "critical", "data")
    with pytest.raises(AttributeError):
        ev.data = "other"                              # type: ignore[misc]
    assert list(ev) == ["c1", "./FUMO/1", "org.openmobilealliance.dm.firmwareupdate.devicerequest",
                        "chr", "critical", "data"]
    correlator, *_rest, data = ev
    assert (correlator, data, ev[1], len(ev)) == ("c1", "data", "./FUMO/1", 6)
    assert ev._asdict()["mark"] == "critical"
    assert repr(SessionEnded("closed")) == "SessionEnded(reason='closed', detail='')"
    assert pickle.loads(pickle.dumps(ev)) == ev
    assert all(issubclass(t, EventBase) for t in EVENT_TYPES)


def test_recycled_events_start_clean():
    # every event class shares one free list: a recycled object must not show old fields
    for _ in range(3):
        old = [StatusReceived(object(), "Get", 200, [1], "./a", 3) for _ in range(600)]
        del old
        gc.collect()
        fresh = [SessionEnded("completed") for _ in range(600)]
        assert all(e.reason == "completed" and e.detail == "" and len(e) == 2 for e in fresh)
        assert all(type(e) is SessionEnded for e in fresh)


def test_generated_files_are_current():
    import importlib.util
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("gen_events", root / "tools" / "gen_events.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, text in gen.render().items():
        checked_in = (root / "dmengine" / name).read_text()
        assert gen.HEADER in checked_in, f"dmengine/{name}: missing 'do not edit' header"
        assert checked_in == text, f"dmengine/{name} is stale: run tools/gen_events.py"
    assert gen.main(["--check"]) == 0
