"""A service loop that must not die silently (L3): the bookkeeping the scheduler and the
webhook dispatcher share.

A pass that raises is logged, counted and tried again by the loop (CancelledError is not an
Exception: cancelling still stops it); :meth:`Supervision.health` tells ``/health`` when the
loop is gone or its passes keep failing.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Coroutine

__all__ = ["Supervision", "FAILED_PASSES_UNHEALTHY"]

#: failed passes in a row after which health() reports the loop
FAILED_PASSES_UNHEALTHY = 3


class Supervision:
    """One loop's task and pass record; ``what`` names it in logs and health."""

    def __init__(self, what: str, clock: Callable[[], float], log: logging.Logger) -> None:
        self.what = what
        self.clock = clock
        self.log = log
        self.task: asyncio.Task[None] | None = None
        self.failed_passes = 0                 # passes failed in a row
        self.last_error: str | None = None
        self.last_pass: float | None = None

    async def run_pass(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """One pass: its result, or None when it failed (logged and counted)."""
        try:
            result = await step()
        except Exception as exc:
            self.log.exception("%s pass failed", self.what)
            self.failed_passes += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            result = None
        else:
            self.failed_passes = 0
            self.last_error = None
        self.last_pass = self.clock()
        return result

    def start(self, run: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Starts ``run()`` as the loop's task unless it runs already (False then)."""
        if self.task is not None:
            return False
        self.task = asyncio.get_running_loop().create_task(run())
        return True

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    def health(self) -> list[str]:
        """What is wrong with the loop (empty when nothing is)."""
        problems = []
        task = self.task
        if task is None:
            problems.append(f"{self.what} not started")
        elif task.done():
            why = "cancelled" if task.cancelled() else repr(task.exception())
            problems.append(f"{self.what} loop ended: {why}")
        if self.failed_passes >= FAILED_PASSES_UNHEALTHY:
            problems.append(f"{self.what}: {self.failed_passes} passes failed in a row "
                            f"(last: {self.last_error})")
        return problems
