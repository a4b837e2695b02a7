"""``velollm info --tensors``: every tensor of a GGUF file, and the bytes each layer costs.

Per-layer totals are what placement decisions (how many layers fit on a GPU) and quantization
choices rest on, so they are shown next to the raw tensor list.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from rich.console import Console

from velollm.gguf.info import ModelInfo


def tensor_report(info: ModelInfo) -> dict[str, Any]:
    """Tensors (name, type, shape, bytes, layer) and totals per layer, as plain JSON-able data."""
    per_layer: dict[int | None, list[Any]] = defaultdict(list)
    for t in info.tensors:
        per_layer[t.layer].append(t)
    layers = []
    for layer in sorted(k for k in per_layer if k is not None):
        group = per_layer[layer]
        layers.append({
            "layer": layer,
            "n_tensors": len(group),
            "n_bytes": sum(t.n_bytes for t in group),
            "types": dict(Counter(t.type for t in group)),
        })
    other = per_layer.get(None, [])
    return {
        "path": str(info.path),
        "architecture": info.architecture,
        "file_type": info.file_type,
        "n_tensors": len(info.tensors),
        "tensor_bytes": info.tensor_bytes,
        "file_size": info.file_size,
        "tensors": [t.model_dump() for t in info.tensors],
        "layers": layers,
        "non_layer": {
            "n_tensors": len(other),
            "n_bytes": sum(t.n_bytes for t in other),
            "types": dict(Counter(t.type for t in other)),
        },
        "types": {name: {"n_tensors": count, "n_bytes": sum(t.n_bytes for t in info.tensors if t.type == name)}
                  for name, count in Counter(t.type for t in info.tensors).items()},
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


def print_tensor_report(info: ModelInfo, console: Console) -> None:
    """Three tables: tensors, per-layer totals, per-type totals."""
    report = tensor_report(info)
    from velollm.tables import print_table

    print_table(console, ("#", "name", "type", "shape", "MB"),
                [(str(i), t["name"], t["type"], " x ".join(str(d) for d in t["shape"]), _mb(t["n_bytes"]))
                 for i, t in enumerate(report["tensors"])],
                title=f"{info.path.name}: {report['n_tensors']} tensors")
    layers = []
    for row in report["layers"]:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(row["types"].items()))
        layers.append((str(row["layer"]), str(row["n_tensors"]), _mb(row["n_bytes"]), types))
    other = report["non_layer"]
    if other["n_tensors"]:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(other["types"].items()))
        layers.append(("[dim]other[/dim]", str(other["n_tensors"]), _mb(other["n_bytes"]), types))
    layers.append(("[bold]total[/bold]", str(report["n_tensors"]), _mb(report["tensor_bytes"]), ""))
    print_table(console, ("layer", "tensors", "MB", "types"), layers, title="per layer")
    print_table(console, ("type", "tensors", "MB"),
                [(name, str(row["n_tensors"]), _mb(row["n_bytes"]))
                 for name, row in sorted(report["types"].items(), key=lambda kv: -kv[1]["n_bytes"])],
                title="per type")
