"""Stubs for dmengine/simulator/_client.pyx: the per-message part of the virtual device's
sans-IO DM client (``ClientBase``, subclassed by ``device.ClientSession``) and its helpers."""
from __future__ import annotations

import random
from typing import Any, Callable

from dmengine.message import Command, Message

CONTENT_TYPES: dict[str, str]
MAX_AUTH_ATTEMPTS: int
CODECS: dict[str, tuple[Callable[[bytes], Message], Callable[[Message], bytes]]]
HEADERS: dict[tuple[str, str], tuple[tuple[str, str], ...]]
WIRE: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]


def codec(encoding: str) -> tuple[Callable[[bytes], Message], Callable[[Message], bytes]]: ...
def base_headers(user_agent: str, content_type: str) -> tuple[tuple[str, str], ...]: ...
def wire(headers: tuple[tuple[str, str], ...],
         content_type: str) -> tuple[tuple[str, str], ...]: ...
def status(msg_ref: str | None, cmd_ref: str | None, cmd: str | None, code: int, *,
           targets: list[str] | None = None, sources: list[str] | None = None) -> Command: ...


class Outgoing:
    """One message to POST."""

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]
    url: str
    wire_headers: tuple[tuple[str, str], ...]

    def __init__(self, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...],
                 url: str) -> None: ...


class Template:
    """An encoded package 1 in pieces around its session ID, Cred Data and alert code."""

    parts: tuple[bytes, ...]
    with_cred: bool
    alerts: dict[int, bytes]

    def __init__(self, parts: tuple[bytes, ...], with_cred: bool) -> None: ...
    def fill(self, session_id: str, cred: str | bytes | None, alert: int) -> bytes: ...


class ClientBase:
    """State and per-message methods of a ``device.ClientSession``."""

    device: Any
    profile: Any
    rng: random.Random
    session_id: str
    alert: int
    url: str
    encoding: str
    content_type: str
    _decode: Callable[[bytes], Message]
    _encode: Callable[[Message], bytes]
    server_msg_id: str | None
    auth_scheme: str
    hdr_status: Command | None
    outcome: str | None
    detail: str
    in_chunk: Any
    server_authenticated: bool | None
    last_sent: Outgoing | None
    outbox: list[Command]
    jobs: list[Any]
    out_chunks: list[Command]
    sent_alerts: list[Command]
    results: list[tuple[str, int]]
    _continuations: set[int]
    msg_id: int
    server_max_msg: int
    server_max_obj: int
    auth_attempts: int
    messages_sent: int
    messages_received: int
    authenticated: bool
    done: bool
    want_final: bool
    package1_pending: bool
    server_final: bool

    def __init__(self, device: Any, *, session_id: str | None = None, alert: int = 1201,
                 url: str | None = None, rng: random.Random | None = None) -> None: ...
    def _finish(self, data: bytes) -> Outgoing: ...
    def first(self) -> Outgoing: ...
    def next(self) -> Outgoing | None: ...
    def _end(self, outcome: str, detail: str = "") -> None: ...
    def receive(self, body: bytes) -> None: ...
    def _on_hdr_status(self, st: Command) -> bool: ...
