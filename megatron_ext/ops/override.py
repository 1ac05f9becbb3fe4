"""A context override of one named choice, kept in a ``ContextVar`` (thread- and task-local).

``backend.force_backend`` (which attention backend) and ``sdpa_tiles.force_engine`` (which CUDA
engine runs the interval pieces) are both this: check the name against the valid choices, set
it for the block, restore the previous value on exit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

__all__ = ["forced_choice"]


@contextlib.contextmanager
def forced_choice(
    var: contextvars.ContextVar[str | None], name: str | None, choices: Sequence[str], what: str
) -> Iterator[None]:
    """Set ``var`` to ``name`` (one of ``choices``, or None for "not forced") inside the block.

    Raises:
        ValueError: naming ``what(name)`` and the valid choices, before anything is set.
    """
    if name is not None and name not in choices:
        raise ValueError(f"{what}({name!r}); expected one of {tuple(choices)} or None")
    token = var.set(name)
    try:
        yield
    finally:
        var.reset(token)
