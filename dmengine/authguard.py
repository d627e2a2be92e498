"""Brute-force protection of the device port (L3): failed authentications counted per account
and per peer address, with exponential backoff.

A session allows ``max_auth_attempts`` tries, but a new session gets as many again; without a
count that outlives sessions an attacker can guess a device's password at the port's full
rate.  ``AuthGuard`` keeps, per key (the SyncHdr Source a device claims, and the peer address
— an IPv6 peer by its /64), how many authentications failed recently.  From the ``free``-th
failure on, each failure blocks the key for ``base_delay * 2 ** (failures - free)`` seconds
(at most ``max_delay``); a blocked key's messages are answered 503 + Retry-After before any credential is looked at,
so guessing goes no faster than the backoff allows.  Failures older than ``window`` are
forgotten, and a success clears the account's count: the device's own sessions work again as
soon as the attacker stops and the current block runs out.

An address gets more free failures than an account: many phones share a carrier's NAT
address, and one misconfigured phone must not block the others.  Nor do devices that fail
once and then authenticate in the same session (a stale nonce, answered by the challenge's
new one): their failures are taken back from the address's count when they succeed.

Memory is bounded: at most ``max_keys`` keys per table; past that the oldest are dropped
(an attacker that cycles through more keys than that only loses his own history).  The
tables are kept in the order of their keys' last failure (``OrderedDict``), so the stale and
the oldest are at the front and dropping them costs O(1) per key: a sweep of the whole table
per new key, as before, cost milliseconds per failed authentication once an attacker had
filled it.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

__all__ = ["AuthGuard", "AuthGuardConfig"]


@dataclass
class AuthGuardConfig:
    account_free: int = 5              #: failures of one account before it must wait
    address_free: int = 500            #: failures from one address before it must wait
    base_delay: float = 1.0            #: seconds of the first block
    max_delay: float = 900.0           #: longest block
    window: float = 900.0              #: a key whose last failure is older starts afresh
    max_keys: int = 100_000            #: keys kept per table (accounts, addresses)


class _Count:
    __slots__ = ("failures", "last", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.last = 0.0
        self.until = 0.0


class AuthGuard:
    def __init__(self, config: AuthGuardConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or AuthGuardConfig()
        self.clock = clock
        # key -> its count, oldest last failure first (see the module docstring)
        self.accounts: OrderedDict[str, _Count] = OrderedDict()
        self.addresses: OrderedDict[str, _Count] = OrderedDict()

    def blocked(self, address: str | None, account: str | None) -> float:
        """Seconds until ``address`` and ``account`` may try again (0: now)."""
        if not self.accounts and not self.addresses:
            return 0.0                  # the common case: nobody failed lately
        now = self.clock()
        wait = 0.0
        for table, key in ((self.accounts, account), (self.addresses, address)):
            c = table.get(key) if key is not None else None
            if c is not None and c.until > now:
                wait = max(wait, c.until - now)
        return wait

    def failed(self, address: str | None, account: str | None) -> None:
        cfg = self.config
        now = self.clock()
        for table, key, free in ((self.accounts, account, cfg.account_free),
                                 (self.addresses, address, cfg.address_free)):
            if key is None:
                continue
            c = table.get(key)
            if c is None:
                self._prune(table, now)
                c = table[key] = _Count()
            else:
                table.move_to_end(key)          # its last failure is now: the newest
                if now - c.last > cfg.window:
                    c.failures = 0
            c.failures += 1
            c.last = now
            if c.failures >= free:
                c.until = now + min(cfg.max_delay,
                                    cfg.base_delay * 2.0 ** min(c.failures - free, 40))

    def succeeded(self, address: str | None, account: str | None, forgiven: int = 0) -> None:
        """The account proved itself: its count is cleared.  The address's count loses only
        the ``forgiven`` failures of the session that just succeeded (a device answering the
        challenge after a stale nonce): behind one NAT address a good device says nothing
        about the others."""
        if account is not None:
            self.accounts.pop(account, None)
        c = self.addresses.get(address) if address is not None and forgiven else None
        if c is not None:
            c.failures = max(0, c.failures - forgiven)
            if c.failures < self.config.address_free:
                c.until = 0.0

    def _prune(self, table: OrderedDict[str, _Count], now: float) -> None:
        """Drops, from the front (oldest last failure first), the keys whose failures are
        forgotten and, while the table is full, the oldest ones anyway."""
        window, full = self.config.window, self.config.max_keys
        while table:
            c = table[next(iter(table))]        # (an OrderedDict's first key: O(1))
            if len(table) >= full or (now - c.last > window and c.until <= now):
                table.popitem(last=False)
            else:
                break
