"""Inference threads and the bounded queue in front of them.

A request asks for a thread only once its body has fully arrived (serve.uploads), so a slow upload never holds
one. It then waits its turn: behind at most `queue_limit` others and for at most `queue_timeout_s`, else 503 +
Retry-After. A thread stays taken until its work returns, even when the client has gone, so that `size` is a
true bound on concurrent decodes; the work itself checks its time limits between frames and between batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")

RETRY_AFTER_S = 2  # one request takes well under a second on a CPU; let the queue drain a little


class Busy(Exception):
    """The server cannot take the request now (queue full, waited too long, too many bodies in memory);
    the message says which, and the client should retry later."""


class InferencePool:
    def __init__(self, size: int, queue_limit: int, queue_timeout_s: float):
        self.size, self.queue_limit, self.queue_timeout_s = size, queue_limit, queue_timeout_s
        self.capacity = size + queue_limit
        self.running = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(size)  # FIFO: requests get threads in the order they asked
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="metaseg-inference")

    @property
    def admitted(self) -> int:
        """Requests running or waiting for a thread."""
        return self.running + self.waiting

    async def run(self, func: Callable[..., T], *args) -> T:
        """Run blocking work (decode, inference, encoding) on a pool thread once one is free, keeping the event
        loop free. Only the event loop thread touches the counters, so they need no lock."""
        if self._free.locked() and self.waiting >= self.queue_limit:
            raise Busy(f"all {self.size} inference threads are busy and {self.waiting} requests are waiting")
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await self._free.acquire()
        except TimeoutError:
            raise Busy(f"no inference thread became free within {self.queue_timeout_s:g} s") from None
        finally:
            self.waiting -= 1
        self.running += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, partial(func, *args))
        future.add_done_callback(self._release)
        return await asyncio.shield(future)  # a cancelled request leaves its thread to finish, then frees it

    def _release(self, _) -> None:
        self.running -= 1
        self._free.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
