"""How many threads each ``llama_decode`` gets: measured, not assumed.

llama.cpp's CPU workers meet at a barrier after every node of the graph (hundreds per step). With
libgomp waiting passively (a futex sleep at each barrier) two threads on the 2-core machine were
slower than one; with a short spin (:mod:`.openmp`) they are ~1.4x faster than one while the machine
is idle, and several times slower when another process holds a core, because the thread a barrier
waits for sits out a time slice. No fixed count is right for both, so the tuner measures.
"""

from __future__ import annotations

from collections.abc import Callable


class ThreadTuner:
    """Chooses llama.cpp's thread count from measured step costs, and keeps checking.

    When any core is busy with something else (DSPy's own threads formatting and parsing, the
    server's event loop, a neighbour process) a step with as many threads as cores stalls on the
    descheduled one (a 2-core machine with a busy neighbour: 66 s for 24 tokens at 2 threads, 3.8 s
    at 1). So the decoder measures seconds per token at each candidate count, runs the cheapest,
    and every ``explore_every`` steps tries the others for a few steps, because the load changes.
    """

    def __init__(self, n_threads: int, *, explore_every: int = 96, explore_steps: int = 1) -> None:
        self.choices = sorted({n_threads, max(1, n_threads // 2), 1}, reverse=True)
        self.cost: dict[int, float] = {}  # EMA of seconds per token (+ a fixed per-step share)
        self.current = self.choices[-1]  # start low: too few threads cost < 2x, too many on a busy machine 10x
        self.applied = n_threads  # what the context is set to now (it was created with n_threads)
        self.explore_every, self.explore_steps = explore_every, explore_steps
        self._step = 0
        self._trying: list[int] = []
        self._seen: dict[int, int] = {}  # thread count -> the step it was last measured at
        self._next_explore = explore_every

    def next(self) -> int:
        """The thread count for the next step."""
        self._step += 1
        if len(self.choices) == 1:
            return self.current
        if not self._trying and (self._step >= self._next_explore or
                                 (self._step >= 2 and len(self.cost) < len(self.choices))):
            best = self.best()
            self._trying = [c for c in self.choices if c != best for _ in range(self.explore_steps)]
            # an option far worse than the best is retried less often (each retry is expensive)
            worst = max((self.cost.get(c, 0.0) for c in self.choices), default=0.0)
            ratio = worst / self.cost[best] if self.cost.get(best) else 1.0
            self._next_explore = self._step + int(self.explore_every * min(max(ratio, 1.0), 16.0))
        self.current = self._trying.pop(0) if self._trying else self.best()
        return self.current

    def best(self) -> int:
        measured = {c: v for c, v in self.cost.items() if c in self.choices}
        return min(measured, key=measured.__getitem__) if measured else self.choices[-1]

    def record(self, threads: int, seconds: float, tokens: int) -> None:
        unit = seconds / (tokens + 4)  # a step has a fixed cost of a few tokens' worth
        old = self.cost.get(threads)
        stale = self._step - self._seen.get(threads, -10**9) > self.explore_steps + 1  # measured under another load
        self.cost[threads] = unit if old is None or stale else 0.7 * old + 0.3 * unit
        self._seen[threads] = self._step

    def before(self, set_threads: Callable[[int], None]) -> int:
        """Choose the count for the next decode and apply it (``set_threads``) if it changed."""
        threads = self.next()
        if threads != self.applied:
            set_threads(threads)
            self.applied = threads
        return threads

    def after(self, seconds: float, tokens: int) -> None:
        """What the decode just made with :meth:`before`'s count cost."""
        self.record(self.applied, seconds, tokens)
