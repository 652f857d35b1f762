"""Printing result tables: rich when the terminal supports it, plain aligned text otherwise."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["print_table"]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], *, console=None) -> None:
    """Print ``rows`` under ``columns`` as one table (numbers right-aligned)."""
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 or name == "note" else "right")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    (console or Console(width=max(120, Console().width))).print(table)
