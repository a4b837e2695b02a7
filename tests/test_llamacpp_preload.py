"""libstdc++ is in the process's global symbol scope before llama.cpp loads
(velollm.plugins.llamacpp.preload), whatever the program imported first.

On a CUDA 13 build, ``libggml-cuda.so`` exports its own copies of libstdc++ code; with numpy
imported first, libllama's ``std::ostream`` calls bound to them and the model load crashed
(docs/gpu.md). The check here is the mechanism, which holds on every Linux build: after the plugin
is imported, a libstdc++ symbol resolves through the global scope (``dlsym(RTLD_DEFAULT)``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: ``std::ostream& std::ostream::_M_insert<long>(long)``, the call that crashed
SYMBOL = "_ZNSo9_M_insertIlEERSoT_"
PROBE = f"""
import ctypes
import numpy  # loads libstdc++ privately, as it did on the GPU machine (via its C++ parts)
before = hasattr(ctypes.CDLL(None), {SYMBOL!r})
import velollm.plugins.llamacpp
after = hasattr(ctypes.CDLL(None), {SYMBOL!r})
import llama_cpp
print(before, after, 'llama_cpp' in __import__('sys').modules)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ and RTLD_GLOBAL: Linux builds only")
def test_the_cxx_runtime_is_global_after_the_plugin_is_imported() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after, loaded = out.stdout.split()
    # ``before`` is False on a plain CPython (numpy's load is private): the crash's condition. It is
    # not asserted: an interpreter linked against libstdc++ has it global from the start
    assert after == "True" and loaded == "True", (before, out.stdout)


def test_promoting_twice_is_harmless() -> None:
    from velollm.plugins.llamacpp import preload

    assert preload.promote_cxx_runtime() is sys.platform.startswith("linux")
    assert preload.promote_cxx_runtime() is sys.platform.startswith("linux")
