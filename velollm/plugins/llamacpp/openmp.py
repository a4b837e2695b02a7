"""OpenMP's wait policy for llama.cpp's CPU threads, set before llama.cpp (and libgomp) load.

llama.cpp's CPU threads meet at an OpenMP barrier after every operation of the graph, and libgomp's
default waits there by spinning. When another process holds one of the cores, a spinning thread
keeps the core while the thread it waits for sits out a time slice: on a 2-core machine with other
work running, 32 Gemma 270M tokens took 15-62 s at 2 threads instead of 2.2-2.7 s with the PASSIVE
policy (1 thread: 2.3-5.2 s). PASSIVE makes a waiting thread sleep, so a loaded machine degrades
gracefully instead of collapsing. libgomp reads the variable once, when it loads: set
``OMP_WAIT_POLICY=ACTIVE`` in the environment on a machine that runs nothing else, or before the
first ``import llama_cpp`` of a process that imports it itself.
"""

from __future__ import annotations

import os

#: What velollm sets when the environment does not say (see the module docstring).
DEFAULT_WAIT_POLICY = "PASSIVE"

os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
