"""Quantize a GGUF model with llama.cpp's own quantizer (``llama_model_quantize``).

llama.cpp's quantizer fails late and vaguely: an unknown type, an already-quantized source or a
very-low-bit type without an importance matrix each surface as "failed to quantize" after part of
the output was written. velollm checks all of that first (with :func:`velollm.gguf.info.inspect`),
writes to a hidden temporary file next to the output and renames it only on success, so a
failure never leaves a partial model under the name the user asked for.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from velollm.errors import (
    InvalidModelFile,
    OutputExists,
    QuantizeError,
    RequantizeRefused,
    UnknownQuantType,
)
from velollm.gguf import info as gguf_info
from velollm.hardware import default_threads

#: Called with (source bytes processed, source bytes in all) while the quantizer runs.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype_attr: str  # the llama_cpp constant holding llama.cpp's `llama_ftype` value
    bits: float  # rough bits per weight, for the size estimate shown before quantizing
    note: str = ""
    needs_imatrix: bool = False


def _t(name: str, bits: float, note: str = "", *, imatrix: bool = False, attr: str = "") -> QuantType:
    return QuantType(name, attr or f"LLAMA_FTYPE_MOSTLY_{name}", bits, note, imatrix)


#: The types ``velollm quantize`` writes (llama.cpp's `llama-quantize` list, same names).
QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in (
    _t("F32", 32.0, "no quantization, 32-bit floats", attr="LLAMA_FTYPE_ALL_F32"),
    _t("F16", 16.0, "16-bit floats"),
    _t("BF16", 16.0, "bfloat16"),
    _t("Q8_0", 8.5, "near lossless"),
    _t("Q6_K", 6.56, "very low quality loss"),
    _t("Q5_K_M", 5.67, "low quality loss"),
    _t("Q5_K_S", 5.52),
    _t("Q5_1", 6.0),
    _t("Q5_0", 5.5),
    _t("Q4_K_M", 4.89, "balanced quality and size (common default)"),
    _t("Q4_K_S", 4.58),
    _t("Q4_1", 5.0),
    _t("Q4_0", 4.5, "legacy; fast on some CPUs"),
    _t("IQ4_NL", 4.5),
    _t("IQ4_XS", 4.25),
    _t("Q3_K_L", 4.27),
    _t("Q3_K_M", 3.91),
    _t("Q3_K_S", 3.5, "high quality loss"),
    _t("IQ3_M", 3.66),
    _t("IQ3_S", 3.44),
    _t("IQ3_XS", 3.3),
    _t("IQ3_XXS", 3.06),
    _t("Q2_K", 3.35, "very high quality loss"),
    _t("Q2_K_S", 3.18, imatrix=True),
    _t("IQ2_M", 2.7, imatrix=True),
    _t("IQ2_S", 2.5, imatrix=True),
    _t("IQ2_XS", 2.31, imatrix=True),
    _t("IQ2_XXS", 2.06, imatrix=True),
    _t("IQ1_M", 1.75, imatrix=True),
    _t("IQ1_S", 1.56, imatrix=True),
)}

#: Tensor types that hold full-precision weights; anything else is already quantized.
FLOAT_TENSOR_TYPES = frozenset({"F32", "F16", "BF16", "F64"})

_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FALLBACK = re.compile(r"(\d+) of \d+ tensor\(s\) required fallback")


class QuantizeResult(BaseModel):
    """What a quantization produced; ``velollm quantize --json`` prints this."""

    source: Path
    output: Path
    type: str
    source_type: str
    output_file_type: str
    source_bytes: int
    output_bytes: int
    requantized: bool
    threads: int
    seconds: float
    tensor_types: dict[str, int]
    #: tensors llama.cpp wrote in another type because their rows do not fit the asked type's blocks
    fallback_tensors: int = 0

    @property
    def ratio(self) -> float:
        return self.output_bytes / self.source_bytes if self.source_bytes else 0.0


def quant_type(name: str) -> QuantType:
    """The table entry for ``name`` (case-insensitive); :class:`UnknownQuantType` names the valid ones."""
    key = name.strip().upper().replace("-", "_")
    found = QUANT_TYPES.get(key)
    if found is None:
        raise UnknownQuantType(f"unknown quantization type {name!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return found


def _ftype_value(qtype: QuantType) -> int:
    import llama_cpp

    value = getattr(llama_cpp, qtype.ftype_attr, None)
    if value is None:  # a llama-cpp-python build older or newer than this table
        raise UnknownQuantType(f"this llama-cpp-python build does not know {qtype.name} ({qtype.ftype_attr})")
    return int(value)


def short_file_type(file_type: str) -> str:
    """``MOSTLY_Q4_K_M`` -> ``Q4_K_M`` (the names users type)."""
    for prefix in ("MOSTLY_", "ALL_"):
        if file_type.startswith(prefix):
            return file_type[len(prefix):]
    return file_type


def quantized_tensor_types(info: gguf_info.ModelInfo) -> list[str]:
    """Tensor types in the file that are already quantized (so requantizing would be needed)."""
    return sorted(t for t in info.quant_types if t.upper() not in FLOAT_TENSOR_TYPES)


def estimate_bytes(info: gguf_info.ModelInfo, qtype: QuantType) -> int:
    """A rough output size: 2-D weights at the type's bits per weight, 1-D tensors kept in F32."""
    total = 0
    for t in info.tensors:
        n = 1
        for d in t.shape:
            n *= d
        total += n * 4 if len(t.shape) < 2 else int(n * qtype.bits / 8)
    return total


