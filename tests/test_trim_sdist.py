"""scripts/trim_llama_sdist.py: what a CUDA or CPU build needs stays, other backends and bulk go.

The rules are checked on the paths that matter, and ``trim`` on a small archive laid out like the
real sdist (the real one is 77 MB; building a wheel from its trimmed form is the script's proof,
recorded in docs/gpu.md).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import trim_llama_sdist as trim  # noqa: E402

KEPT = ["CMakeLists.txt", "pyproject.toml", "README.md", "llama_cpp/llama.py", "llama_cpp/lib/.keep",
        "vendor/llama.cpp/CMakeLists.txt", "vendor/llama.cpp/src/llama-model.cpp", "vendor/llama.cpp/common/arg.cpp",
        "vendor/llama.cpp/include/llama.h", "vendor/llama.cpp/cmake/build-info.cmake",
        "vendor/llama.cpp/ggml/src/ggml.c", "vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
        "vendor/llama.cpp/ggml/src/ggml-cuda/template-instances/mmq-instance-q8_0.cu",
        "vendor/llama.cpp/ggml/src/ggml-cpu/arch/x86/quants.c", "vendor/llama.cpp/ggml/src/ggml-backend.cpp",
        "vendor/llama.cpp/ggml/src/ggml-blas/CMakeLists.txt", "vendor/llama.cpp/tools/mtmd/CMakeLists.txt",
        "vendor/llama.cpp/vendor/miniaudio/miniaudio.h", "vendor/llama.cpp/LICENSE"]
DROPPED = [".git/modules/vendor/llama.cpp/objects/pack/p.pack", "vendor/llama.cpp/.git",
           "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", "vendor/llama.cpp/docs/build.md",
           "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp", "vendor/llama.cpp/ggml/src/ggml-metal/m.metal",
           "vendor/llama.cpp/ggml/src/ggml-sycl/x.cpp", "vendor/llama.cpp/ggml/src/ggml-opencl/x.cpp",
           "vendor/llama.cpp/ggml/src/ggml-hip/CMakeLists.txt", "vendor/llama.cpp/ggml/src/ggml-cann/x.cpp",
           "vendor/llama.cpp/tools/ui/index.html", "vendor/llama.cpp/tools/server/server.cpp",
           "vendor/llama.cpp/examples/simple/simple.cpp", "vendor/llama.cpp/tests/test-backend-ops.cpp",
           "vendor/llama.cpp/media/logo.png", "docs/index.md", "examples/high_level_api/x.py", "tests/test_llama.py"]


@pytest.mark.parametrize("path", KEPT)
def test_build_inputs_are_kept(path: str) -> None:
    assert trim.keep(PurePosixPath(path))


@pytest.mark.parametrize("path", DROPPED)
def test_bulk_and_other_backends_are_dropped(path: str) -> None:
    assert not trim.keep(PurePosixPath(path))


def test_trim_writes_an_sdist_of_the_kept_files(tmp_path: Path) -> None:
    source = tmp_path / f"{trim.NAME}.tar.gz"
    with tarfile.open(source, "w:gz") as tar:
        for rel in KEPT + DROPPED:
            data = rel.encode()
            info = tarfile.TarInfo(f"{trim.NAME}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target, kept, dropped = trim.trim(source, tmp_path / "out", tree=True)
    with tarfile.open(target) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    assert names == set(KEPT)
    assert kept == sum(len(p) for p in KEPT) and dropped == sum(len(p) for p in DROPPED)
    assert (tmp_path / "out" / trim.NAME / "vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu").read_text().endswith("mmq.cu")
