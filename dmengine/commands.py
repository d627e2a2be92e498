"""Operations → SyncML commands (L4), and the prepared-command cache shared by a job's sessions.

An operation's commands depend on the operation alone (QUERY, SET, EXEC with its correlator,
DIAG naming its nodes) or also on the device (UPDATE: its content and FUMO node; DIAG from the
capability).  The first kind is prepared once (checked and sized by the session engine's
``prepare``) and shared by every session that runs the same operation: a campaign's million
tasks of one SET or QUERY cost one prepare, not a million.

QUERY and DIAG read each node with a Get of its own, so that the task's result has a DM status
per node (one Get for all the nodes would report one status for all of them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ._session import DmSession, prepare
from .bounded import BoundedDict
from .config import BrokerConfig
from .content import ContentService
from .errors import CommandRejected, NotFound, ServiceError, UnknownResource
from .message import Command, Item, Meta
from .model import (Capability, Content, Device, DiagOp, ExecOp, FumoMode, QueryOp, SetOp, Task,
                    UpdateOp)
from .store.base import Store

TEMPLATE_CACHE_SIZE = 1024             #: distinct operations whose prepared commands are kept


@dataclass
class Commands:
    """Builds a task's commands (``config``: where devices download packages, the default
    FUMO node and DIAG nodes)."""

    store: Store
    config: BrokerConfig
    content: ContentService | None = None
    #: operation -> its commands, prepared once and shared (oldest dropped past the size)
    templates: BoundedDict[tuple[Any, ...], list[Any]] = field(
        default_factory=lambda: BoundedDict(TEMPLATE_CACHE_SIZE))

    @staticmethod
    def template_key(task: Task) -> tuple[Any, ...] | None:
        """What a task's commands depend on, when that is the operation alone; None when
        they depend on the device too."""
        op = task.op
        if isinstance(op, (QueryOp, SetOp)) or (isinstance(op, DiagOp) and op.nodes):
            return (msgspec.msgpack.encode(op),)
        if isinstance(op, ExecOp):
            return (msgspec.msgpack.encode(op), task.correlator)
        return None

    async def for_session(self, session: Any, task: Task, *,
                          device: Device | None = None) -> list[Any]:
        """The commands to queue for ``task``: for our own session engine, the operation's
        prepared commands, shared with every other task of the same operation."""
        key = self.template_key(task) if isinstance(session, DmSession) else None
        if key is not None:
            hit = self.templates.get(key)
            if hit is not None:
                return hit
        commands = await self.for_task(task, device=device)
        if key is None:
            return commands
        try:
            prepared = [prepare(c) for c in commands]
        except CommandRejected:
            return commands                     # queue() refuses them and says why
        self.templates[key] = prepared          # (the oldest goes when it is full)
        return prepared

    async def for_task(self, task: Task, *, device: Device | None = None) -> list[Command]:
        """The operation's commands (``device``: the task's device record when the caller
        has it; UPDATE reads it otherwise)."""
        op = task.op
        if isinstance(op, QueryOp):
            return [Command(name="Get", items=[Item(target=u)]) for u in op.nodes]
        if isinstance(op, DiagOp):
            nodes = list(op.nodes) or list(await self._diag_nodes(task))
            return [Command(name="Get", items=[Item(target=u)]) for u in nodes]
        if isinstance(op, SetOp):
            out = []
            for ch in op.changes:
                meta = None
                if ch.format != "chr" or ch.type:
                    meta = Meta(format=ch.format if ch.format != "chr" else None, type=ch.type)
                item = Item(target=ch.uri, meta=meta,
                            data=None if ch.action == "Delete" else (ch.value or ""))
                out.append(Command(name=ch.action, items=[item]))
            return out
        if isinstance(op, ExecOp):
            return [Command(name="Exec", correlator=task.correlator,
                            items=[Item(target=op.uri, data=op.data)])]
        if isinstance(op, UpdateOp):
            if device is None or device.dev_id != task.dev_id:
                device = await self.store.get_device(task.dev_id)
            content, fumo, mode = await self.content_for(op, device)
            url = f"{self.config.content_base_url.rstrip('/')}/{content.content_id}"
            node = "Download" if mode == FumoMode.DOWNLOAD_THEN_UPDATE else "DownloadAndUpdate"
            return [
                Command(name="Replace", items=[Item(target=f"{fumo}/{node}/PkgURL", data=url)]),
                Command(name="Exec", correlator=task.correlator,
                        items=[Item(target=f"{fumo}/{node}")]),
            ]
        raise ServiceError(f"operation {type(op).__name__} cannot run in a DM session",
                           where="operation")

    async def _diag_nodes(self, task: Task) -> tuple[str, ...]:
        device = await self.store.get_device(task.dev_id)
        cap = await self.capability(device)
        if cap is not None and "diag" in cap.mo_paths:
            return tuple(p.strip() for p in cap.mo_paths["diag"].split(",") if p.strip())
        return self.config.diag_nodes

    async def capability(self, device: Device) -> Capability | None:
        if not device.capability:
            return None
        try:
            return await self.store.get_capability(device.capability)
        except NotFound:
            return None

    async def content_for(self, op: UpdateOp, device: Device) -> tuple[Content, str, FumoMode]:
        """The firmware package of an UPDATE: the one named, or the one the content store picks
        for the device's capability and current firmware (the DevDetail/FwV snapshot, learned
        from its sessions), with the FUMO node and mode.  Raises ServiceError naming the field
        when none fits."""
        cap = await self.capability(device)
        fw = device.devdetail.get("./DevDetail/FwV")
        if op.content_id is None and not (fw and device.capability and self.content):
            raise ServiceError("the device's capability or firmware version is unknown: name the "
                               "content, or read ./DevDetail/FwV first (QUERY or DIAG)",
                               where="operation.content_id")
        if self.content is not None and device.capability and fw:
            try:
                content = await self.content.pick_for_update(device.capability, fw, op.content_id)
            except ServiceError as exc:
                raise ServiceError(str(exc), where=f"operation.{exc.where or 'content_id'}") \
                    from None
        else:
            content_id = op.content_id
            assert content_id is not None      # None without a known firmware raised above
            try:
                content = await self.store.get_content(content_id)
            except NotFound:
                raise UnknownResource(f"no content {content_id!r}",
                                      where="operation.content_id") from None
            if content.capability and device.capability and \
                    content.capability != device.capability:
                raise ServiceError(f"content {content.content_id} is for capability "
                                   f"{content.capability}, the device is {device.capability}",
                                   where="operation.content_id")
        fumo = op.fumo_path or (cap.mo_paths.get("fumo") if cap else None) \
            or self.config.default_fumo_path
        mode = cap.fumo_mode if cap else FumoMode.DOWNLOAD_AND_UPDATE
        return content, fumo.rstrip("/"), mode


__all__ = ["Commands", "TEMPLATE_CACHE_SIZE"]
