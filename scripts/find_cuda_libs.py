#!/usr/bin/env python3
"""Where cuBLAS and the CUDA driver library are, for a llama.cpp CUDA build on a machine whose toolkit
may be assembled from pip wheels (nvcc and cudart only, as on the 2-core machine here).

CMake's FindCUDAToolkit looks for ``cublas_v2.h`` and ``libcublas.so`` in the toolkit only; PyTorch's
``nvidia-cublas`` wheel brings them (versioned names only) under ``site-packages/nvidia``. The
driver library may exist only as ``libcuda.so.1`` outside the toolkit (no stubs). This prints shell
assignments for scripts/device-check:

    EXTRA_CMAKE_ARGS='...'   CMake cache entries naming what the toolkit lacks (unversioned links made in LINK_DIR)
    EXTRA_LD_PATH='...'      folders the built libraries need at run time
    CUDA_NOTES='...'         what was found where, for the log

    python scripts/find_cuda_libs.py LINK_DIR [--toolkit /usr/local/cuda] [--search DIR ...]
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
from pathlib import Path


def toolkit_roots(explicit: list[str]) -> list[Path]:
    roots = [Path(p) for p in explicit] or [Path("/usr/local/cuda"), *map(Path, sorted(glob.glob("/usr/local/cuda-*")))]
    return list(dict.fromkeys(r.resolve() for r in roots if r.exists()))  # /usr/local/cuda links to a versioned one


def in_toolkit(roots: list[Path], pattern: str) -> Path | None:
    for root in roots:
        for sub in ("include", "lib64", "lib", "targets/x86_64-linux/include", "targets/x86_64-linux/lib",
                    "lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs"):
            hits = sorted(glob.glob(str(root / sub / pattern)))
            if hits:
                return Path(hits[0])
    return None


def wheel_dirs(extra: list[str]) -> list[Path]:
    """``site-packages/nvidia`` folders (PyTorch's CUDA wheels), plus any given."""
    dirs = [Path(p) for p in extra]
    try:
        import nvidia  # a namespace package from the nvidia-* wheels

        dirs += [Path(p) for p in nvidia.__path__]
    except ImportError:
        pass
    return [d for d in dirs if d.exists()]


def in_wheels(dirs: list[Path], pattern: str) -> Path | None:
    for d in dirs:
        hits = sorted(glob.glob(str(d / "**" / pattern), recursive=True))
        if hits:
            return Path(hits[0])
    return None


def loader_knows(prefix: str) -> Path | None:
    """The first library whose name starts with ``prefix`` in the dynamic loader's cache."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.startswith(prefix) and path:
            return Path(path)
    return None


def driver_library() -> Path | None:
    """libcuda.so(.1) as the dynamic loader knows it, or in the usual driver folders."""
    if (known := loader_knows("libcuda.so")) is not None:
        return known
    for pattern in ("/usr/local/nvidia/lib64/libcuda.so*", "/usr/lib/x86_64-linux-gnu/libcuda.so*",
                    "/usr/lib64/libcuda.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return Path(hits[0])
    return None


def link(target: Path, link_dir: Path, name: str) -> Path:
    link_dir.mkdir(parents=True, exist_ok=True)
    path = link_dir / name
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("link_dir", type=Path)
    parser.add_argument("--toolkit", action="append", default=[])
    parser.add_argument("--search", action="append", default=[], help="more folders holding nvidia wheel files")
    args = parser.parse_args(argv)
    roots, wheels = toolkit_roots(args.toolkit), wheel_dirs(args.search)
    cmake: list[str] = []
    ld_path: list[str] = []
    notes: list[str] = [f"toolkit: {', '.join(map(str, roots)) or 'none found'}"]

    if in_toolkit(roots, "cublas_v2.h") and in_toolkit(roots, "libcublas.so"):
        notes.append("cuBLAS: in the toolkit")
    else:
        header = in_wheels(wheels, "include/cublas_v2.h")
        lib = in_wheels(wheels, "lib/libcublas.so*")
        lt = in_wheels(wheels, "lib/libcublasLt.so*")
        if header and lib and lt:
            cmake += [f"-DCUDA_cublas_LIBRARY={link(lib, args.link_dir, 'libcublas.so')}",
                      f"-DCUDA_cublasLt_LIBRARY={link(lt, args.link_dir, 'libcublasLt.so')}",
                      f"-DCMAKE_CUDA_FLAGS=-I{header.parent}"]
            ld_path.append(str(lib.parent))
            notes.append(f"cuBLAS: from the wheels ({header.parent}, {lib.name})")
        else:
            notes.append("cuBLAS: NOT FOUND (neither in the toolkit nor in site-packages/nvidia): the build will fail")

    if in_toolkit(roots, "libcuda.so"):
        notes.append("driver library: the toolkit's stub")
    elif (driver := driver_library()) is not None:
        cmake.append(f"-DCUDA_cuda_driver_LIBRARY={link(driver, args.link_dir, 'libcuda.so')}")
        notes.append(f"driver library: {driver}")
    else:  # ggml links the driver only for its virtual-memory pool
        cmake.append("-DGGML_CUDA_NO_VMM=ON")
        notes.append("driver library: not found, building without ggml's VMM pool (GGML_CUDA_NO_VMM)")

    cudart = in_toolkit(roots, "libcudart.so*")
    if cudart is not None and loader_knows("libcudart.so") is None:  # the built library must find it at run time
        ld_path.append(str(cudart.parent))
        notes.append(f"cudart: {cudart.parent} added to LD_LIBRARY_PATH")

    for name, value in (("EXTRA_CMAKE_ARGS", " ".join(cmake)), ("EXTRA_LD_PATH", os.pathsep.join(ld_path)),
                        ("CUDA_NOTES", "; ".join(notes))):
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
