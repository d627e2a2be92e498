"""Outgoing URLs the engine calls on someone's word (L3): webhooks, the carrier callback of
acceptDevicePolicy 40, the HTTP package-0 gateway.

A URL a caller (or a configuration) names must not turn the server against the network it sits
in (SSRF): by default only ``http``/``https`` URLs whose host resolves to *global* addresses
only are accepted — no loopback, link-local (cloud metadata at 169.254.169.254), private,
shared (100.64/10), multicast, reserved or unspecified address, also not when wrapped in an
IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address.  Every address a name resolves to is checked
(one bad address refuses the URL).

The check runs twice: when the URL is given (:meth:`UrlGuard.check`, so a refusal names the
field) and again on every connection: :meth:`UrlGuard.session` hands out an aiohttp session
whose resolver checks the addresses it is about to connect to, so a name that resolved to a
public address when the URL was accepted and to ``127.0.0.1`` later (DNS rebinding) is refused
at delivery — the addresses checked are the ones connected to.  Redirects are never followed
by those sessions' users (a 3xx to an inner address would be the same hole).

``allow_private=True`` (``dmengine serve --allow-private-callbacks``) turns the address check
off — for tests and a single-machine ``make run`` — and ``allow_networks`` admits named
networks only (an SMS centre on the operator's own network, say).
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .errors import DmError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``resolve(host, port) -> [address, …]`` (tests inject their own DNS)
Resolve = Callable[[str, int], Awaitable[list[str]]]

SCHEMES = ("http", "https")
MAX_URL = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNSET = object()


class UrlRefused(DmError):
    """A URL the guard does not allow; the message says why (no secret in it)."""


def address_problem(addr: str | IPAddress) -> str | None:
    """Why ``addr`` is not a public address (``"loopback"``, ``"private"``, …), or None."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0]) if isinstance(addr, str) else addr
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            why = address_problem(inner)
            return f"{why} (inside {ip})" if why else None
    for attr, why in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                      ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                      ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return why
    if not ip.is_global:
        return "not globally routable"
    return None


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass
class UrlGuard:
    """The allow-list of outgoing URLs (see the module docstring)."""

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()
    resolve: Resolve = field(default=_system_resolve, repr=False)
    resolve_timeout: float = 5.0
    _literal_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, allow_private: bool = False,
                    allow_networks: Iterable[str] = ()) -> "UrlGuard":
        nets = []
        for n in allow_networks:
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except ValueError as exc:
                from .errors import ConfigError
                raise ConfigError(f"not a network: {n!r} ({exc})",
                                  key="callback_allow_networks") from None
        return cls(allow_private=allow_private, allow_networks=tuple(nets))

    # --- the checks -----------------------------------------------------------------------

    def address_allowed(self, addr: str) -> str | None:
        """None when the guard lets ``addr`` be connected to, else why not."""
        if self.allow_private:
            return None
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        if any(ip in n for n in self.allow_networks):
            return None
        return address_problem(ip)

    @staticmethod
    def split(url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an acceptable URL's form; raises :class:`UrlRefused`."""
        if not isinstance(url, str) or not url or len(url) > MAX_URL:
            raise UrlRefused(f"a URL of 1..{MAX_URL} characters is needed")
        if any(c.isspace() or ord(c) < 32 for c in url):
            raise UrlRefused("the URL contains white space or control characters")
        try:
            u = urlsplit(url)
            port = u.port
        except ValueError as exc:
            raise UrlRefused(f"not a URL: {exc}") from None
        scheme = u.scheme.lower()
        if scheme not in SCHEMES:
            raise UrlRefused(f"the URL's scheme must be http or https, not {u.scheme!r}")
        host = u.hostname
        if not host:
            raise UrlRefused("the URL names no host")
        return scheme, host, port or (443 if scheme == "https" else 80)

    async def addresses(self, host: str, port: int) -> list[str]:
        """Every address ``host`` stands for, each checked; raises :class:`UrlRefused`."""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            addrs = [host]
        except ValueError:
            try:
                async with asyncio.timeout(self.resolve_timeout):
                    addrs = await self.resolve(host, port)
            except TimeoutError:
                raise UrlRefused(f"the host {host!r} did not resolve within "
                                 f"{self.resolve_timeout:g} s") from None
            except (OSError, UnicodeError) as exc:
                raise UrlRefused(f"the host {host!r} does not resolve: {exc}") from None
            if not addrs:
                raise UrlRefused(f"the host {host!r} does not resolve")
        for a in addrs:
            why = self.address_allowed(a)
            if why is not None:
                raise UrlRefused(f"the host {host!r} is (or resolves to) a {why} address "
                                 f"({a}); such targets need the allow-private setting")
        return addrs

    def check_literal(self, url: str) -> None:
        """The delivery-time check of a URL whose host is an IP literal (a connection to one
        never asks the resolver, so :meth:`connector` cannot see it); names pass here and
        are checked by the resolver when connecting."""
        key = (url, self.allow_private, self.allow_networks)
        why = self._literal_cache.get(key, _UNSET)
        if why is _UNSET:
            _, host, _ = self.split(url)
            try:
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                why = None                   # a name: the resolver checks it
            else:
                why = self.address_allowed(host)
                why = f"{host} is a {why} address" if why is not None else None
            if len(self._literal_cache) > 10_000:
                self._literal_cache.clear()
            self._literal_cache[key] = why
        if why is not None:
            raise UrlRefused(str(why))

    async def check(self, url: str) -> str:
        """The URL if it may be called now (form and every resolved address); else
        :class:`UrlRefused` saying why."""
        _, host, port = self.split(url)
        await self.addresses(host, port)
        return url

    # --- connections ------------------------------------------------------------------------

    def connector(self, **kw: Any) -> aiohttp.TCPConnector:
        """A connector whose DNS answers pass the guard (the rebinding check at connect
        time).  An IP-literal host never reaches a resolver: :meth:`check` it first."""
        return aiohttp.TCPConnector(resolver=_GuardedResolver(self), **kw)

    def session(self, **kw: Any) -> aiohttp.ClientSession:
        """An aiohttp session over :meth:`connector` (no environment proxies)."""
        connector = kw.pop("connector", None) or self.connector()
        return aiohttp.ClientSession(connector=connector, trust_env=False, **kw)


class _GuardedResolver(AbstractResolver):
    """The system resolver, then the guard on every answer (any refused: no connection)."""

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            addrs = await self.guard.addresses(host, port)
        except UrlRefused as exc:
            # (errno, text): aiohttp shows the strerror in its connector error
            raise OSError(errno.EACCES, f"refused: {exc}") from None
        out: list[ResolveResult] = []
        for a in addrs:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            out.append(ResolveResult(hostname=host, host=a.split("%", 1)[0], port=port,
                                     family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not out:
            raise OSError(errno.EADDRNOTAVAIL, f"no usable address for {host!r}")
        return out

    async def close(self) -> None:
        pass


__all__ = ["UrlGuard", "UrlRefused", "address_problem", "SCHEMES", "MAX_URL"]
