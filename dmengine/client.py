"""A small Python client of the dmengine API (L6) and the ``dmengine devices …`` and
``dmengine content upload`` commands.

::

    async with Client("http://127.0.0.1:8081", api_key) as c:
        report = await c.import_devices("devices.csv")        # an ImportReport
        dev = await c.get_device("356938035643809")          # a DeviceView; a bare IMEI works
        print(dev.dev_id, dev.account.client_name)
        async for dev in c.iter_devices(capability="cap-ex100", firmware="2.3.9"):
            ...
        job = await c.get_job("j-…")                         # a JobView: job.final, job.rate

Answers are the API's own msgspec Structs (:mod:`dmengine.wsi.schemas`: the camelCase views
of the records, the pages, the reports), decoded with msgspec against the type the route
answers with (the OpenAPI document names the same ones), so a caller gets attributes in
Python's snake_case (``dev.dev_id``, ``job.eta_seconds``) and a type checker sees them.
:func:`to_json` turns one back into the API's JSON (camelCase).  An answer that does not
match its type is a :class:`ClientError` ``bad_answer`` naming the field.

The API key defaults to ``$DMENGINE_API_KEY``, else the file ``dmengine serve`` keeps in its
data directory (``./var/api-key``).  Errors of the API come back as :class:`ClientError` with
the API's ``error``, ``message`` and ``where``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar, overload
from urllib.parse import quote

import aiohttp
import msgspec

# The answers' types are the server's (L5, wsi): schemas.py needs only msgspec and the
# records (L0), not aiohttp.web, so the client (L6) imports it without the server.
from .wsi.schemas import (BootstrapJobCreated, ContentPage, ContentView, DevicePage,
                          DeviceView, HistoryPage, HistoryView, ImportReport, JobCreated,
                          JobOut, JobPage, TaskCancelled, TaskCreated, TaskDataView, TaskPage,
                          TaskSummary)

__all__ = ["Client", "SyncClient", "ClientError", "DEFAULT_API_URL", "DEFAULT_API_KEY_FILE",
           "read_api_key", "import_format_of", "register_cli", "register_content_cli",
           "to_json", "to_builtins",
           # the answers' types, re-exported for callers' annotations
           "BootstrapJobCreated", "ContentPage", "ContentView", "DevicePage", "DeviceView",
           "HistoryPage", "HistoryView", "ImportReport", "JobCreated", "JobOut", "JobPage",
           "TaskCancelled", "TaskCreated", "TaskDataView", "TaskPage", "TaskSummary"]

DEFAULT_API_URL = "http://127.0.0.1:8081"
DEFAULT_API_KEY_FILE = "var/api-key"
MEDIA_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}
READ_BLOCK = 1 << 20

T = TypeVar("T")

_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(t: Any) -> msgspec.json.Decoder[Any]:
    d = _DECODERS.get(t)
    if d is None:
        d = _DECODERS[t] = msgspec.json.Decoder(t)
    return d


def to_builtins(obj: Any) -> Any:
    """An answer (a Struct, a list of them, …) as the API's JSON values: dicts with the
    camelCase names, enums as their strings, every field (as the server sends them)."""
    return msgspec.to_builtins(obj)


def to_json(obj: Any) -> bytes:
    """An answer encoded back to the API's JSON (camelCase)."""
    return msgspec.json.encode(obj)


class ClientError(Exception):
    """The API refused a request (``status`` ≥ 400), could not be reached (``status`` 0), or
    answered something that is not the route's type (``error`` ``bad_answer``, ``where`` the
    field)."""

    def __init__(self, status: int, error: str, message: str, where: str | None = None) -> None:
        super().__init__(f"{error}: {message}" + (f" (at {where})" if where else ""))
        self.status = status
        self.error = error
        self.message = message
        self.where = where


