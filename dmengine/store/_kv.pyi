"""Stub for the Cython module dmengine/store/_kv.pyx (the store's write hot path)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..model import Task, TaskState


class WriteBuffer:
    t: Any
    d: dict[str, Any]
    over: dict[str, dict[bytes, bytes | None]]
    pre: dict[str, dict[bytes, bytes | None]]
    writes: int
    watch: frozenset[str]
    touched: list[tuple[str, bytes]]

    def __init__(self, txn: Any, dbs: dict[str, Any], watch: frozenset[str] = ...) -> None: ...
    def prefetch(self, wanted: dict[str, list[bytes]]) -> None: ...
    def get(self, db: str, key: bytes) -> bytes | None: ...
    def get_many(self, db: str, keys: list[bytes]) -> dict[bytes, bytes]: ...
    def count(self, db: str) -> int: ...
    def put(self, db: str, key: bytes, value: bytes) -> None: ...
    def delete(self, db: str, key: bytes) -> bool: ...
    def scan(self, db: str, start: bytes, end: bytes | None) -> Iterator[tuple[bytes, bytes]]: ...
    def flush(self) -> None: ...


def check_transition_args(to_state: Any, cause: Any, dm_status: Any,
                          result_code: Any) -> TaskState: ...


class Transition:
    key: bytes
    task_id: str

    def __init__(self, task_id: str, to_state: TaskState, cause: str | None = None,
                 dm_status: int | None = None, result_code: int | None = None,
                 expect_state: TaskState | None = None, next_attempt: Any = ...,
                 attempts: int | None = None) -> None: ...
    def __call__(self, ctx: Any) -> Task: ...


KEEP: object


def collect_prefetch(batch: list[tuple[Any, Any, Any, Any]],
                     errors: dict[int, BaseException]) -> dict[str, list[bytes]]: ...
def run_ops(batch: list[tuple[Any, Any, Any, Any]], ctx: Any, results: list[Any],
            errors: dict[int, BaseException], passthrough: tuple[type[BaseException], ...],
            lmdb_error: type[BaseException], store_error: type[BaseException]) -> str | None: ...
def resolve(futs: list[Any], results: list[Any], errors: dict[int, BaseException]) -> None: ...
def split_by_loop(batch: list[tuple[Any, Any, Any, Any]], results: list[Any],
                  errors: dict[int, BaseException]
                  ) -> list[tuple[Any, list[Any], list[Any], dict[int, BaseException]]]: ...
def import_row(i: int, dev: Any, data: bytes
               ) -> tuple[int, bytes, bytes | None, bytes | None, bytes | None, bytes]: ...
def import_chunk(ctx: Any, rows: list[tuple[Any, ...]], replace: bool, on_replace: Any
                 ) -> tuple[int, int, list[tuple[int, str | None, str]]]: ...
