"""Route llama.cpp's log lines into Python logging, and capture them around calls that fail.

llama-cpp-python prints llama.cpp's errors to stderr (or hides them with ``verbose=False``),
so a failed load says only "Failed to load model from file". Capturing the lines logged
during a call lets velollm put the real reason into the exception it raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

logger = logging.getLogger("velollm.llama_cpp")
# ggml.h: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5 (llama-cpp-python's own _logger map is one off)
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_captures: list[tuple[int, list[str]]] = []  # (thread ident, lines) of each open capture
_lock = threading.Lock()
#: Held around every llama.cpp model load and every stderr redirection, process-wide. llama-cpp-python
#: swaps file descriptors 1 and 2 for /dev/null while it loads (``verbose=False``): two loads at once
#: restored them in the wrong order (the process's stdout stayed /dev/null), and loads at once are
#: where llama.cpp's global state is least tested. Loads are seconds; generation never takes it.
LOAD_LOCK = threading.RLock()
_callback = None  # kept referenced: ctypes callbacks must outlive their registration


def install() -> None:
    """Replace llama-cpp-python's stderr printer with :data:`logger` (idempotent)."""
    global _callback
    if _callback is not None:
        return
    import ctypes

    import llama_cpp

    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        py_level = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
        last[0] = py_level
        me = threading.get_ident()
        with _lock:
            for ident, lines in _captures:
                if ident == me:  # another thread's load logs its own lines, not ours
                    lines.append(message)
        if message.strip():
            logger.log(py_level, message.rstrip())

    if logger.level == logging.NOTSET:  # quiet by default, as llama-cpp-python's verbose=False is
        logger.setLevel(logging.ERROR)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _callback = callback


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect what llama.cpp logs on this thread inside the block (a load's own lines, never another's)."""
    install()
    entry: tuple[int, list[str]] = (threading.get_ident(), [])
    with _lock:
        _captures.append(entry)
    try:
        yield entry[1]
    finally:
        with _lock:  # by identity: two captures with equal lines are still two captures
            _captures[:] = [e for e in _captures if e is not entry]


def summary(lines: list[str], limit: int = 3) -> str:
    """The last few meaningful lines, joined for an error message."""
    meaningful = [ln.strip() for ln in "".join(lines).splitlines() if ln.strip()]
    errors = [ln for ln in meaningful if "error" in ln.lower() or "fail" in ln.lower()] or meaningful
    return "; ".join(errors[-limit:])


@contextlib.contextmanager
def capture_stderr_fd() -> Iterator[list[str]]:
    """Capture what C code writes straight to file descriptor 2 (llama.cpp's grammar parser does).

    Process-wide for the duration of the block: use it around one short native call only.
    """
    lines: list[str] = []
    sys.stderr.flush()
    with LOAD_LOCK, tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            lines.append(text)
            if text.strip():
                logger.debug(text.rstrip())
