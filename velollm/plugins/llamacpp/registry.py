"""Which ggml backends and devices the installed llama-cpp-python build has, read via ctypes.

``llama_supports_gpu_offload()`` only says "some GPU backend was compiled in"; the ggml
registry says which (CUDA, Vulkan, Metal...) and whether a device of that kind exists here.
The facts are plain data (:class:`GgmlRegistry`) so availability can be tested with injected
registries of machines we do not have.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from pydantic import BaseModel, Field

# enum ggml_backend_dev_type
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "accel", 3: "igpu"}

#: velollm backend kind -> ggml backend registry names that provide it
KIND_REGISTRY_NAMES: dict[str, tuple[str, ...]] = {
    "cpu": ("CPU",),
    "cuda": ("CUDA", "ROCm", "MUSA"),  # HIP and MUSA builds reuse ggml-cuda under these names
    "vulkan": ("Vulkan",),
    "metal": ("Metal", "MTL"),
}

#: how to get each kind: the CMAKE_ARGS that rebuild llama-cpp-python with it
BUILD_HINTS: dict[str, str] = {
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36',
    "vulkan": 'CMAKE_ARGS="-DGGML_VULKAN=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36',
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36',
}


class GgmlDevice(BaseModel):
    name: str
    description: str = ""
    type: str = "cpu"  # cpu | gpu | igpu | accel
    backend: str = ""  # registry name: CPU, CUDA, Vulkan, Metal...
    free_bytes: int = 0
    total_bytes: int = 0


class GgmlRegistry(BaseModel):
    backends: list[str] = Field(default_factory=list)
    devices: list[GgmlDevice] = Field(default_factory=list)
    error: str | None = None  # why the registry could not be read

    def devices_of(self, kind: str) -> list[GgmlDevice]:
        names = KIND_REGISTRY_NAMES.get(kind, ())
        wanted = ("cpu",) if kind == "cpu" else ("gpu", "igpu")
        return [d for d in self.devices if d.backend in names and d.type in wanted]

    def has_backend(self, kind: str) -> bool:
        return any(name in self.backends for name in KIND_REGISTRY_NAMES.get(kind, ()))


def _bind(lib: Any) -> Any:
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.ggml_backend_reg_count.restype = sz
    lib.ggml_backend_reg_get.restype, lib.ggml_backend_reg_get.argtypes = vp, [sz]
    lib.ggml_backend_reg_name.restype, lib.ggml_backend_reg_name.argtypes = ctypes.c_char_p, [vp]
    lib.ggml_backend_dev_count.restype = sz
    lib.ggml_backend_dev_get.restype, lib.ggml_backend_dev_get.argtypes = vp, [sz]
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [vp]
    lib.ggml_backend_dev_type.restype, lib.ggml_backend_dev_type.argtypes = ctypes.c_int, [vp]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    lib.ggml_backend_dev_backend_reg.restype, lib.ggml_backend_dev_backend_reg.argtypes = vp, [vp]
    return lib


@functools.lru_cache(maxsize=1)
def read_registry() -> GgmlRegistry:
    """Read the live registry of the installed build (cached: it does not change in a process)."""
    try:
        from llama_cpp._ggml import libggml
    except Exception as exc:  # llama-cpp-python missing or its libraries broken
        return GgmlRegistry(error=f"llama-cpp-python not importable: {type(exc).__name__}: {exc}")
    try:
        lib = _bind(libggml)
        backends = [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                    for i in range(lib.ggml_backend_reg_count())]
        devices = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(GgmlDevice(
                name=lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                type=DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode(),
                free_bytes=free.value,
                total_bytes=total.value,
            ))
    except (AttributeError, OSError, ValueError) as exc:  # an older or unusual build
        return GgmlRegistry(error=f"ggml registry unreadable: {type(exc).__name__}: {exc}")
    return GgmlRegistry(backends=backends, devices=devices)


def availability(kind: str, registry: GgmlRegistry) -> tuple[bool, str]:
    """Whether a ``llamacpp-<kind>`` backend can run, with a reason a user can act on."""
    if registry.error:
        return False, registry.error
    label = {"cuda": "CUDA", "vulkan": "Vulkan", "metal": "Metal", "cpu": "CPU"}.get(kind, kind)
    if not registry.has_backend(kind):
        hint = BUILD_HINTS.get(kind, "")
        rebuild = f"; rebuild with: {hint}" if hint else ""
        return False, f"this llama-cpp-python build has no {label} backend{rebuild}"
    devices = registry.devices_of(kind)
    if not devices:
        return False, f"{label} backend is compiled in but no {label} device was found"
    names = ", ".join(f"{d.description or d.name} ({d.total_bytes / 2**30:.1f} GiB)" if d.total_bytes else d.name
                      for d in devices)
    return True, f"{label}: {names}"
