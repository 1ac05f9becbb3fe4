"""A rich progress bar over the tensors of a conversion (silent when disabled)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress"]


def progress(items: Sequence[T], label: str, show: bool = True) -> Iterator[T]:
    """Yield `items`, advancing a rich progress bar labelled `label` when `show`."""
    if not show:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)