def read_api_key(path: str | os.PathLike[str] | None = None) -> str | None:
    """``$DMENGINE_API_KEY``, else the first line of ``path`` (default ``./var/api-key``),
    else None."""
    env = os.environ.get("DMENGINE_API_KEY")
    if env and path is None:
        return env
    p = pathlib.Path(path or DEFAULT_API_KEY_FILE)
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


def import_format_of(path: str, explicit: str | None = None) -> str:
    """csv or ndjson: ``explicit``, else by the file's extension (.csv; .ndjson, .jsonl)."""
    if explicit:
        return explicit
    ext = pathlib.Path(path).suffix.lower()
    if ext in (".csv", ".txt"):
        return "csv"
    if ext in (".ndjson", ".jsonl", ".json"):
        return "ndjson"
    raise ValueError(f"cannot tell the format of {path!r} by its extension: use --format")


def _seg(ident: str) -> str:
    """An id as one path segment (``IMEI:…`` and ``+`` kept readable, ``/`` escaped)."""
    return quote(ident, safe=":@+=")


def _bad_answer(status: int, what: str, exc: Exception) -> ClientError:
    # msgspec ends its message with "- at `$.items[0].devId`" (the wire names): that is where
    msg = str(exc)
    head, sep, at = msg.rpartition(" - at `")
    if sep:
        return ClientError(status, "bad_answer", f"{what}: {head}", at.rstrip("`"))
    return ClientError(status, "bad_answer", f"{what}: {msg}")


