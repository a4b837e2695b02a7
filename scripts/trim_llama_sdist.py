#!/usr/bin/env python3
"""Trim the llama-cpp-python sdist to what a CPU or CUDA build needs, so it fits the GPU machine.

Why: the GPU machine has no network and takes at most 64 MiB of copied files; the 0.3.36 sdist is
77 MB compressed (217 MB unpacked), mostly git history, llama.cpp's vocabulary models, docs, web UI and the
sources of backends a CUDA build never compiles. This keeps the Python package, the CMake files,
llama.cpp's src/, common/, vendor/, include/, tools/mtmd (the binding builds it by default) and
ggml with its CPU, CUDA, BLAS and RPC backends; everything else goes.

    python scripts/trim_llama_sdist.py OUT_DIR [--sdist PATH] [--cache DIR] [--tree]

writes ``OUT_DIR/llama_cpp_python-0.3.36.tar.gz`` (a trimmed sdist that ``pip wheel`` builds) and,
with ``--tree``, the unpacked tree beside it. Without ``--sdist`` the original sdist is fetched
once with ``pip download`` into ``--cache`` (default ``~/.cache/velollm/sdist``).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

VERSION = "0.3.36"
NAME = f"llama_cpp_python-{VERSION}"

# Paths (relative to the sdist's top folder) dropped whole. Prefix match on path components.
DROP_DIRS = (
    ".git", "vendor/llama.cpp/.git",  # the binding's git history (39 MB); build-info then says "unknown"
    "docs", "examples", "tests", "docker", ".github", "scripts",
    "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/examples", "vendor/llama.cpp/tests",
    "vendor/llama.cpp/benches", "vendor/llama.cpp/media", "vendor/llama.cpp/.github", "vendor/llama.cpp/.devops",
    "vendor/llama.cpp/gguf-py", "vendor/llama.cpp/conversion", "vendor/llama.cpp/pocs", "vendor/llama.cpp/app",
    "vendor/llama.cpp/scripts", "vendor/llama.cpp/grammars", "vendor/llama.cpp/prompts",
    "vendor/llama.cpp/requirements", "vendor/llama.cpp/licenses", "vendor/llama.cpp/ggml/tests",
    "vendor/llama.cpp/ggml/examples",
)
# Every tools/ subfolder except mtmd (built by the binding unless -DLLAVA_BUILD=OFF).
KEEP_TOOLS = ("mtmd",)
# ggml backends kept; every other ggml/src/ggml-<x>/ folder is dropped (CMake adds a backend's folder
# only when its GGML_<X> option is on, so a missing folder is never read).
KEEP_GGML_BACKENDS = ("ggml-cpu", "ggml-cuda", "ggml-blas", "ggml-rpc")
# Files dropped anywhere (documentation, notebooks, images) that no build step reads.
DROP_SUFFIXES = (".md", ".ipynb", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".webp", ".mp3", ".wav")
KEEP_FILES = ("README.md", "LICENSE", "LICENSE.md")  # pyproject's readme; licences travel with the code


def keep(rel: PurePosixPath) -> bool:
    """Whether a path (relative to the sdist's top folder) is needed by a CPU or CUDA build."""
    parts = rel.parts
    text = rel.as_posix()
    for drop in DROP_DIRS:
        if text == drop or text.startswith(drop + "/"):
            return False
    if parts[:3] == ("vendor", "llama.cpp", "tools") and len(parts) > 3 and parts[3] not in KEEP_TOOLS:
        return False
    if (parts[:4] == ("vendor", "llama.cpp", "ggml", "src") and len(parts) > 4 and parts[4].startswith("ggml-")
            and "." not in parts[4] and parts[4] not in KEEP_GGML_BACKENDS):
        return False
    return not (rel.suffix.lower() in DROP_SUFFIXES and rel.name not in KEEP_FILES)


def fetch_sdist(cache: Path) -> Path:
    """The original sdist, downloaded once with pip (the ordinary client) into ``cache``."""
    target = cache / f"{NAME}.tar.gz"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
    return target


def trim(sdist: Path, out_dir: Path, *, tree: bool = False) -> tuple[Path, int, int]:
    """Write the trimmed sdist; returns (path, bytes kept unpacked, bytes dropped unpacked)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{NAME}.tar.gz"
    kept = dropped = 0
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(target, "w:gz", compresslevel=9) as dst:
        for member in src:
            path = PurePosixPath(member.name)
            if not path.parts or path.parts[0] != NAME:
                raise SystemExit(f"unexpected member outside {NAME}/: {member.name}")
            rel = PurePosixPath(*path.parts[1:]) if len(path.parts) > 1 else PurePosixPath(".")
            if rel != PurePosixPath(".") and not keep(rel):
                dropped += member.size
                continue
            if member.isfile():
                data = src.extractfile(member)
                payload = data.read() if data else b""
                kept += len(payload)
                dst.addfile(member, io.BytesIO(payload))
            elif member.isdir() or member.issym():
                dst.addfile(member)
    if tree:
        with tarfile.open(target, "r:gz") as packed:
            packed.extractall(out_dir, filter="data")
    return target, kept, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sdist", type=Path, help="the original sdist (default: pip download into --cache)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "velollm" / "sdist")
    parser.add_argument("--tree", action="store_true", help="also unpack the trimmed tree into OUT_DIR")
    args = parser.parse_args(argv)
    sdist = args.sdist or fetch_sdist(args.cache)
    target, kept, dropped = trim(sdist, args.out_dir, tree=args.tree)
    mib = 1 << 20
    print(f"{target}: {target.stat().st_size / mib:.1f} MiB compressed (original {sdist.stat().st_size / mib:.1f} "
          f"MiB); unpacked {kept / mib:.1f} MiB kept, {dropped / mib:.1f} MiB dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
