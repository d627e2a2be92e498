"""Store administration (L3): backup, restore, check — as functions and as CLI sub-commands.

``register_cli(subparsers)`` adds ``store backup PATH``, ``store restore PATH`` and
``store check`` to an argparse sub-parsers object; each takes ``--data DIR`` (the
environment, default ``./var/store``).  ``check`` prints every problem and exits 1 if there
is any; every command exits 2 on an error it can name (``restore`` among them while a
server has the store open).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from typing import Any

import lmdb

from ..errors import StoreError
from .kv import check_txn
from .lmdb import IN_USE_FILE, LmdbTxn, open_dbs, open_env, try_lock_in_use

DEFAULT_DATA_DIR = "./var/store"
DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"


def _require_env(path: str | os.PathLike[str]) -> pathlib.Path:
    p = pathlib.Path(path)
    if not (p / DATA_FILE).is_file():
        raise StoreError(f"no LMDB environment at {str(p)!r} (no {DATA_FILE})")
    return p


def check(path: str | os.PathLike[str], *, max_problems: int = 1000) -> list[str]:
    """Walks every index of the environment at ``path`` against its records (one read
    transaction; safe while a server is writing).  Returns the problems, empty when sound."""
    p = _require_env(path)
    env = open_env(p, map_size=os.path.getsize(p / DATA_FILE) or 1 << 20)
    try:
        dbs = open_dbs(env, create=False)
        with env.begin() as txn:
            return check_txn(LmdbTxn(txn, dbs), max_problems=max_problems)
    finally:
        env.close()


def backup(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> pathlib.Path:
    """Online, compacting copy of the environment at ``path`` into the directory ``dest``
    (created; must not hold a data file).  Writers may keep writing meanwhile: the copy is one
    consistent read snapshot.  Returns the backup's data file."""
    p = _require_env(path)
    d = pathlib.Path(dest)
    if (d / DATA_FILE).exists():
        raise StoreError(f"backup target {str(d)!r} already holds {DATA_FILE}")
    d.mkdir(parents=True, exist_ok=True)
    env = open_env(p, map_size=os.path.getsize(p / DATA_FILE) or 1 << 20)
    try:
        env.copy(str(d), compact=True)
    except lmdb.Error as exc:
        raise StoreError(f"backup of {str(p)!r} to {str(d)!r} failed: {exc}") from exc
    finally:
        env.close()
    return d / DATA_FILE


def restore(backup_dir: str | os.PathLike[str], path: str | os.PathLike[str], *,
            force: bool = False) -> pathlib.Path:
    """Puts the backup in ``backup_dir`` in place as the environment at ``path``.

    The backup is checked first (a broken one is refused).  An existing environment is
    replaced only with ``force``, and never while a store has it open: restore takes the
    in-use lock every open store shares (``store/lmdb.py``, ``IN_USE_FILE``) exclusively,
    without waiting, and refuses when it cannot (stop the server first); it holds the lock
    until done, so no server opens the environment half replaced.  The data file is written to
    a temporary name, synced, then renamed, so a crash leaves either the old or the new
    environment."""
    src = _require_env(backup_dir)
    problems = check(src)
    if problems:
        raise StoreError(f"backup {str(src)!r} fails its check: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    dst = pathlib.Path(path)
    if (dst / DATA_FILE).exists() and not force:
        raise StoreError(f"{str(dst)!r} already holds an environment (use --force to replace it)")
    dst.mkdir(parents=True, exist_ok=True)
    in_use = try_lock_in_use(dst, exclusive=True)
    if in_use is None:
        raise StoreError(f"store {str(dst)!r} is in use: a process (a running server) has it "
                         f"open ({IN_USE_FILE} is locked); stop the server before restoring")
    try:
        _put_in_place(src, dst)
    finally:
        os.close(in_use)
    return dst / DATA_FILE


def _put_in_place(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies the backup's data file over ``dst``'s (the caller holds the in-use lock)."""
    tmp = dst / (DATA_FILE + ".restore")
    with open(src / DATA_FILE, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    lock = dst / LOCK_FILE
    if lock.exists():
        lock.unlink()        # reader table of the old environment; LMDB recreates it
    os.replace(tmp, dst / DATA_FILE)
    dfd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- CLI -----------------------------------------------------------------------------------


def _cmd_backup(args: argparse.Namespace) -> int:
    out = backup(args.data, args.path)
    print(f"backup written: {out} ({out.stat().st_size} bytes)")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    out = restore(args.path, args.data, force=args.force)
    print(f"restored: {out}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    problems = check(args.data, max_problems=args.max_problems)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.data}", file=sys.stderr)
        return 1
    print(f"store {args.data}: ok")
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``store {backup,restore,check}``; each sub-command sets ``func(args) -> exit code``."""
    store = subparsers.add_parser("store", help="store administration: backup, restore, check")
    sub = store.add_subparsers(dest="store_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=DEFAULT_DATA_DIR,
                       help=f"LMDB environment directory (default {DEFAULT_DATA_DIR})")

    b = sub.add_parser("backup", help="online compacting copy of the store into PATH")
    b.add_argument("path", help="directory for the backup (created)")
    common(b)
    b.set_defaults(func=_guard(_cmd_backup))
    r = sub.add_parser("restore", help="replace the store with the backup in PATH (server stopped)")
    r.add_argument("path", help="backup directory")
    r.add_argument("--force", action="store_true", help="replace an existing store")
    common(r)
    r.set_defaults(func=_guard(_cmd_restore))
    c = sub.add_parser("check", help="walk every index against its records; exit 1 on problems")
    c.add_argument("--max-problems", type=int, default=1000)
    common(c)
    c.set_defaults(func=_guard(_cmd_check))
    return store


def main(argv: list[str] | None = None) -> int:
    """``python -m dmengine.store.admin store check --data DIR`` (until cli.py wires it)."""
    ap = argparse.ArgumentParser(prog="dmengine")
    register_cli(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["check", "backup", "restore", "register_cli", "main", "DEFAULT_DATA_DIR"]
