"""Tables written to a pipe are complete: ``velollm plugins | grep velollm-diskcache`` must find it.

The commands run as subprocesses with stdout a pipe and no COLUMNS set (rich then assumes 80
columns and used to cut cells to "velollm-diskc…"); every name the JSON form reports must appear
in full in the piped table, one row per line, tab-separated.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from velollm.tables import plain, print_table


def piped(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TERM")}
    result = subprocess.run([sys.executable, "-m", "velollm.cli", *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if "\t" in line]


def test_plugins_piped_prints_every_name_in_full() -> None:
    records = json.loads(piped("plugins", "--json"))
    table = piped("plugins")
    lines = rows(table)
    assert lines[0] == ["plugin", "distribution", "API", "hooks", "registered", "problems"]
    by_name = {row[0].removesuffix(" (built-in)"): row for row in lines[1:]}
    assert set(by_name) == {r["name"] for r in records}
    for r in records:
        row = by_name[r["name"]]
        for backend in r["backends"]:
            assert backend in row[4], (backend, row)
        for hook in r["hooks"]:
            assert hook in row[3]
    assert "…" not in table


def test_models_piped_prints_names_and_descriptions_in_full() -> None:
    from velollm.models import CATALOG

    lines = rows(piped("models"))
    assert lines[0][:3] == ["name", "size", "pulled"]
    listed = {row[0]: row for row in lines[1:]}
    for entry in CATALOG.values():
        assert entry.name in listed and entry.description in listed[entry.name]


def test_probe_piped_prints_every_backend_and_reason_in_full() -> None:
    data = json.loads(piped("probe", "--json"))
    table = piped("probe")
    listed = {row[0]: row for row in rows(table)}
    for name, status in data["backends"].items():
        assert name in listed
        assert listed[name][1] == ("yes" if status["usable"] else "no")
        assert listed[name][2] == status["reason"]  # long reasons (CMAKE_ARGS=...) are not cut
    assert "…" not in table


def test_info_piped_is_key_value_lines(gemma_path: Path) -> None:
    lines = dict(row[:2] for row in rows(piped("info", str(gemma_path))))
    assert lines["architecture"] == "gemma3" and lines["path"].endswith(gemma_path.name)


def test_a_terminal_still_gets_a_rich_table() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=60, color_system=None)
    print_table(console, ("name", "note"), [("a-very-long-plugin-name-indeed", "[red]broken[/red]")])
    text = buffer.getvalue()
    assert "┃" in text or "│" in text  # box drawing: a real table
    assert plain("[red]x\ny[/red]\tz") == "x; y z"
