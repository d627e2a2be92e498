"""Stubs for the SyncML DM message model (dmengine/_message.pyx)."""
from __future__ import annotations

from typing import Any

class Element:
    """A node of a nested document (TNDS, DevInf) carried in Data."""
    tag: str | None
    xmlns: str | None
    text: str | None
    children: list[Element] | None
    def __init__(self, *, tag: str | None = None, xmlns: str | None = None, text: str | None = None, children: list[Element] | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Meta:
    """MetInf values of a Meta, Chal or Cred element."""
    format: str | None
    type: str | None
    mark: str | None
    size: str | None
    max_msg_size: str | None
    max_obj_size: str | None
    next_nonce: str | None
    version: str | None
    extra: list[tuple[str, str | list[tuple[str, str]]]] | None
    def __init__(self, *, format: str | None = None, type: str | None = None, mark: str | None = None, size: str | None = None, max_msg_size: str | None = None, max_obj_size: str | None = None, next_nonce: str | None = None, version: str | None = None, extra: list[tuple[str, str | list[tuple[str, str]]]] | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Cred:
    """Credentials (SyncHdr only in DM)."""
    meta: Meta | None
    data: str | bytes | None
    def __init__(self, *, meta: Meta | None = None, data: str | bytes | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Chal:
    """A challenge inside a Status."""
    meta: Meta | None
    def __init__(self, *, meta: Meta | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Item:
    """One Item of a command: Target/Source URIs, Meta, Data, MoreData."""
    target: str | None
    target_name: str | None
    source: str | None
    source_name: str | None
    target_parent: str | None
    source_parent: str | None
    meta: Meta | None
    data: str | bytes | Element | None
    more_data: bool
    def __init__(self, *, target: str | None = None, target_name: str | None = None, source: str | None = None, source_name: str | None = None, target_parent: str | None = None, source_parent: str | None = None, meta: Meta | None = None, data: str | bytes | Element | None = None, more_data: bool = False) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Command:
    """One SyncBody command; ``name`` is its element name."""
    name: str | None
    cmd_id: str | None
    no_resp: bool
    msg_ref: str | None
    cmd_ref: str | None
    cmd: str | None
    target_refs: list[str] | None
    source_refs: list[str] | None
    cred: Cred | None
    chal: Chal | None
    meta: Meta | None
    data: str | bytes | None
    correlator: str | None
    items: list[Item] | None
    commands: list[Command] | None
    def __init__(self, *, name: str | None = None, cmd_id: str | None = None, no_resp: bool = False, msg_ref: str | None = None, cmd_ref: str | None = None, cmd: str | None = None, target_refs: list[str] | None = None, source_refs: list[str] | None = None, cred: Cred | None = None, chal: Chal | None = None, meta: Meta | None = None, data: str | bytes | None = None, correlator: str | None = None, items: list[Item] | None = None, commands: list[Command] | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class SyncHdr:
    """The SyncML header."""
    ver_dtd: str | None
    ver_proto: str | None
    session_id: str | None
    msg_id: str | None
    target: str | None
    target_name: str | None
    source: str | None
    source_name: str | None
    resp_uri: str | None
    no_resp: bool
    cred: Cred | None
    meta: Meta | None
    def __init__(self, *, ver_dtd: str | None = None, ver_proto: str | None = None, session_id: str | None = None, msg_id: str | None = None, target: str | None = None, target_name: str | None = None, source: str | None = None, source_name: str | None = None, resp_uri: str | None = None, no_resp: bool = False, cred: Cred | None = None, meta: Meta | None = None) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

class Message:
    """One SyncML DM message."""
    hdr: SyncHdr
    commands: list[Command]
    final: bool
    number_commands: bool
    """Encoder instruction, not content: commands without CmdID are numbered after the
    previous command's (depth first)."""
    def __init__(self, *, hdr: SyncHdr | None = None, commands: list[Command] | None = None, final: bool = False) -> None: ...
    def astuple(self) -> tuple[Any, ...]: ...

