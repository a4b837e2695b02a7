"""OpenMP's wait policy for llama.cpp's CPU threads, set before llama.cpp (and libgomp) load.

llama.cpp's CPU threads meet at an OpenMP barrier after every node of the graph (hundreds per
step). How a thread waits there decides how threads scale:

* libgomp's default spins ~3 ms, ``ACTIVE`` up to minutes. When another process holds one of the
  cores, a spinning thread keeps its core while the thread it waits for sits out a time slice: on
  the 2-core machine with other work running, 32 Gemma 270M tokens took 15-62 s at 2 threads
  instead of 2.2-2.7 s.
* ``PASSIVE`` alone sleeps at once: robust, but a futex wake per barrier made 2 threads slower
  than 1 on an idle machine (64 Gemma tokens: 1.56 s at 2 threads, 1.22 s at 1).
* A short spin, then sleep (``GOMP_SPINCOUNT=10000``, ~0.1 ms) is as fast as ``ACTIVE`` idle
  (0.85-0.90 s). Under a busy neighbour it still loses at 2 threads, which is what
  :class:`~velollm.plugins.llamacpp.threads.ThreadTuner` is for: it measures and drops to one
  thread (1.23 s next to a busy process, as fast as ``PASSIVE``). The policy that goes with it is
  ``ACTIVE``: with ``PASSIVE`` (or none) libgomp cuts the spin to almost nothing as soon as the
  process holds more OpenMP threads than cores, which a second thread driving llama.cpp (another
  model's scheduler, a plain ``Llama`` in the same process) causes: a DSPy evaluation (32 calls)
  took 15.7 s instead of 10.3 s. ``ACTIVE`` with an explicit spin count still sleeps after it.
  ``benchmarks/bench_busy_neighbour.py`` measures all of these.

velollm sets ``ACTIVE`` with ``GOMP_SPINCOUNT=10000`` when the environment names neither variable.
libgomp reads them once, when it loads: set them in the environment, or before the first
``import llama_cpp`` of a process that imports it itself.
"""

from __future__ import annotations

import os

#: What velollm sets when the environment names neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``.
DEFAULT_WAIT_POLICY = "ACTIVE"  # only with the spin count below: see the module docstring
DEFAULT_SPIN_COUNT = "10000"

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    os.environ["GOMP_SPINCOUNT"] = DEFAULT_SPIN_COUNT
