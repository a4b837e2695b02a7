"""GGUF tensors, memory-mapped and dequantized lazily to float32.

numpy multiplies float32 matrices at memory bandwidth through BLAS, but float16 (and any
quantized layout) would need numpy's slow non-BLAS loops; so every weight a matrix product
needs is dequantized once, on first use, with the ``gguf`` package's quant code, and cached.
Opening a model therefore only parses the header and maps the file (under a second).

Memory is bounded by a budget (default: most of the RAM available at load): a tensor that would
push the float32 cache past it is never cached but dequantized chunk by chunk on every use
(slow, but it runs). The token embedding matrix is never expanded: each lookup dequantizes
just the rows it needs, so a 262k-token vocabulary costs nothing until the model uses it as its
(tied) output head.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from velollm.errors import InvalidModelFile
from velollm.gguf.header import GGUFHeader, TensorEntry

_CHUNK_ELEMENTS = 1 << 18  # values dequantized per task: numpy's temporaries stay in cache (measured best)


def can_dequantize(qtype: Q) -> bool:
    """Whether the installed ``gguf`` package can dequantize this type."""
    if qtype in (Q.F32, Q.F16):
        return True
    traits = getattr(quants, "_type_traits", None)
    if traits is not None:
        return qtype in traits
    from gguf import GGML_QUANT_SIZES

    try:  # no registry to ask: try one block
        quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (NotImplementedError, KeyError):
        return False
    return True


@dataclass
class Tensor:
    """One tensor of the file: its raw bytes (a view of the memory map) and logical shape."""

    name: str
    qtype: Q
    shape: tuple[int, ...]  # numpy order: (rows, columns) for matrices
    raw: np.ndarray  # uint8, (rows, bytes per row)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def nbytes_f32(self) -> int:
        return int(np.prod(self.shape)) * 4

    def dequantize_rows(self, rows: np.ndarray | slice) -> np.ndarray:
        """float32 values of some rows (a row index array or a slice)."""
        return _dequantize(self.raw[rows], self.qtype)


def _dequantize(raw: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32).copy()
    return np.ascontiguousarray(quants.dequantize(raw, qtype), dtype=np.float32)


class WeightStore:
    """Named tensors of one GGUF file plus the float32 cache, under a memory budget."""

    def __init__(self, path: Path, header: GGUFHeader, *, budget_bytes: int, threads: int = 1) -> None:
        self.path = path
        self.budget_bytes = budget_bytes
        self.cached_bytes = 0
        self.threads = max(1, threads)
        self._file = path.open("rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        self._mutex = threading.Lock()
        self._f32: dict[str, np.ndarray] = {}
        self.streamed: set[str] = set()
        self.tensors: dict[str, Tensor] = {t.name: self._view(header, t) for t in header.tensors}

    def _view(self, header: GGUFHeader, entry: TensorEntry) -> Tensor:
        start = header.data_offset + entry.offset
        if start + entry.n_bytes > self._buf.size:
            raise InvalidModelFile(f"{self.path.name}: tensor {entry.name} runs past the end of the file")
        shape = tuple(reversed(entry.shape)) or (1,)
        rows = shape[0] if len(shape) > 1 else 1
        raw = self._buf[start:start + entry.n_bytes].reshape(rows, -1)
        return Tensor(entry.name, entry.type, shape, raw)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidModelFile(f"{self.path.name} has no tensor {name!r}") from None

    # --- float32 views ---------------------------------------------------------------------
    def vector(self, name: str) -> np.ndarray:
        """A small tensor (norm weights, biases) as a flat float32 array, always cached."""
        arr = self._f32.get(name)
        if arr is None:
            arr = self._f32[name] = self.get(name).dequantize_rows(slice(None)).reshape(-1)
        return arr

    def matrix(self, names: tuple[str, ...]) -> np.ndarray | None:
        """Several tensors stacked row-wise as one float32 matrix (e.g. Q, K, V), cached if the
        budget allows; ``None`` when it does not (use :meth:`streamed_matmul`)."""
        key = "+".join(names)
        arr = self._f32.get(key)
        if arr is not None or key in self.streamed:
            return arr
        with self._mutex:
            arr = self._f32.get(key)
            if arr is not None or key in self.streamed:
                return arr
            parts = [self.get(n) for n in names]
            total = sum(p.nbytes_f32 for p in parts)
            if self.cached_bytes + total > self.budget_bytes:
                self.streamed.add(key)
                return None
            out = np.empty((sum(p.rows for p in parts), parts[0].shape[-1]), np.float32)
            row = 0
            for part in parts:
                self._fill(part, out[row:row + part.rows])
                row += part.rows
            self._f32[key] = out
            self.cached_bytes += total
            return out

    def _fill(self, tensor: Tensor, out: np.ndarray) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(tensor.shape[-1], 1))
        chunks = [slice(i, min(i + step, tensor.rows)) for i in range(0, tensor.rows, step)]

        def job(rows: slice) -> None:
            out[rows] = tensor.dequantize_rows(rows)

        if self.threads > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(job, chunks))
        else:
            for rows in chunks:
                job(rows)

    def streamed_matmul(self, names: tuple[str, ...], x: np.ndarray,
                        prepare: Callable[[Tensor, np.ndarray], np.ndarray]) -> np.ndarray:
        """``x @ W.T`` for stacked tensors that are not cached: dequantize a chunk, multiply, drop it.

        ``prepare(tensor, x)`` returns the activations as that tensor's matrix product sees them.
        """
        outs = []
        for name in names:
            tensor = self.get(name)
            xs = prepare(tensor, x)
            step = max(1, 16 * _CHUNK_ELEMENTS // max(tensor.shape[-1], 1))
            for i in range(0, tensor.rows, step):
                rows = slice(i, min(i + step, tensor.rows))
                outs.append(xs @ tensor.dequantize_rows(rows).T)
        return np.concatenate(outs, axis=-1)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Selected rows as float32, from the cache when the tensor is expanded, else from the file."""
        cached = self._f32.get(name)
        if cached is not None:
            return cached[ids]
        return self.get(name).dequantize_rows(ids)

    def close(self) -> None:
        """Drop the cache and unmap the file."""
        self._f32.clear()
        self.tensors.clear()
        self.cached_bytes = 0
        self._buf = np.empty(0, np.uint8)
        with contextlib.suppress(BufferError):  # a view is still alive somewhere; the map goes with it
            self._mm.close()
        self._file.close()