class Client:
    """The API over aiohttp; one connection pool per client (``async with`` or ``close``).
    Every call answers the route's Struct of :mod:`dmengine.wsi.schemas`."""

    def __init__(self, url: str = DEFAULT_API_URL, api_key: str | None = None, *,
                 ssl: Any = None, timeout: float | None = 300.0) -> None:
        self.url = url.rstrip("/") + "/"
        self.api_key = api_key if api_key is not None else read_api_key()
        self._ssl = ssl
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"X-API-Key": self.api_key} if self.api_key else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    @overload
    async def request(self, method: str, path: str, *, type: type[T],
                      params: dict[str, Any] | None = None, json: Any = None,
                      data: Any = None, headers: dict[str, str] | None = None) -> T: ...

    @overload
    async def request(self, method: str, path: str, *, type: None = None,
                      params: dict[str, Any] | None = None, json: Any = None,
                      data: Any = None, headers: dict[str, str] | None = None) -> Any: ...

    async def request(self, method: str, path: str, *, type: Any = None,
                      params: dict[str, Any] | None = None, json: Any = None,
                      data: Any = None, headers: dict[str, str] | None = None) -> Any:
        """One call.  The answer decoded as ``type`` (a Struct of :mod:`dmengine.wsi.schemas`,
        a list of them…), else as plain JSON values; None for 204.  ``json`` may be a Struct
        (a request view) or plain values.  ClientError for an API error or an answer that is
        not a ``type``."""
        q = {k: ("true" if v is True else "false" if v is False else str(v))
             for k, v in (params or {}).items() if v is not None}
        if json is not None:
            # msgspec encodes request Structs (camelCase) and plain values alike
            data = msgspec.json.encode(json)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        try:
            async with self._http().request(method, self.url + path.lstrip("/"), params=q,
                                            data=data, headers=headers,
                                            ssl=self._ssl) as r:
                status = r.status
                raw = await r.read()
                reason = r.reason or ""
        except aiohttp.ClientError as exc:
            raise ClientError(0, "unreachable", f"{self.url}: {exc}") from None
        if status == 204:
            return None
        if status >= 400:
            try:
                body = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                body = None
            if isinstance(body, dict) and "error" in body:
                raise ClientError(status, str(body["error"]), str(body.get("message", "")),
                                  body.get("where"))
            raise ClientError(status, f"http_{status}", reason)
        try:
            return msgspec.json.decode(raw) if type is None else _decoder(type).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _bad_answer(status, f"{method} /{path.lstrip('/')}", exc) from None

    # --- devices (IDeviceManagerServices) ------------------------------------------------------

    async def import_devices(self, source: str | os.PathLike[str] | Iterable[bytes], *,
                             format: str | None = None, upsert: bool = False,
                             progress: Callable[[int], None] | None = None) -> ImportReport:
        """importDeviceInstances: streams a file (or an iterable of byte blocks) to the API.
        ``progress(n)`` is called with the bytes of each block sent.  Returns the report
        (``rows``, ``created``, ``replaced``, ``rejected``, ``errors``, ``errors_omitted``)."""
        if isinstance(source, (str, os.PathLike)):
            fmt = import_format_of(os.fspath(source), format)
            path = os.fspath(source)

            def blocks() -> Iterable[bytes]:
                with open(path, "rb") as f:
                    while True:
                        b = f.read(READ_BLOCK)
                        if not b:
                            return
                        yield b
            it: Iterable[bytes] = blocks()
        else:
            if format is None:
                raise ValueError("give format= (csv or ndjson) for a stream of blocks")
            fmt, it = format, source

        async def body() -> AsyncIterator[bytes]:
            for b in it:
                yield b
                if progress is not None:
                    progress(len(b))
                await asyncio.sleep(0)
        return await self.request("POST", "v1/devices/import", type=ImportReport,
                                  params={"upsert": upsert}, data=body(),
                                  headers={"Content-Type": MEDIA_TYPES[fmt]})

    async def create_device(self, device: DeviceView | dict[str, Any]) -> DeviceView:
        """createDeviceInstance: ``device`` a DeviceView or a dict in the API's names
        (``devId``, ``imei``, ``msisdn``, ``account: {serverId, clientName, clientPassword…}``).
        The answer shows secrets as ``***``."""
        return await self.request("POST", "v1/devices", type=DeviceView, json=device)

    async def get_device(self, ident: str) -> DeviceView:
        """getDeviceInstanceByDeviceID: ``ident`` is a DevId or a bare IMEI (15 digits)."""
        return await self.request("GET", f"v1/devices/{_seg(ident)}", type=DeviceView)

    async def update_device(self, ident: str, changes: Any) -> DeviceView:
        """updateDeviceInstance: a merge-patch (a DevicePatch, or a dict in the API's names;
        None removes a field; ``account`` merges)."""
        return await self.request("PATCH", f"v1/devices/{_seg(ident)}", type=DeviceView,
                                  json=changes)

    async def delete_device(self, ident: str) -> None:
        await self.request("DELETE", f"v1/devices/{_seg(ident)}")

    async def find_devices(self, *, cursor: str | None = None, limit: int | None = None,
                           **filters: Any) -> DevicePage:
        """One page of getDeviceInstances (``items``, ``next_cursor``).  Filters: msisdn,
        imei, capability, tac, model, firmware, last_contact_after / last_contact_before
        (snake_case names are passed in the API's camelCase)."""
        filters = {_camel(k): v for k, v in filters.items()}
        return await self.request("GET", "v1/devices", type=DevicePage,
                                  params={**filters, "cursor": cursor, "limit": limit})

    async def iter_devices(self, *, limit: int | None = 1000,
                           **filters: Any) -> AsyncIterator[DeviceView]:
        """Every device the filters select, page after page."""
        cursor = None
        while True:
            page = await self.find_devices(cursor=cursor, limit=limit, **filters)
            for d in page.items:
                yield d
            cursor = page.next_cursor
            if cursor is None:
                return

    # --- content -------------------------------------------------------------------------

    async def upload_content(self, path: str | os.PathLike[str], *, name: str | None = None,
                             capability: str | None = None, from_version: str | None = None,
                             to_version: str | None = None,
                             content_type: str | None = None,
                             progress: Callable[[int], None] | None = None) -> ContentView:
        """uploadContent: streams the file with its sha256 and size, which the server checks
        (a file that changes while it is sent is refused, 422).  Returns the record
        (``content_id``, ``download_url``…)."""
        import hashlib
        path = os.fspath(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(READ_BLOCK), b""):
                h.update(b)
        size = os.path.getsize(path)

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                for b in iter(lambda: f.read(READ_BLOCK), b""):
                    yield b
                    if progress is not None:
                        progress(len(b))
                    await asyncio.sleep(0)
        params = {"name": name or os.path.basename(path), "sha256": h.hexdigest(),
                  "capability": capability, "from": from_version, "to": to_version,
                  "type": content_type}
        return await self.request("POST", "v1/content", type=ContentView, params=params,
                                  data=body(),
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(size)})

    async def get_content(self, content_id: str) -> ContentView:
        return await self.request("GET", f"v1/content/{_seg(content_id)}", type=ContentView)

    async def list_content(self, *, cursor: str | None = None, limit: int | None = None,
                           **filters: Any) -> ContentPage:
        filters = {_camel(k): v for k, v in filters.items()}
        return await self.request("GET", "v1/content", type=ContentPage,
                                  params={**filters, "cursor": cursor, "limit": limit})

    # --- one device's tasks (IDeploymentBrokerServices) ---------------------------------------

    async def do_operation(self, body: Any) -> TaskCreated:
        """doOperation: ``body`` a DoOperationRequest or a dict in the API's names
        (``target``, ``operation``, ``bOptin``…) → ``task_id``."""
        return await self.request("POST", "v1/operations", type=TaskCreated, json=body)

    async def get_task(self, task_id: str) -> TaskDataView:
        """getTaskById: the seeds' TaskData (``status`` is ``getStatus()``)."""
        return await self.request("GET", f"v1/tasks/{_seg(task_id)}", type=TaskDataView)

    async def task_history_page(self, task_id: str, *, cursor: str | None = None,
                                limit: int | None = None) -> HistoryPage:
        return await self.request("GET", f"v1/tasks/{_seg(task_id)}/history", type=HistoryPage,
                                  params={"cursor": cursor, "limit": limit})

    async def task_history(self, task_id: str) -> list[HistoryView]:
        """getTaskHistory, every page: the task's state changes, oldest first."""
        items: list[HistoryView] = []
        cursor = None
        while True:
            page = await self.task_history_page(task_id, cursor=cursor, limit=1000)
            items += page.items
            cursor = page.next_cursor
            if cursor is None:
                return items

    async def cancel_task(self, task_id: str) -> TaskCancelled:
        return await self.request("POST", f"v1/tasks/{_seg(task_id)}/cancel", type=TaskCancelled)

    # --- jobs (IBulkOperationsManagerServices) ------------------------------------------------

    async def create_job(self, body: Any) -> JobCreated:
        """createDeployments: ``body`` in the API's names (``operation``, ``selection``,
        ``stages``…) → ``job_id``, ``state``, ``targets``."""
        return await self.request("POST", "v1/jobs", type=JobCreated, json=body)

    async def bulk_operation(self, body: Any) -> JobCreated:
        """doBulkOperation → ``job_id``, ``state``, ``targets``."""
        return await self.request("POST", "v1/operations/bulk", type=JobCreated, json=body)

    async def get_job(self, job_id: str) -> JobOut:
        """getJob: the job, its counts, ``final``, ``succeeded``, ``failed``, ``progress``,
        ``rate`` and ``eta_seconds``."""
        return await self.request("GET", f"v1/jobs/{_seg(job_id)}", type=JobOut)

    async def jobs(self, *, state: str | None = None, owner: str | None = None,
                   cursor: str | None = None, limit: int | None = None) -> JobPage:
        """One page of getJobs."""
        return await self.request("GET", "v1/jobs", type=JobPage, params={
            "state": state, "owner": owner, "cursor": cursor, "limit": limit})

    async def iter_jobs(self, *, state: str | None = None, owner: str | None = None,
                        limit: int | None = 1000) -> AsyncIterator[JobOut]:
        cursor = None
        while True:
            page = await self.jobs(state=state, owner=owner, cursor=cursor, limit=limit)
            for j in page.items:
                yield j
            cursor = page.next_cursor
            if cursor is None:
                return

    async def jobs_by_date(self, start: float | None = None, end: float | None = None, *,
                           cursor: str | None = None, limit: int | None = None) -> JobPage:
        """One page of getJobsByDate (created in [start, end), epoch seconds)."""
        return await self.request("GET", "v1/jobs/by-date", type=JobPage, params={
            "from": start, "to": end, "cursor": cursor, "limit": limit})

    async def control(self, job_id: str, action: str, cause: str | None = None) -> JobOut:
        """``action`` pause / restart / cancel (pauseJob, restartJob, cancelJob) → the job."""
        if action not in ("pause", "restart", "cancel"):
            raise ValueError(f"action is pause, restart or cancel, not {action!r}")
        return await self.request("POST", f"v1/jobs/{_seg(job_id)}/{action}", type=JobOut,
                                  json={"cause": cause} if cause else None)

    async def pause_job(self, job_id: str, cause: str | None = None) -> JobOut:
        return await self.control(job_id, "pause", cause)

    async def restart_job(self, job_id: str) -> JobOut:
        return await self.control(job_id, "restart")

    async def cancel_job(self, job_id: str, cause: str | None = None) -> JobOut:
        return await self.control(job_id, "cancel", cause)

    async def tasks(self, job_id: str, *, state: str | None = None, cursor: str | None = None,
                    limit: int | None = None) -> TaskPage:
        """One page of getTasks (a job's tasks, in creation order)."""
        return await self.request("GET", f"v1/jobs/{_seg(job_id)}/tasks", type=TaskPage,
                                  params={"state": state, "cursor": cursor, "limit": limit})

    async def iter_tasks(self, job_id: str, *, state: str | None = None,
                         limit: int | None = 1000) -> AsyncIterator[TaskSummary]:
        """Every task of the job, page after page."""
        cursor = None
        while True:
            page = await self.tasks(job_id, state=state, cursor=cursor, limit=limit)
            for t in page.items:
                yield t
            cursor = page.next_cursor
            if cursor is None:
                return


