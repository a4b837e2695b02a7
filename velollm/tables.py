"""Tables for the command line: rich on a terminal, complete tab-separated lines anywhere else.

Rich fits a table to the console width and, when stdout is a pipe, assumes 80 columns, so
``velollm plugins | grep velollm-diskcache`` found "velollm-diskc…". Written to a pipe or a file,
a table is plain TSV instead: one header line, one line per row, every cell in full (markup
removed, line breaks and tabs inside a cell turned into "; " and spaces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_terminal(console: Any) -> bool:
    """Whether ``console`` (a rich Console) writes to an interactive terminal."""
    return bool(getattr(console, "is_terminal", False))


def plain(cell: Any) -> str:
    """A cell as plain text: rich markup removed, no tabs or line breaks."""
    from rich.text import Text

    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()).replace("\t", " ")


def print_table(console: Any, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                show_header: bool = True) -> None:
    """Print ``rows`` under ``headers``: a rich table on a terminal, TSV otherwise (cells may hold markup)."""
    if is_terminal(console):
        from rich.table import Table

        table = Table(*headers, title=title, show_header=show_header)
        for row in rows:
            table.add_row(*(c if hasattr(c, "__rich__") or hasattr(c, "__rich_console__") else str(c) for c in row))
        console.print(table)
        return
    lines = []
    if title:
        lines.append(f"# {plain(title)}")
    if show_header:
        lines.append("\t".join(plain(h) for h in headers))
    lines += ["\t".join(plain(c) for c in row) for row in rows]
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()
