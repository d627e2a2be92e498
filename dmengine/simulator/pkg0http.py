"""The simulator's SMS centre: package 0 posted over HTTP reaches the fleet's phones.

``dmengine serve --gateway http:URL`` hands every package 0 to ``URL`` as JSON
(``dmengine.notify.http``: ``{"msisdn", "pkg0": base64, "content_type",
"wap_application_id"}``).  :class:`Pkg0Listener` is that URL for a :class:`~.fleet.Fleet`:
each post is given to ``Fleet.deliver_pkg0`` (verify, then the device's session starts in the
background) and answered at once — 200 ``{"id": N}`` when the MSISDN is one of the fleet's
phones, 404 when it is not (the gateway does not retry a 4xx), 400 for a body that is not
such JSON.  ``GET /stats`` answers ``Fleet.summary()`` as JSON (for a benchmark that watches
the run).

Like the fleet's HTTP client, it is a raw ``asyncio.Protocol`` with ``httptools`` (aiohttp's
server costs several times more per request, and the simulator shares its core with the
sessions the notifications start).
"""
from __future__ import annotations

import asyncio
import binascii
import json
from typing import Any

import httptools
import msgspec

from .fleet import Fleet

__all__ = ["Pkg0Listener", "MAX_BODY"]

MAX_BODY = 64 * 1024        #: a package 0 is a few hundred bytes; anything larger is refused


class _Pkg0(msgspec.Struct):
    msisdn: str
    pkg0: str


_decode = msgspec.json.Decoder(_Pkg0).decode


def _answer(status: int, body: bytes, keep_alive: bool) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              413: "Payload Too Large"}.get(status, "Error")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reason.encode(), len(body),
               b"" if keep_alive else b"Connection: close\r\n", body))


class _Conn(asyncio.Protocol):
    __slots__ = ("listener", "transport", "parser", "url", "body", "too_large")

    def __init__(self, listener: "Pkg0Listener") -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.too_large = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close()
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_answer(400, b'{"error":"bad request"}', False))
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.too_large = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        if self.too_large:
            return
        self.body.append(body)
        if sum(len(b) for b in self.body) > MAX_BODY:
            self.too_large = True
            self.body = []

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        method = self.parser.get_method()
        status, body = self.listener.handle(method, self.url, b"".join(self.body),
                                            self.too_large)
        if self.transport is not None:
            self.transport.write(_answer(status, body, keep))
            if not keep:
                self.transport.close()


class Pkg0Listener:
    """An HTTP listener handing posted package-0 notifications to ``fleet``."""

    def __init__(self, fleet: Fleet, host: str = "127.0.0.1", port: int = 0,
                 path: str = "/pkg0") -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.path = path.encode()
        self.server: asyncio.AbstractServer | None = None
        self.conns: set[_Conn] = set()
        self.received = 0          # posts answered 200
        self.unknown = 0           # posts for an MSISDN not in the fleet
        self.bad = 0               # posts that were not package-0 JSON

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}{self.path.decode()}"

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), self.host, self.port,
                                               backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.url

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in list(self.conns):
                c._close()
            await self.server.wait_closed()
            self.server = None

    def stats(self) -> dict[str, Any]:
        out = self.fleet.summary()
        out.update(pkg0_posts=self.received, pkg0_unknown=self.unknown, pkg0_bad=self.bad)
        return out

    def handle(self, method: bytes, url: bytes, body: bytes, too_large: bool
               ) -> tuple[int, bytes]:
        path = url.split(b"?", 1)[0]
        if method == b"GET" and path == b"/stats":
            return 200, json.dumps(self.stats()).encode()
        if path != self.path:
            return 404, b'{"error":"not found"}'
        if method != b"POST":
            return 405, b'{"error":"POST a package 0"}'
        if too_large:
            self.bad += 1
            return 413, b'{"error":"too large"}'
        try:
            note = _decode(body)
            pkg0 = binascii.a2b_base64(note.pkg0, strict_mode=True)
        except (msgspec.DecodeError, binascii.Error, ValueError):
            self.bad += 1
            return 400, b'{"error":"not a package-0 notification"}'
        if not self.fleet.deliver_pkg0(note.msisdn, pkg0):
            self.unknown += 1
            return 404, b'{"error":"no such phone"}'
        self.received += 1
        return 200, b'{"id":"%d"}' % self.received
