"""The C++ runtime joins the process's global symbols before llama.cpp's libraries load.

llama-cpp-python loads libllama with ``RTLD_GLOBAL``. A CUDA build can carry its own copies of
libstdc++ code in ``libggml-cuda.so`` (seen on an H100 with CUDA 13 and GCC 13: 3,465 exported
``std::`` symbols, strong ones among them). When the process had loaded libstdc++ privately
before (``import numpy`` does: DSPy, pydantic users and velollm itself all import it first),
libllama's ``std::ostream`` calls bound to libggml-cuda's copies, whose locale was never set up,
and ``llama_model_load_from_file`` died with SIGSEGV in ``llama_model::print_info``. With
libstdc++ in the global scope first, every library binds to the one real runtime; plain
llama-cpp-python then loads the same model whatever was imported before.
"""

from __future__ import annotations

import ctypes
import sys

#: The C++ runtime llama.cpp's Linux builds link against (macOS uses libc++, Windows its own DLLs).
LIBSTDCXX = "libstdc++.so.6"


def promote_cxx_runtime() -> bool:
    """Load libstdc++ with ``RTLD_GLOBAL`` (a no-op when it already is); False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(LIBSTDCXX, mode=ctypes.RTLD_GLOBAL)
    except OSError:  # a musl or static-only system: llama.cpp then links it statically, nothing to promote
        return False
    return True


promote_cxx_runtime()
