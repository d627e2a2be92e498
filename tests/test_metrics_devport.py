"""The device port's counters as the compiled device port feeds them (C calls through
``_metrics.pxd``, not the Python methods), over real HTTP: messages, bytes, sessions and the
request-latency histogram on the plain-request path and on llhttp's path; the session-end
reasons counted as runs in C and folded into the dict when it is read; a metrics object the
device port cannot count through refused at construction, naming the field."""
from __future__ import annotations

import asyncio
import collections
import itertools

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from dmengine.errors import ConfigError
from dmengine.metrics import DeviceMetrics
from dmengine.server import DmServer, MemoryDeviceHandler, ServerConfig
from dmengine.simulator.device import DeviceProfile, VirtualDevice

WBXML = "application/vnd.syncml.dm+wbxml"


def _pkg1(i: int) -> bytes:
    prof = DeviceProfile(server_url="http://127.0.0.1/dm", encoding="wbxml", auth="none")
    return VirtualDevice(i, prof).session(session_id=format(1 + i, "X")).first().body


def _request(body: bytes, extra: str = "") -> bytes:
    return (f"POST /dm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {WBXML}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _responses(reader: asyncio.StreamReader, n: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(n):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        clen = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                    if k.lower() == "content-length")
        out.append((int(lines[0].split()[1]), await reader.readexactly(clen)))
    return out


def test_plain_and_llhttp_requests_are_counted_by_the_compiled_device_port():
    bodies = [_pkg1(i) for i in range(5)]

    async def main() -> tuple[DeviceMetrics, list[tuple[int, bytes]]]:
        metrics = DeviceMetrics(CollectorRegistry())
        counter = itertools.count()
        srv = await DmServer(ServerConfig(require_auth="none", port=0), MemoryDeviceHandler(),
                             metrics=metrics, random_token=lambda: f"t{next(counter):015d}"
                             ).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            # two plain requests in one write (the plain path reads both), then one with a
            # header the plain path leaves to llhttp, then one split over two writes (llhttp
            # reads what the plain path cannot take whole), then a plain one again
            writer.write(_request(bodies[0]) + _request(bodies[1]))
            got = await _responses(reader, 2)
            writer.write(_request(bodies[2], "Accept-Charset: utf-8\r\n"))
            got += await _responses(reader, 1)
            split = _request(bodies[3])
            writer.write(split[:40])
            await writer.drain()
            await asyncio.sleep(0.05)            # the first part arrives in a read of its own
            writer.write(split[40:])
            got += await _responses(reader, 1)
            writer.write(_request(bodies[4]))
            got += await _responses(reader, 1)
            writer.close()
        finally:
            await srv.shutdown()
        return metrics, got

    metrics, got = uvloop.run(main())
    assert [status for status, _ in got] == [200] * 5
    r = metrics.registry

    def v(name: str, **labels: str) -> float | None:
        return r.get_sample_value(f"dmengine_device_{name}", labels)

    assert v("messages_received_total", encoding="wbxml") == 5
    assert v("messages_received_total", encoding="xml") == 0
    assert v("received_bytes_total", encoding="wbxml") == sum(map(len, bodies))
    assert v("messages_sent_total", encoding="wbxml") == 5
    assert v("sent_bytes_total", encoding="wbxml") == sum(len(body) for _, body in got)
    assert v("sessions_started_total") == 5
    # package 1 with nothing queued: the reply ends each session, none stays in the table
    ended = {s.labels["reason"]: s.value for f in metrics.collect()
             if f.name == "dmengine_device_sessions_ended" for s in f.samples}
    assert sum(ended.values()) == 5, ended
    assert v("sessions_in_flight") == 0
    assert v("session_seconds_count") == 5
    # every request timed, on both paths: complete request -> reply written
    assert v("request_seconds_count") == 5
    assert v("request_seconds_bucket", le="+Inf") == 5
    # a nanosecond clock (not the event loop's millisecond one): no request takes zero time
    assert v("request_seconds_sum") > 0


def test_session_end_reasons_are_exact_across_runs_and_reads():
    """Runs of one reason are counted in C and folded into the dict when the reason changes
    or the dict is read; equal reasons that are different str objects are one label."""
    m = DeviceMetrics(CollectorRegistry())
    literal = "completed"
    completed = "".join(["comp", "leted"])           # equal to the literal, not the same object
    assert completed == literal and completed is not literal
    reasons = (["completed"] * 4 + ["timeout"] + ["completed"] * 2 + [completed] * 3
               + ["restarted", "timeout", "completed"])
    expect: collections.Counter[str] = collections.Counter()
    for i, reason in enumerate(reasons):
        m.session_ended(reason, m.session_started())
        expect[reason] += 1
        if i in (1, 4, 8):                            # read in the middle of runs
            assert m.ended == dict(expect)
    assert m.ended == {"completed": 10, "timeout": 2, "restarted": 1}
    assert m.ended == {"completed": 10, "timeout": 2, "restarted": 1}     # a read changes nothing
    r = m.registry
    for reason, n in expect.items():
        assert r.get_sample_value("dmengine_device_sessions_ended_total", {"reason": reason}) == n
    assert r.get_sample_value("dmengine_device_sessions_started_total") == len(reasons)
    assert r.get_sample_value("dmengine_device_sessions_in_flight") == 0
    assert r.get_sample_value("dmengine_device_session_seconds_count") == len(reasons)
    # and the Python methods count into the same C fields as the device port
    m.message_in("xml", 10)
    m.message_out("wbxml", 7)
    m.observe_latency(0.0003)
    assert r.get_sample_value("dmengine_device_received_bytes_total", {"encoding": "xml"}) == 10
    assert r.get_sample_value("dmengine_device_sent_bytes_total", {"encoding": "wbxml"}) == 7
    assert r.get_sample_value("dmengine_device_request_seconds_bucket", {"le": "0.0002"}) == 0
    assert r.get_sample_value("dmengine_device_request_seconds_bucket", {"le": "0.0005"}) == 1


def test_a_metrics_object_the_device_port_cannot_count_through_is_refused():
    class LooksLikeMetrics:
        def message_in(self, encoding: str, nbytes: int) -> None: ...

    with pytest.raises(ConfigError, match="metrics") as exc:
        DmServer(ServerConfig(require_auth="none"), MemoryDeviceHandler(),
                 metrics=LooksLikeMetrics())           # type: ignore[arg-type]
    assert exc.value.key == "metrics"
