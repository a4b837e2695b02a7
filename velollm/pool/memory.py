"""Giving memory back to the OS after an unload."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_heap() -> None:
    """Give freed heap back to the OS after an unload.

    glibc keeps the hundreds of MB an engine freed (compute buffers, KV cache) in its arenas, so
    RSS stays high after an unload although the memory is free; measured here: 184 MB before,
    78 MB after trimming, with Gemma 270M unloaded.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
