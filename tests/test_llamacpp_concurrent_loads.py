"""Two llama.cpp models loading at once both load, and a failed load reports its own log lines.

Before: the log capture removed its list by equality, so two loads whose captured lines were equal
(both capturing everything) removed each other's list, and the second ``list.remove`` raised
ValueError inside the load, reported as "could not load gemma-3-270m ... control token 105 is not
marked as EOG" (the other load's log line); 2-4 of 8 rounds failed here. And llama-cpp-python's
stdout/stderr swap during loads, interleaved, left the process's stdout on /dev/null.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from velollm.engine import LoadOptions
from velollm.plugins.llamacpp import log as llamacpp_log


def _run_together(*targets: object) -> list[BaseException]:
    """Run the callables in threads that start together; the exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def run(target: object) -> None:
        try:
            barrier.wait(30)
            target()  # type: ignore[operator]
        except BaseException as exc:  # collected and re-raised by the caller: a thread cannot fail a test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return errors


def test_captures_on_two_threads_keep_their_own_lines() -> None:
    llamacpp_log.install()
    got: dict[str, list[str]] = {}

    def log_on_this_thread(name: str) -> None:
        with llamacpp_log.capture() as lines:
            for i in range(200):
                llamacpp_log._callback(3, f"{name} {i}\n".encode(), None)  # type: ignore[misc]
        got[name] = lines

    errors = _run_together(lambda: log_on_this_thread("a"), lambda: log_on_this_thread("b"))
    if errors:
        raise errors[0]
    assert got["a"] == [f"a {i}\n" for i in range(200)]
    assert got["b"] == [f"b {i}\n" for i in range(200)]
    assert not llamacpp_log._captures


def test_equal_captures_on_two_threads_are_both_removed() -> None:
    """Both empty (equal) lists: removal by equality raised ValueError in the second one."""
    inner = threading.Barrier(2)

    def empty_capture() -> None:
        with llamacpp_log.capture():
            inner.wait(10)

    errors = _run_together(empty_capture, empty_capture)
    if errors:
        raise errors[0]
    assert not llamacpp_log._captures


@pytest.mark.slow
def test_gemma_and_qwen_load_at_the_same_time(gemma_path: Path, qwen_path: Path) -> None:
    from velollm.plugins.llamacpp import LlamaCppBackend

    stdout = os.fstat(1)
    engines: list[Any] = []

    def load(path: Path) -> None:
        engines.append(LlamaCppBackend("cpu").load(path, LoadOptions(n_ctx=256, n_threads=1)))

    for _ in range(3):
        engines.clear()
        errors = _run_together(lambda: load(gemma_path), lambda: load(qwen_path))
        for engine in engines:
            engine.close()
        if errors:
            raise errors[0]
        assert len(engines) == 2
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (stdout.st_dev, stdout.st_ino), "stdout was left redirected"
