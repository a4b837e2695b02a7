"""scripts/find_cuda_libs.py: a CUDA build finds cuBLAS and libcuda where a pip-assembled toolkit lacks them.

Toolkit and wheel folders are laid out in tmp_path (the 2-core machine's own toolkit has nvcc and
cudart but no cuBLAS, which is what made CMake fail here before this script).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import find_cuda_libs  # noqa: E402


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, str]:
    assert find_cuda_libs.main(list(args)) == 0
    return {k: shlex.split(v)[0] if v else "" for k, _, v in
            (line.partition("=") for line in capsys.readouterr().out.splitlines())}


def test_cublas_from_the_wheels_when_the_toolkit_lacks_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toolkit = tmp_path / "cuda"
    _touch(toolkit / "lib64" / "libcudart.so.13")
    _touch(toolkit / "lib64" / "stubs" / "libcuda.so")
    wheels = tmp_path / "site" / "nvidia"
    header = _touch(wheels / "cu13" / "include" / "cublas_v2.h")
    lib = _touch(wheels / "cu13" / "lib" / "libcublas.so.13")
    _touch(wheels / "cu13" / "lib" / "libcublasLt.so.13")
    links = tmp_path / "links"
    out = _run(capsys, str(links), "--toolkit", str(toolkit), "--search", str(wheels))
    args = dict(a.removeprefix("-D").split("=", 1) for a in out["EXTRA_CMAKE_ARGS"].split())
    assert Path(args["CUDA_cublas_LIBRARY"]).resolve() == lib.resolve()
    assert Path(args["CUDA_cublasLt_LIBRARY"]).name == "libcublasLt.so"
    assert args["CMAKE_CUDA_FLAGS"] == f"-I{header.parent}"
    assert "GGML_CUDA_NO_VMM" not in args and "CUDA_cuda_driver_LIBRARY" not in args  # the stub is there
    assert str(lib.parent) in out["EXTRA_LD_PATH"].split(":")
    assert "from the wheels" in out["CUDA_NOTES"]


def test_a_complete_toolkit_needs_nothing_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toolkit = tmp_path / "cuda"
    for name in ("include/cublas_v2.h", "lib64/libcublas.so", "lib64/stubs/libcuda.so"):
        _touch(toolkit / name)
    out = _run(capsys, str(tmp_path / "links"), "--toolkit", str(toolkit), "--search", str(tmp_path / "none"))
    assert out["EXTRA_CMAKE_ARGS"] == ""
    assert "in the toolkit" in out["CUDA_NOTES"]


def test_missing_cublas_is_said_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toolkit = tmp_path / "cuda"
    _touch(toolkit / "lib64" / "stubs" / "libcuda.so")
    out = _run(capsys, str(tmp_path / "links"), "--toolkit", str(toolkit), "--search", str(tmp_path / "none"))
    assert "cuBLAS: NOT FOUND" in out["CUDA_NOTES"]