class SyncClient:
    """The same calls as :class:`Client`, blocking: for scripts and notebooks.  The async
    client runs on an event loop of its own in a background thread (so it also works where a
    loop is already running); ``close()`` (or ``with``) stops it.  Answers are the same
    Structs::

        with SyncClient("http://127.0.0.1:8081", key) as c:
            c.get_device("IMEI:356938035643809").msisdn
    """

    def __init__(self, url: str = DEFAULT_API_URL, api_key: str | None = None,
                 **kw: Any) -> None:
        import threading
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dmengine-client",
                                        daemon=True)
        self._thread.start()
        self._client = Client(url, api_key, **kw)

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iter(self, agen: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return

    # one blocking method per call of Client, spelled out so a type checker sees the answers

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self._run(self._client.request(method, path, **kw))

    def import_devices(self, source: Any, **kw: Any) -> ImportReport:
        return self._run(self._client.import_devices(source, **kw))  # type: ignore[no-any-return]

    def create_device(self, device: Any) -> DeviceView:
        return self._run(self._client.create_device(device))  # type: ignore[no-any-return]

    def get_device(self, ident: str) -> DeviceView:
        return self._run(self._client.get_device(ident))  # type: ignore[no-any-return]

    def update_device(self, ident: str, changes: Any) -> DeviceView:
        return self._run(self._client.update_device(ident, changes))  # type: ignore[no-any-return]

    def delete_device(self, ident: str) -> None:
        self._run(self._client.delete_device(ident))

    def find_devices(self, **kw: Any) -> DevicePage:
        return self._run(self._client.find_devices(**kw))  # type: ignore[no-any-return]

    def iter_devices(self, **kw: Any) -> Iterator[DeviceView]:
        """Every device the filters select (pages fetched as the iteration goes)."""
        return self._iter(self._client.iter_devices(**kw))

    def upload_content(self, path: str | os.PathLike[str], **kw: Any) -> ContentView:
        return self._run(self._client.upload_content(path, **kw))  # type: ignore[no-any-return]

    def get_content(self, content_id: str) -> ContentView:
        return self._run(self._client.get_content(content_id))  # type: ignore[no-any-return]

    def list_content(self, **kw: Any) -> ContentPage:
        return self._run(self._client.list_content(**kw))  # type: ignore[no-any-return]

    def do_operation(self, body: Any) -> TaskCreated:
        return self._run(self._client.do_operation(body))  # type: ignore[no-any-return]

    def get_task(self, task_id: str) -> TaskDataView:
        return self._run(self._client.get_task(task_id))  # type: ignore[no-any-return]

    def task_history(self, task_id: str) -> list[HistoryView]:
        return self._run(self._client.task_history(task_id))  # type: ignore[no-any-return]

    def cancel_task(self, task_id: str) -> TaskCancelled:
        return self._run(self._client.cancel_task(task_id))  # type: ignore[no-any-return]

    def create_job(self, body: Any) -> JobCreated:
        return self._run(self._client.create_job(body))  # type: ignore[no-any-return]

    def bulk_operation(self, body: Any) -> JobCreated:
        return self._run(self._client.bulk_operation(body))  # type: ignore[no-any-return]

    def get_job(self, job_id: str) -> JobOut:
        return self._run(self._client.get_job(job_id))  # type: ignore[no-any-return]

    def jobs(self, **kw: Any) -> JobPage:
        return self._run(self._client.jobs(**kw))  # type: ignore[no-any-return]

    def iter_jobs(self, **kw: Any) -> Iterator[JobOut]:
        return self._iter(self._client.iter_jobs(**kw))

    def jobs_by_date(self, start: float | None = None, end: float | None = None,
                     **kw: Any) -> JobPage:
        return self._run(self._client.jobs_by_date(start, end, **kw))  # type: ignore[no-any-return]

    def control(self, job_id: str, action: str, cause: str | None = None) -> JobOut:
        return self._run(self._client.control(job_id, action, cause))  # type: ignore[no-any-return]

    def pause_job(self, job_id: str, cause: str | None = None) -> JobOut:
        return self.control(job_id, "pause", cause)

    def restart_job(self, job_id: str) -> JobOut:
        return self.control(job_id, "restart")

    def cancel_job(self, job_id: str, cause: str | None = None) -> JobOut:
        return self.control(job_id, "cancel", cause)

    def tasks(self, job_id: str, **kw: Any) -> TaskPage:
        return self._run(self._client.tasks(job_id, **kw))  # type: ignore[no-any-return]

    def iter_tasks(self, job_id: str, **kw: Any) -> Iterator[TaskSummary]:
        return self._iter(self._client.iter_tasks(job_id, **kw))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)

