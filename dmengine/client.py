"""A small Python client of the dmengine API (L6) and the ``dmengine devices …`` commands.

::

    async with Client("http://127.0.0.1:8081", api_key) as c:
        report = await c.import_devices("devices.csv")
        dev = await c.get_device("356938035643809")          # a DevId or a bare IMEI
        async for dev in c.iter_devices(capability="cap-ex100", firmware="2.3.9"):
            ...

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
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import quote

import aiohttp

__all__ = ["Client", "ClientError", "DEFAULT_API_URL", "DEFAULT_API_KEY_FILE", "read_api_key",
           "import_format_of", "register_cli"]

DEFAULT_API_URL = "http://127.0.0.1:8081"
DEFAULT_API_KEY_FILE = "var/api-key"
MEDIA_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}
READ_BLOCK = 1 << 20


class ClientError(Exception):
    """The API refused a request (``status`` ≥ 400) or could not be reached (``status`` 0)."""

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


class Client:
    """The API over aiohttp; one connection pool per client (``async with`` or ``close``)."""

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

    async def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                      json: Any = None, data: Any = None,
                      headers: dict[str, str] | None = None) -> Any:
        """One call: the decoded JSON answer (None for 204); ClientError for an API error."""
        q = {k: ("true" if v is True else "false" if v is False else str(v))
             for k, v in (params or {}).items() if v is not None}
        try:
            async with self._http().request(method, self.url + path.lstrip("/"), params=q,
                                            json=json, data=data, headers=headers,
                                            ssl=self._ssl) as r:
                if r.status == 204:
                    return None
                try:
                    body = await r.json(content_type=None)
                except ValueError:
                    body = None
                if r.status >= 400:
                    if isinstance(body, dict) and "error" in body:
                        raise ClientError(r.status, body["error"], body.get("message", ""),
                                          body.get("where"))
                    raise ClientError(r.status, f"http_{r.status}", r.reason or "")
                return body
        except aiohttp.ClientError as exc:
            raise ClientError(0, "unreachable", f"{self.url}: {exc}") from None

    # --- devices (IDeviceManagerServices) ------------------------------------------------------

    async def import_devices(self, source: str | os.PathLike[str] | Iterable[bytes], *,
                             format: str | None = None, upsert: bool = False,
                             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """importDeviceInstances: streams a file (or an iterable of byte blocks) to the API.
        ``progress(n)`` is called with the bytes of each block sent.  Returns the report
        (``rows``, ``created``, ``replaced``, ``rejected``, ``errors``, ``errorsOmitted``)."""
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
        return await self.request("POST", "v1/devices/import", params={"upsert": upsert},
                                  data=body(), headers={"Content-Type": MEDIA_TYPES[fmt]})

    # --- content -------------------------------------------------------------------------

    async def upload_content(self, path: str | os.PathLike[str], *, name: str | None = None,
                             capability: str | None = None, from_version: str | None = None,
                             to_version: str | None = None,
                             content_type: str | None = None,
                             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """uploadContent: streams the file with its sha256 and size, which the server checks
        (a file that changes while it is sent is refused, 422).  Returns the record."""
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
        return await self.request("POST", "v1/content", params=params, data=body(),
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(size)})

    async def create_device(self, device: dict[str, Any]) -> dict[str, Any]:
        """createDeviceInstance: ``device`` in the API's names (``devId``, ``imei``,
        ``msisdn``, ``account: {serverId, clientName, clientPassword…}``)."""
        return await self.request("POST", "v1/devices", json=device)

    async def get_device(self, ident: str) -> dict[str, Any]:
        """getDeviceInstanceByDeviceID: ``ident`` is a DevId or a bare IMEI (15 digits)."""
        return await self.request("GET", f"v1/devices/{quote(ident, safe=':@+=')}")

    async def update_device(self, ident: str, changes: dict[str, Any]) -> dict[str, Any]:
        """updateDeviceInstance: a merge-patch in the API's names (None removes a field;
        ``account`` merges)."""
        return await self.request("PATCH", f"v1/devices/{quote(ident, safe=':@+=')}",
                                  json=changes)

    async def delete_device(self, ident: str) -> None:
        await self.request("DELETE", f"v1/devices/{quote(ident, safe=':@+=')}")

    async def find_devices(self, *, cursor: str | None = None, limit: int | None = None,
                           **filters: Any) -> dict[str, Any]:
        """One page of getDeviceInstances: ``{"items": [...], "nextCursor": ...}``.  Filters:
        msisdn, imei, capability, tac, model, firmware, lastContactAfter/lastContactBefore
        (snake_case names are passed in the API's camelCase)."""
        filters = {_camel(k): v for k, v in filters.items()}
        return await self.request("GET", "v1/devices",
                                  params={**filters, "cursor": cursor, "limit": limit})

    async def iter_devices(self, *, limit: int | None = 1000,
                           **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """Every device the filters select, page after page."""
        cursor = None
        while True:
            page = await self.find_devices(cursor=cursor, limit=limit, **filters)
            for d in page["items"]:
                yield d
            cursor = page["nextCursor"]
            if cursor is None:
                return


class SyncClient:
    """The same calls as :class:`Client`, blocking: for scripts and notebooks.  The async
    client runs on an event loop of its own in a background thread (so it also works where a
    loop is already running); ``close()`` (or ``with``) stops it.

    Every coroutine method of Client is a plain method here::

        with SyncClient("http://127.0.0.1:8081", key) as c:
            c.get_device("IMEI:356938035643809")
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

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr
        return lambda *a, **kw: self._run(attr(*a, **kw))

    def iter_devices(self, **kw: Any) -> Iterable[dict[str, Any]]:
        """Every device the filters select (pages fetched as the iteration goes)."""
        agen = self._client.iter_devices(**kw)
        while True:
            try:
                yield self._run(agen.__anext__())
            except StopAsyncIteration:
                return

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
                   help=f"API key (default: $DMENGINE_API_KEY, else the file --api-key-file)")
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


def print_report(report: dict[str, Any], *, show: int = 20, file: Any = None) -> None:
    out = file or sys.stdout
    print(f"rows {report.get('rows', 0)}: created {report['created']}, replaced "
          f"{report['replaced']}, rejected {report['rejected']}", file=out)
    errors = report.get("errors") or []
    for e in errors[:show]:
        where = f" [{e['where']}]" if e.get("where") else ""
        print(f"  line {e['line']}{where}: {e['message']}", file=out)
    more = report["rejected"] - min(show, len(errors))
    if more > 0:
        print(f"  … and {more} more rejected row(s)"
              + (" (--json lists the first 1000)" if len(errors) > show else ""), file=out)


async def _import(args: argparse.Namespace) -> dict[str, Any]:
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
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 1 if report["rejected"] else 0


async def _get_or_list(args: argparse.Namespace) -> int:
    import json
    async with Client(args.url, _key(args)) as c:
        if args.devices_cmd == "get":
            print(json.dumps(await c.get_device(args.ident), indent=2))
            return 0
        filters = {k: v for k in ("capability", "tac", "model", "firmware", "msisdn", "imei")
                   if (v := getattr(args, k)) is not None}
        n = 0
        async for d in c.iter_devices(**filters):
            print(json.dumps(d))                # one device a line (NDJSON, as import takes)
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


async def _upload(args: argparse.Namespace) -> dict[str, Any]:
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
    print(json.dumps(rec, indent=2))
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