def check(source: str | os.PathLike[str], output: str | os.PathLike[str], type_name: str, *, force: bool = False,
          allow_requantize: bool = False) -> tuple[gguf_info.ModelInfo, QuantType, Path]:
    """Every check that can fail before llama.cpp runs; returns (source info, type, output path)."""
    qtype = quant_type(type_name)
    from velollm.loading import resolve

    info = gguf_info.inspect(resolve(str(source), download=False).path)
    out = Path(output).expanduser()
    if out.exists() and out.resolve() == info.path.resolve():
        raise OutputExists(f"the output {out} is the source file itself; choose another output path")
    if out.is_dir():
        raise OutputExists(f"the output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise QuantizeError(f"the output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise QuantizeError(f"the output folder {out.parent} is not writable")
    if qtype.needs_imatrix:
        raise RequantizeRefused(
            f"{qtype.name} needs an importance matrix (llama.cpp refuses very-low-bit types without one), which "
            f"velollm quantize does not compute; choose Q2_K or a type of 3 bits or more"
        )
    already = quantized_tensor_types(info)
    if already and not allow_requantize:
        raise RequantizeRefused(
            f"{info.path.name} is already quantized ({short_file_type(info.file_type) or 'mixed'}: tensors in "
            f"{', '.join(already)}). Requantizing compounds the error of both quantizations and a larger type "
            f"cannot restore lost precision; quantize from an F16/BF16/F32 file, or pass --allow-requantize"
        )
    return info, qtype, out


def quantize(source: str | os.PathLike[str], output: str | os.PathLike[str], type_name: str, *,
             threads: int | None = None, force: bool = False, allow_requantize: bool = False,
             progress: Progress | None = None) -> QuantizeResult:
    """Write ``source`` quantized to ``type_name`` at ``output``; only a finished, readable file appears there."""
    import llama_cpp

    from velollm.plugins.llamacpp import log as llamacpp_log

    info, qtype, out = check(source, output, type_name, force=force, allow_requantize=allow_requantize)
    if threads is not None and threads < 1:
        raise QuantizeError(f"--threads must be at least 1, got {threads}")
    n_threads = threads or default_threads()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype_value(qtype)
    params.nthread = n_threads
    params.allow_requantize = allow_requantize
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    start = time.perf_counter()
    done = threading.Event()
    try:
        with llamacpp_log.capture() as log:
            watcher = _ProgressWatcher(info, log, progress, done) if progress else None
            if watcher:
                watcher.start()
            try:  # the call blocks (GIL released); the watcher reads its per-tensor log lines meanwhile
                rc = llama_cpp.llama_model_quantize(str(info.path).encode(), str(tmp).encode(), params)
            finally:
                done.set()
                if watcher:
                    watcher.join()
        if rc != 0:
            reason = llamacpp_log.summary(log) or f"llama_model_quantize returned {rc}"
            raise QuantizeError(f"llama.cpp could not quantize {info.path.name} to {qtype.name}: {reason}")
        try:
            result_info = gguf_info.inspect(tmp)
        except InvalidModelFile as exc:
            raise QuantizeError(f"llama.cpp wrote an unreadable file: {exc}") from None
        written = short_file_type(result_info.file_type)
        if written != qtype.name:
            raise QuantizeError(f"asked for {qtype.name} but llama.cpp wrote a {written or 'untyped'} file")
        os.replace(tmp, out)
        fallbacks = sum(int(m.group(1)) for line in log for m in [_FALLBACK.search(line)] if m)
        if progress:
            progress(info.tensor_bytes, info.tensor_bytes)
    finally:
        if tmp.exists():
            tmp.unlink()
    return QuantizeResult(
        source=info.path, output=out, type=qtype.name, source_type=short_file_type(info.file_type),
        output_file_type=result_info.file_type, source_bytes=info.file_size, output_bytes=out.stat().st_size,
        requantized=bool(quantized_tensor_types(info)), threads=n_threads, seconds=time.perf_counter() - start,
        tensor_types=result_info.quant_types, fallback_tensors=fallbacks,
    )


class _ProgressWatcher(threading.Thread):
    """Turns llama.cpp's ``[ i/ n] tensor-name`` log lines into byte progress while the C call runs."""

    def __init__(self, info: gguf_info.ModelInfo, log: list[str], progress: Progress, done: threading.Event) -> None:
        super().__init__(name="velollm-quantize-progress", daemon=True)
        self.sizes = {t.name: t.n_bytes for t in info.tensors}
        self.total = info.tensor_bytes
        self.log, self.progress, self.done = log, progress, done

    def run(self) -> None:
        seen, finished_bytes, current = 0, 0, 0
        while True:
            stop = self.done.wait(0.1)
            lines = self.log[seen:]
            seen += len(lines)
            for line in lines:
                match = _TENSOR_LINE.search(line)
                if match:  # a tensor starts: the previous one is written
                    finished_bytes += current
                    current = self.sizes.get(match.group(3), 0)
            self.progress(finished_bytes, self.total)
            if stop:
                return