# --- CLI: dmengine devices … ---------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_API_URL,
                   help="API of a running server (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $DMENGINE_API_KEY, else the file --api-key-file)")
    p.add_argument("--api-key-file", default=DEFAULT_API_KEY_FILE,
                   help="file holding the API key, as `dmengine serve` writes it "
                        "(default: %(default)s)")


def _key(args: argparse.Namespace) -> str:
    key = args.api_key or os.environ.get("DMENGINE_API_KEY") or read_api_key(args.api_key_file)
    if not key:
        raise _Usage(f"no API key: give --api-key, set DMENGINE_API_KEY, or run from the "
                     f"directory whose {args.api_key_file} `dmengine serve` wrote")
    return key


class _Usage(Exception):
    pass


def print_report(report: ImportReport | dict[str, Any], *, show: int = 20,
                 file: Any = None) -> None:
    """What an import did, for people: the counts, then the first ``show`` rejected rows."""
    if isinstance(report, dict):               # the API's JSON, e.g. read from a file
        report = msgspec.convert(report, ImportReport)
    out = file or sys.stdout
    print(f"rows {report.rows}: created {report.created}, replaced "
          f"{report.replaced}, rejected {report.rejected}", file=out)
    errors = report.errors
    for e in errors[:show]:
        where = f" [{e.where}]" if e.where else ""
        print(f"  line {e.line}{where}: {e.message}", file=out)
    more = report.rejected - min(show, len(errors))
    if more > 0:
        print(f"  … and {more} more rejected row(s)"
              + (" (--json lists the first 1000)" if len(errors) > show else ""), file=out)


