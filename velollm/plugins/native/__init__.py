"""The native backend plugin: ``native-cpu``, GGUF inference in pure Python/numpy.

It runs wherever numpy does (no compiler, no llama-cpp-python), exposes logits and hidden
states, and doubles as an independent check on llama.cpp: same tokenizer ids, same greedy
tokens. Nothing here imports ``llama_cpp``. Slower than llama.cpp (numpy streams float32
weights at memory bandwidth; see ``benchmarks/bench_native.py``), so it ranks last when velollm
picks a backend on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from velollm.engine import LoadOptions
from velollm.hookspecs import hookimpl

if TYPE_CHECKING:
    from velollm.hardware import HardwareProbe
    from velollm.plugins.native.engine import NativeEngine

BACKEND_NAME = "native-cpu"


class NativeBackend:
    """Loads GGUF models of the llama, qwen2 and gemma3 architectures into a numpy engine."""

    name = BACKEND_NAME
    priority = 40  # after llama.cpp's CPU build (30): correct everywhere, but slower

    @property
    def architectures(self) -> frozenset[str]:
        from velollm.plugins.native.model import SUPPORTED_ARCHITECTURES

        return SUPPORTED_ARCHITECTURES

    def available(self, probe: HardwareProbe) -> tuple[bool, str]:
        try:
            import numpy  # noqa: F401
        except ImportError:  # pragma: no cover - numpy is a dependency
            return False, "numpy is not installed"
        return True, "pure Python/numpy: runs on any CPU (slower than llama.cpp)"

    def memory_needs(self, info: Any, n_ctx: int, options: Any) -> Any:
        """What the pool must budget: this engine keeps weights as float32 (4 bytes per value, so
        ~4-7x the file size), the token embedding quantized, and a float32 KV cache."""
        from math import prod

        from velollm.placement import MemoryNeeds

        n_layers = info.block_count or 0
        layers = [0] * n_layers
        input_bytes = output_bytes = 0
        tied = not any(t.name == "output.weight" for t in info.tensors)
        for t in info.tensors:
            f32 = 4 * prod(t.shape)
            if t.layer is not None and t.layer < n_layers:
                layers[t.layer] += f32
            elif t.name == "token_embd.weight":
                input_bytes += t.n_bytes + (f32 if tied else 0)  # rows read from the file; a tied head expands
            elif t.name == "output.weight":
                output_bytes = f32
            else:
                input_bytes += f32
        kv = info.kv_cache_bytes(n_ctx, 4.0)
        batch = min(getattr(options, "n_batch", 512), n_ctx)
        heads = max(info.head_count, 1)
        n_ff = int(info.metadata.get(f"{info.architecture}.feed_forward_length") or 4 * info.embedding_length)
        graph = 4 * batch * (heads * n_ctx + 8 * info.embedding_length + 3 * n_ff)  # scores, activations
        return MemoryNeeds(layer_bytes=layers, kv_layer_bytes=[kv // max(n_layers, 1)] * n_layers,
                           input_bytes=input_bytes, output_bytes=output_bytes, output_tied=tied,
                           graph_bytes=graph, logits_bytes=8 * info.vocab_size)

    def load(self, model_file: Path, options: LoadOptions) -> NativeEngine:
        from velollm.plugins.native.engine import open_engine

        return open_engine(Path(model_file), options, self.name)


@hookimpl
def register_backends(register: Any) -> None:
    register(NativeBackend())
