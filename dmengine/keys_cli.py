"""``dmengine keys create|list|revoke`` and ``dmengine users create|list|delete`` (L6).

These commands open the store directly (``--data DIR``: the ``serve`` data directory, its
store in ``DIR/store``), so they work whether the server runs or not: LMDB lets several
processes share the environment, and the server reads keys and users from the store on
every call, so a key made or revoked here counts at once.  (The same is in the API for
admins: ``createApiKey``, ``listApiKeys``, ``revokeApiKey``, ``createUser``.)  Each change
is written to the audit log as ``cli:<login name>``.

A new key is printed once, on stdout, and never again: the store keeps its SHA-256 only.
A generated password likewise.  Exit codes: 0 done, 1 refused (unknown key or user, a name
taken), 2 usage or store error.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import pathlib
import sys
from typing import Any, Awaitable, Callable

DEFAULT_DATA = "./var"


def _actor() -> str:
    try:
        who = getpass.getuser()
    except Exception:          # no login name (a container): the uid
        who = str(os.getuid())
    return f"cli:{who}"


def _open(data: str) -> Any:
    from .identity import Identities
    from .store.lmdb import LmdbStore
    path = pathlib.Path(data) / "store"
    if not (path / "data.mdb").is_file():
        from .errors import StoreError
        raise StoreError(f"no store at {str(path)!r} (give the serve data directory: --data)")
    store = LmdbStore(path)
    return store, Identities(store)


def _run(fn: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .errors import DmError, ServiceError, StoreError

        async def main() -> int:
            store, ids = _open(args.data)
            try:
                return await fn(ids, args)
            finally:
                await store.close()
        try:
            return asyncio.run(main())
        except ServiceError as exc:
            print(f"dmengine: {exc}", file=sys.stderr)
            return 1
        except StoreError as exc:
            from .errors import AlreadyExists, NotFound
            print(f"dmengine: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, (NotFound, AlreadyExists)) else 2
        except DmError as exc:
            print(f"dmengine: {exc}", file=sys.stderr)
            return 2
    return run


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


async def _keys_create(ids: Any, args: argparse.Namespace) -> int:
    from .identity import key_json
    key, secret = await ids.create_key(args.name, args.role, rate=args.rate, burst=args.burst,
                                       created_by=_actor())
    await ids.audit(_actor(), "createApiKey", target=f"/v1/keys/{key.key_id}", outcome="ok",
                    made={"keyId": key.key_id}, role=args.role, name=args.name)
    if args.json:
        print(json.dumps({**key_json(key), "apiKey": secret}))
    else:
        print(f"key id: {key.key_id}  system: {key.name}  role: {key.role}", file=sys.stderr)
        print("the key (shown this once; send it as X-API-Key):", file=sys.stderr)
        print(secret)
    return 0


async def _keys_list(ids: Any, args: argparse.Namespace) -> int:
    from .identity import key_json
    from .store.base import all_pages
    keys = [key_json(k) for k in await all_pages(lambda c: ids.list_keys(cursor=c))]
    if not args.all:
        keys = [k for k in keys if k["revoked"] is None]
    if args.json:
        print(json.dumps(keys))
    else:
        print(_table(keys, ["keyId", "name", "role", "rate", "burst", "createdBy", "revoked"]))
    return 0


async def _keys_revoke(ids: Any, args: argparse.Namespace) -> int:
    key = await ids.revoke_key(args.key_id, by=_actor())
    await ids.audit(_actor(), "revokeApiKey", target=f"/v1/keys/{key.key_id}", outcome="ok")
    print(f"revoked {key.key_id} ({key.name}, {key.role})", file=sys.stderr)
    return 0


async def _users_create(ids: Any, args: argparse.Namespace) -> int:
    from .identity import user_json
    password = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    user, generated = await ids.create_user(args.name, args.role, password=password,
                                            system=args.system or "", created_by=_actor())
    await ids.audit(_actor(), "createUser", target=f"/v1/users/{user.name}", outcome="ok",
                    role=args.role)
    if args.json:
        out = user_json(user)
        if generated is not None:
            out["password"] = generated
        print(json.dumps(out))
    else:
        print(f"user {user.name}  system: {user.system or user.name}  role: {user.role}",
              file=sys.stderr)
        if generated is not None:
            print("the password (shown this once):", file=sys.stderr)
            print(generated)
    return 0


async def _users_list(ids: Any, args: argparse.Namespace) -> int:
    from .identity import user_json
    from .store.base import all_pages
    users = [user_json(u) for u in await all_pages(lambda c: ids.list_users(cursor=c))]
    if args.json:
        print(json.dumps(users))
    else:
        print(_table(users, ["name", "role", "system", "rate", "burst", "createdBy"]))
    return 0


async def _users_delete(ids: Any, args: argparse.Namespace) -> int:
    await ids.delete_user(args.name)
    await ids.audit(_actor(), "deleteUser", target=f"/v1/users/{args.name}", outcome="ok")
    print(f"deleted user {args.name}", file=sys.stderr)
    return 0


def register_cli(subparsers: Any) -> None:
    """Adds ``keys {create,list,revoke}`` and ``users {create,list,delete}``."""
    from .model import ROLES

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=DEFAULT_DATA,
                       help=f"the serve data directory (default {DEFAULT_DATA}; its store: "
                            "DATA/store)")
        p.add_argument("--json", action="store_true", help="print JSON")

    keys = subparsers.add_parser("keys", help="API keys of external systems (on the store)")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", help="a new key for a system: printed once")
    c.add_argument("--name", required=True,
                   help="the external system (owner of the jobs and tasks its calls make)")
    c.add_argument("--role", required=True, choices=ROLES)
    c.add_argument("--rate", type=float, default=None,
                   help="requests per second (default: the server's --api-rate; 0: no limit)")
    c.add_argument("--burst", type=int, default=None, help="requests at once above the rate")
    common(c)
    c.set_defaults(func=_run(_keys_create))
    ls = ks.add_parser("list", help="the keys (never the keys themselves)")
    ls.add_argument("--all", action="store_true", help="revoked ones too")
    common(ls)
    ls.set_defaults(func=_run(_keys_list))
    r = ks.add_parser("revoke", help="revoke a key (and its userSessions) at once")
    r.add_argument("key_id")
    common(r)
    r.set_defaults(func=_run(_keys_revoke))

    users = subparsers.add_parser("users", help="users who log in with a password (on the store)")
    us = users.add_subparsers(dest="users_cmd", required=True)
    uc = us.add_parser("create", help="a new user; without --password-stdin a password is "
                                      "generated and printed once")
    uc.add_argument("name")
    uc.add_argument("--role", required=True, choices=ROLES)
    uc.add_argument("--system", help="whose jobs and tasks the user sees (default: the name)")
    uc.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin")
    common(uc)
    uc.set_defaults(func=_run(_users_create))
    ul = us.add_parser("list", help="the users (never their passwords)")
    common(ul)
    ul.set_defaults(func=_run(_users_list))
    ud = us.add_parser("delete", help="remove a user (its userSessions end at once)")
    ud.add_argument("name")
    common(ud)
    ud.set_defaults(func=_run(_users_delete))


__all__ = ["register_cli"]