async def _import(args: argparse.Namespace) -> ImportReport:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    console = Console(stderr=True)
    size = os.path.getsize(args.file)
    show = args.progress if args.progress is not None else console.is_terminal
    with Progress(TextColumn("[bold]importing[/] {task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=console, disable=not show, transient=True) as bar:
        task = bar.add_task(os.path.basename(args.file), total=size)
        async with Client(args.url, _key(args)) as c:
            return await c.import_devices(args.file, format=args.fmt, upsert=args.upsert,
                                          progress=lambda n: bar.advance(task, n))


def _cmd_import(args: argparse.Namespace) -> int:
    import json
    try:
        args.fmt = import_format_of(args.file, args.format)
        if not os.path.isfile(args.file):
            raise _Usage(f"no such file: {args.file}")
        report = asyncio.run(_import(args))
    except (_Usage, ValueError) as exc:
        print(f"dmengine devices import: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        what = "cannot reach the server" if exc.status == 0 else \
            f"the server refused the import ({exc.status})"
        print(f"dmengine devices import: {what}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(to_builtins(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 1 if report.rejected else 0


async def _get_or_list(args: argparse.Namespace) -> int:
    import json
    async with Client(args.url, _key(args)) as c:
        if args.devices_cmd == "get":
            print(json.dumps(to_builtins(await c.get_device(args.ident)), indent=2))
            return 0
        filters = {k: v for k in ("capability", "tac", "model", "firmware", "msisdn", "imei")
                   if (v := getattr(args, k)) is not None}
        n = 0
        async for d in c.iter_devices(**filters):
            print(json.dumps(to_builtins(d)))    # one device a line (NDJSON, as import takes)
            n += 1
            if args.max is not None and n >= args.max:
                break
        return 0


def _cmd_get_or_list(args: argparse.Namespace) -> int:
    """``devices get`` / ``devices list``: 0 done, 1 the server refused (message printed,
    e.g. 404 for an unknown device), 2 usage or the server could not be reached."""
    try:
        return asyncio.run(_get_or_list(args))
    except _Usage as exc:
        print(f"dmengine devices {args.devices_cmd}: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"dmengine devices {args.devices_cmd}: "
              f"{'cannot reach the server' if exc.status == 0 else exc.status}: {exc}",
              file=sys.stderr)
        return 2 if exc.status in (0, 401) else 1


async def _upload(args: argparse.Namespace) -> ContentView:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TransferSpeedColumn)
    console = Console(stderr=True)
    show = args.progress if args.progress is not None else console.is_terminal
    with Progress(TextColumn("[bold]uploading[/] {task.description}"), BarColumn(),
                  DownloadColumn(), TransferSpeedColumn(), console=console,
                  disable=not show, transient=True) as bar:
        task = bar.add_task(os.path.basename(args.file), total=os.path.getsize(args.file))
        async with Client(args.url, _key(args)) as c:
            return await c.upload_content(args.file, name=args.name, capability=args.capability,
                                          from_version=args.from_version,
                                          to_version=args.to_version, content_type=args.type,
                                          progress=lambda n: bar.advance(task, n))


def _cmd_upload(args: argparse.Namespace) -> int:
    """``content upload``: 0 uploaded (the record printed as JSON), 1 the server refused
    it, 2 usage, a wrong key or no server."""
    import json
    try:
        if not os.path.isfile(args.file):
            raise _Usage(f"no such file: {args.file}")
        rec = asyncio.run(_upload(args))
    except _Usage as exc:
        print(f"dmengine content upload: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"dmengine content upload: "
              f"{'cannot reach the server' if exc.status == 0 else exc.status}: {exc}"
              + (f" [{exc.where}]" if exc.where else ""), file=sys.stderr)
        return 2 if exc.status in (0, 401) else 1
    print(json.dumps(to_builtins(rec), indent=2))
    return 0


def register_content_cli(subparsers: Any) -> argparse.ArgumentParser:
    """``dmengine content upload FILE`` (a firmware package to a running server)."""
    content = subparsers.add_parser("content", help="content (firmware packages) of a "
                                                    "running server")
    sub = content.add_subparsers(dest="content_cmd", required=True)
    p = sub.add_parser("upload", help="upload a package (sha256 and size checked)",
                       description="uploadContent: streams FILE with its sha256; prints the "
                                   "record (contentId, downloadUrl).")
    p.add_argument("file")
    p.add_argument("--name", help="default: the file's name")
    p.add_argument("--capability", help="the capability (oid) it is for")
    p.add_argument("--from", dest="from_version", help="firmware version it updates from")
    p.add_argument("--to", dest="to_version", help="firmware version it installs")
    p.add_argument("--type", help="media type devices get it with")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    _client_args(p)
    p.set_defaults(func=_cmd_upload)
    return content


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``devices import FILE`` (exit 0: every row taken, 1: some rejected, 2: usage
    error or the import did not run), ``devices get ID`` and ``devices list``."""
    devices = subparsers.add_parser("devices", help="device records of a running server")
    sub = devices.add_subparsers(dest="devices_cmd", required=True)
    g = sub.add_parser("get", help="one device (secrets shown as ***)",
                       description="getDeviceInstanceByDeviceID: ID is a DevId or a bare IMEI.")
    g.add_argument("ident", metavar="ID")
    _client_args(g)
    g.set_defaults(func=_cmd_get_or_list)
    ls = sub.add_parser("list", help="devices matching filters, one JSON object a line",
                        description="getDeviceInstances, every page: NDJSON on stdout.")
    for name in ("capability", "tac", "model", "firmware", "msisdn", "imei"):
        ls.add_argument(f"--{name}")
    ls.add_argument("--max", type=int, default=None, help="stop after this many devices")
    _client_args(ls)
    ls.set_defaults(func=_cmd_get_or_list)
    p = sub.add_parser("import", help="import device records from a CSV or NDJSON file",
                       description="Streams FILE to importDeviceInstances of a running server "
                                   "and prints what it did.  CSV: a header row naming the "
                                   "columns (devId, imei, msisdn, capability, tz, "
                                   "lastContact, serverId, authScheme, clientName, "
                                   "clientPassword, clientKey, clientNonce, "
                                   "serverPassword, serverKey, serverNonce, ./DevInfo/…, "
                                   "./DevDetail/…; the snake_case names dev_id, "
                                   "client_password… work too); NDJSON: one device object "
                                   "per line, in the same camelCase.  "
                                   "Exit status 0 when every row was taken, 1 when some "
                                   "were rejected, 2 when the import did not run.")
    p.add_argument("file")
    p.add_argument("--format", choices=("csv", "ndjson"), default=None,
                   help="default: by the file's extension")
    p.add_argument("--upsert", action="store_true",
                   help="replace devices that exist (default: reject their rows)")
    p.add_argument("--json", action="store_true", help="print the server's report as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    _client_args(p)
    p.set_defaults(func=_cmd_import)
    return devices
