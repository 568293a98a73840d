"""glibc malloc settings for the server process: keep big tensor buffers in the heap for reuse.

By default glibc serves an allocation above its mmap threshold with its own mmap and gives it back (munmap) when it
is freed, and trims the top of the heap past its trim threshold: a request's preprocessing and the networks'
activations (MBs each) are then mapped, page-faulted in and unmapped again on every request. With a fixed 32 MiB
mmap threshold (glibc's largest) and a 256 MiB trim threshold, as the Makefile exports for training
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), freed buffers stay in the heap and the next request reuses them;
two arenas bound the memory that the inference threads' own arenas would hold. The cost: the peak heap of a request
is kept after it, not returned to the system.

A variable already set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX) was
applied by glibc at start and is left as it is. Elsewhere than glibc (macOS, musl) this does nothing.

These are process-wide, so only the command that starts the server applies them (`metaseg serve`, through
`tune_server_process`), never an import: a test or a notebook that imports serve.main keeps its own allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_MiB = 2**20

# mallopt parameters (malloc.h) -> (value, the environment variable that sets the same at start)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = {
    M_MMAP_THRESHOLD: (32 * _MiB, "MALLOC_MMAP_THRESHOLD_"),
    M_TRIM_THRESHOLD: (256 * _MiB, "MALLOC_TRIM_THRESHOLD_"),
    M_ARENA_MAX: (2, "MALLOC_ARENA_MAX"),
}


def tune_malloc() -> dict[str, int]:
    """Apply SETTINGS with glibc's mallopt, except those the environment already set; returns what was set
    ({variable: value}), empty where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for param, (value, variable) in SETTINGS.items():
        if variable not in os.environ and mallopt(param, value) == 1:
            applied[variable] = value
    return applied


def tune_server_process() -> dict[str, int]:
    """tune_malloc for this process, and the same settings in its environment, which glibc applies at the start of
    the processes it starts (uvicorn's workers); returns what was set."""
    applied = tune_malloc()
    os.environ.update({variable: str(value) for variable, value in applied.items()})
    return applied


def in_effect() -> dict[str, str]:
    """The malloc variables of the environment: those glibc applied at start, or tune_server_process set."""
    return {variable: os.environ[variable] for _, variable in SETTINGS.values() if variable in os.environ}
