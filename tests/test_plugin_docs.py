"""Every hook is documented in docs/plugins.md with its exact signature (datasette's rule)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from velollm import engine, hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def hook_signatures() -> dict[str, str]:
    specs = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, f"{hookspecs.PROJECT}_spec"):
            specs[name] = f"{name}({', '.join(inspect.signature(fn).parameters)})"
    return specs


def documented_hooks() -> dict[str, str]:
    text = DOCS.read_text()
    section = text.split("\n## Hooks", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(0)[5:-1] for m in re.finditer(r"### `(\w+)\([^)]*\)`", section)}


def test_there_are_hooks_to_document() -> None:
    assert {"register_backends", "register_model_sources", "register_commands", "collect_hardware_facts"} <= set(
        hook_signatures())


def test_every_hook_is_documented_with_its_signature() -> None:
    documented = documented_hooks()
    for name, signature in hook_signatures().items():
        assert name in documented, f"hook {name} is missing from docs/plugins.md"
        assert documented[name] == signature, f"docs/plugins.md shows {documented[name]!r}, the spec is {signature!r}"


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    assert set(documented_hooks()) <= set(hook_signatures())


def test_engine_protocol_methods_are_documented() -> None:
    text = DOCS.read_text()
    for proto in (engine.Engine, engine.Backend):
        for member in ("generate", "stream", "tokenize", "detokenize", "close", "capabilities", "context_length") \
                if proto is engine.Engine else ("name", "available", "load"):
            assert hasattr(proto, member) or member in proto.__annotations__
            assert f"`{member}" in text, f"{proto.__name__}.{member} is not documented"
