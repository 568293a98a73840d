"""Inference threads and the bounded queue in front of them.

A request asks for a thread only once its body has fully arrived (serve.uploads), so a slow upload never holds
one. It then waits its turn: behind at most `queue_limit` others and for at most `queue_timeout_s`, else 503 +
Retry-After. A thread stays taken until its work returns, even when the client has gone, so that `size` is a
true bound on concurrent decodes; the work itself checks its time limits between frames and between batches.

The engine (the bundle's preprocessing, the fold models' forwards, the inverse back to the input size) runs on one
dedicated thread (`on_model_thread`), whichever pool thread asks: torch's per-thread state (its OpenMP team,
oneDNN's primitive cache) is then made once and stays warm, the caches hold one thread's buffers, and two requests
never run two forwards at once on the same cores (two OpenMP teams of a thread per core each). Decoding, findings
and encoding stay on the pool threads, beside the other request's model work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import torch

T = TypeVar("T")

RETRY_AFTER_S = 2  # one request takes well under a second on a CPU; let the queue drain a little


_MODEL_THREAD_NAME = "metaseg-model"
_model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_MODEL_THREAD_NAME)  # one per process


def on_model_thread(func: Callable[..., T], *args) -> T:
    """`func(*args)` on the process's model thread, blocking the caller until it returns (or raises); called from the
    model thread itself it runs at once. Work queues there in the order it is asked for."""
    if threading.current_thread().name.startswith(_MODEL_THREAD_NAME):
        return func(*args)
    return _model_executor.submit(func, *args).result()


def set_torch_threads(count: int | None) -> int:
    """Set torch's intra-op thread count (process-wide) from the model thread, where its OpenMP team lives, and
    return the count in force; `count` None keeps torch's default (one per core)."""

    def apply() -> int:
        if count is not None:
            torch.set_num_threads(count)
        return torch.get_num_threads()

    return on_model_thread(apply)


class Busy(Exception):
    """The server cannot take the request now (queue full, waited too long, too many bodies in memory) or finish it
    in time (inference past its deadline); the message says which, and the client should retry later."""


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
