"""What it takes to finish a JSON answer: the fewest tokens each schema part can be written in.

The constraint state compares the tokens left (``max_tokens`` minus what was written) with what
closing the answer needs from where it stands: the current value closed plus the smallest valid
value of every field still to write. When the two meet, the state steers to the closing path
(close the string, the array, the object), so a constrained answer is always complete. Until
then nothing is cut: a long ``reasoning`` field gets everything the later fields' minimum leaves.

The smallest value of a schema is built without recursion on the schema's depth beyond
:data:`MAX_DEPTH` (``$ref`` cycles end there as ``null``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    for _ in range(MAX_DEPTH):
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema = node if isinstance(node, dict) else {}
        ref = schema.get("$ref")
    return {}


def minimal_value(schema: Any, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """The shortest JSON value ``schema`` accepts (close enough for budgets: a few tokens' slack)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        return min(schema["enum"], key=lambda v: len(json.dumps(v)))
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            values = [minimal_value(o, root, depth + 1) for o in options]
            return min(values, key=lambda v: len(json.dumps(v)))
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                merged.update(_resolve(part, root))
        return minimal_value(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "null" if "null" in kind else (kind[0] if kind else None)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties", {}) or {}
        required = schema.get("required", [])
        return {k: minimal_value(props.get(k, {}), root, depth + 1) for k in required if isinstance(k, str)}
    if kind == "array":
        items = schema.get("items", {})
        prefix = schema.get("prefixItems") or []
        n = max(int(schema.get("minItems", 0) or 0), len(prefix))
        return [minimal_value(prefix[i] if i < len(prefix) else items, root, depth + 1) for i in range(n)]
    if kind == "string":
        return "a" * int(schema.get("minLength", 0) or 0)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return int(low) + 1 if isinstance(low, (int, float)) and low > 0 else 0
    if kind == "boolean":
        return False
    return None


@dataclass
class FieldCosts:
    """Tokens to finish a top-level object from field ``i`` on (``suffix[i]``), and the field order."""

    order: list[str]
    suffix: list[int]
    whole: int

    def reserve(self, field: str | None, depth: int) -> int:
        """Tokens to keep for closing while ``field``'s value is written ``depth`` levels deep (None:
        before the first key): the later fields' minimum, and closing this value (a flat value: its
        closing quote; a nested one: as much as its own minimum, since its required keys still come)."""
        if field is None or field not in self.order:
            return self.whole
        i = self.order.index(field)
        later = self.suffix[i + 1] if i + 1 < len(self.suffix) else 1
        current = self.suffix[i] - later
        return int(later * 1.15) + (current if depth > 1 else 2)


def field_costs(schema: dict[str, Any], count: Callable[[str], int]) -> FieldCosts:
    """Per top-level field, the tokens the smallest rendering of it and every later field takes."""
    root = schema
    resolved = _resolve(schema, root)
    value = minimal_value(schema)
    whole = count(json.dumps(value)) + 2
    props = resolved.get("properties") if isinstance(resolved, dict) else None
    if not isinstance(value, dict) or not isinstance(props, dict):
        return FieldCosts([], [], whole)
    order = [k for k in props if k in value]
    suffix = [0] * (len(order) + 1)
    suffix[len(order)] = 1  # the closing brace
    for i in range(len(order) - 1, -1, -1):
        key = order[i]
        part = json.dumps({key: value[key]})[1:-1]  # '"key": value'
        # the whole field (its smallest value) plus separators: an upper bound on closing it from inside
        suffix[i] = suffix[i + 1] + count(part) + 2
    return FieldCosts(order, suffix[:-1] if order else [], whole)
