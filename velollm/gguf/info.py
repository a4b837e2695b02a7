"""GGUF inspection and validation, on the ``gguf`` package.

Validation runs before any backend touches a file: llama.cpp's own loader fails with an opaque
"Failed to load model from file" (or worse), so velollm finds the real cause first and raises a
typed error that names it.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from velollm.errors import (
    InvalidModelFile,
    ModelNotFound,
    NotAGGUFFile,
    TruncatedModelFile,
    UnsupportedArchitecture,
)
from velollm.gguf.header import ArrayRef, HeaderError, read_header

GGUF_MAGIC = b"GGUF"
_LAYER = re.compile(r"^blk\.(\d+)\.")


class TensorInfo(BaseModel):
    name: str
    type: str
    shape: list[int]
    n_bytes: int
    layer: int | None = None


class ModelInfo(BaseModel):
    """What velollm needs to know about a model file before loading it."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str
    name: str = ""
    parameter_count: int = 0
    file_type: str = ""
    quant_types: dict[str, int] = Field(default_factory=dict)  # tensor type -> tensor count
    context_length: int = 0
    block_count: int = 0
    embedding_length: int = 0
    head_count: int = 0
    head_count_kv: int = 0
    key_length: int = 0
    value_length: int = 0
    sliding_window: int | None = None
    vocab_size: int = 0
    tokenizer_model: str = ""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None
    chat_template: str | None = None
    pooling_type: int | None = None
    layer_bytes: list[int] = Field(default_factory=list)  # tensor bytes of each repeating layer
    non_layer_bytes: int = 0  # embeddings, output head, final norm
    output_bytes: int = 0  # the output head (or tied embeddings) alone
    tensor_bytes: int = 0
    metadata: dict[str, Any] = Field(default_factory=dict, repr=False)  # arrays shown as "<array of N>"
    tensors: list[TensorInfo] = Field(default_factory=list, repr=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: float = 2.0) -> int:
        """Bytes of K and V cache for ``n_ctx`` tokens (f16 cache by default)."""
        head_k = self.key_length or (self.embedding_length // max(self.head_count, 1))
        head_v = self.value_length or head_k
        per_token = self.block_count * max(self.head_count_kv, 1) * (head_k + head_v)
        return int(per_token * n_ctx * bytes_per_element)

    def summary(self) -> dict[str, Any]:
        """The fields ``velollm info`` prints (no tensor list, no raw metadata)."""
        data = self.model_dump(exclude={"metadata", "tensors", "chat_template"}, mode="json")
        data["has_chat_template"] = self.has_chat_template
        return data


def check_file(path: Path) -> int:
    """Cheap checks that need no parsing: exists, regular file, non-empty, GGUF magic."""
    if not path.exists():
        raise ModelNotFound(f"model file not found: {path}")
    if not path.is_file():
        raise InvalidModelFile(f"not a regular file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InvalidModelFile(f"{path} is empty (0 bytes): an interrupted download?")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise NotAGGUFFile(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return size


@functools.lru_cache(maxsize=32)
def _inspect_cached(path: str, size: int, mtime_ns: int) -> ModelInfo:
    return _inspect(Path(path), size)


def inspect(path: str | os.PathLike[str]) -> ModelInfo:
    """Read and validate a GGUF file's header; raises a typed :class:`InvalidModelFile` on any defect.

    Results are cached per (path, size, mtime), so repeated calls are free.
    """
    path = Path(path).expanduser()
    size = check_file(path)
    stat = path.stat()
    return _inspect_cached(str(path.resolve()), size, stat.st_mtime_ns)


def _inspect(path: Path, size: int) -> ModelInfo:
    import gguf

    try:
        header = read_header(path)
    except HeaderError as exc:
        if exc.truncated:
            raise TruncatedModelFile(f"{path} is truncated: {exc} — re-download it") from None
        raise InvalidModelFile(f"{path} has a corrupt GGUF header: {exc}") from None
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelFile(f"{path} has no general.architecture key: not a model GGUF (an adapter or vocab?)")
    if header.data_end > size:
        missing = header.data_end - size
        raise TruncatedModelFile(
            f"{path} is truncated: its tensors need {header.data_end:,} bytes but the file has {size:,} "
            f"({missing:,} missing) — re-download it"
        )

    def arch_meta(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}")
        return default if value is None else value

    tensors = []
    for t in header.tensors:
        layer_match = _LAYER.match(t.name)
        tensors.append(TensorInfo(name=t.name, type=t.type.name, shape=t.shape, n_bytes=t.n_bytes,
                                  layer=int(layer_match.group(1)) if layer_match else None))
    block_count = int(arch_meta("block_count", 0) or 0)
    layer_bytes = [0] * block_count
    non_layer = output_bytes = 0
    for t in tensors:
        if t.layer is not None and t.layer < block_count:
            layer_bytes[t.layer] += t.n_bytes
        else:
            non_layer += t.n_bytes
            if t.name == "output.weight":
                output_bytes = t.n_bytes
    if not output_bytes:  # tied embeddings: the embedding matrix doubles as the output head
        output_bytes = next((t.n_bytes for t in tensors if t.name == "token_embd.weight"), 0)

    head_count = arch_meta("attention.head_count", 0)
    head_count_kv = arch_meta("attention.head_count_kv", head_count)
    if isinstance(head_count, list):  # per-layer head counts (some architectures)
        head_count = max(head_count)
    if isinstance(head_count_kv, list):
        head_count_kv = max(head_count_kv)
    tokens = meta.get("tokenizer.ggml.tokens")
    file_type = meta.get("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else ""
    except ValueError:
        file_type_name = str(file_type)
    template = meta.get("tokenizer.chat_template")
    return ModelInfo(
        path=path,
        file_size=size,
        gguf_version=header.version,
        architecture=arch,
        name=str(meta.get("general.name") or ""),
        parameter_count=sum(t.n_elements for t in header.tensors),
        file_type=file_type_name,
        quant_types=dict(Counter(t.type for t in tensors)),
        context_length=int(arch_meta("context_length", 0) or 0),
        block_count=block_count,
        embedding_length=int(arch_meta("embedding_length", 0) or 0),
        head_count=int(head_count or 0),
        head_count_kv=int(head_count_kv or 0),
        key_length=int(arch_meta("attention.key_length", 0) or 0),
        value_length=int(arch_meta("attention.value_length", 0) or 0),
        sliding_window=arch_meta("attention.sliding_window"),
        vocab_size=tokens.count if isinstance(tokens, ArrayRef) else len(tokens or []),
        tokenizer_model=str(meta.get("tokenizer.ggml.model") or ""),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token"),
        chat_template=template if isinstance(template, str) else None,
        pooling_type=arch_meta("pooling_type"),
        layer_bytes=layer_bytes,
        non_layer_bytes=non_layer,
        output_bytes=output_bytes,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        metadata={k: (f"<array of {v.count}>" if isinstance(v, ArrayRef) else v) for k, v in meta.items()},
        tensors=tensors,
    )


def validate_for(info: ModelInfo, backend_name: str, architectures: frozenset[str] | None) -> None:
    """Refuse an architecture the backend cannot run, before it tries."""
    if architectures is not None and info.architecture not in architectures:
        raise UnsupportedArchitecture(
            f"backend {backend_name!r} cannot run architecture {info.architecture!r} ({info.path.name}); "
            f"it supports: {', '.join(sorted(architectures))}"
        )
