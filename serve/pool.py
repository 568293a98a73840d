"""A bounded place for inference: N threads and a fixed number of waiting requests, then 503.

Requests are admitted before their body is read, so memory is bounded by (pool_size + queue_limit) uploads
of at most max_upload_bytes each, plus the decoded slices of the pool_size requests that are running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

T = TypeVar("T")

RETRY_AFTER_S = 2  # one request takes well under a second on a CPU; let the queue drain a little


class PoolSaturated(Exception):
    """Every thread is busy and the queue is full; the client should retry later."""


class InferencePool:
    def __init__(self, size: int, queue_limit: int):
        self.size = size
        self.capacity = size + queue_limit
        self.admitted = 0
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="metaseg-inference")

    @asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Hold one of `capacity` places for the duration of a request, or raise PoolSaturated.

        Only the event loop thread touches the counter, so it needs no lock.
        """
        if self.admitted >= self.capacity:
            raise PoolSaturated
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, func: Callable[..., T], *args) -> T:
        """Run blocking work (decode, inference, encoding) on a pool thread, keeping the event loop free."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(func, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
