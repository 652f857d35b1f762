"""Printing result tables: rich when the terminal supports it, plain aligned text otherwise."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["print_table"]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, console=None) -> None:
    """Print ``rows`` under ``columns`` as one table (numbers right-aligned)."""
    table = Table(title=title, title_justify="left")
    cells = [[str(v) for v in row] for row in rows]
    for i, name in enumerate(columns):
        numeric = all(_is_number(row[i]) for row in cells) if cells else False
        table.add_column(name, justify="right" if numeric else "left")
    for row in cells:
        table.add_row(*row)
    (console or Console(width=max(120, Console().width))).print(table)


def _is_number(text: str) -> bool:
    text = text.strip().rstrip("x%")
    if text in ("-", "nan", ""):
        return True
    try:
        float(text.split("/")[0])
    except ValueError:
        return False
    return True
