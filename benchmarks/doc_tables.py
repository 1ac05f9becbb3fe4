"""Shared by the benchmark scripts: replace one marked section of docs/benchmarks.md.

Each script (and each case of bench_ops.py) owns a section between
`<!-- <key>:begin -->` and `<!-- <key>:end -->`, so a run of a subset updates only its own rows
and leaves the figures other runs measured in place.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def write_section(key: str, title: str, text: str, doc: Path = DOC) -> None:
    """Replace (or append) the section `key` of `doc` with a `### title` heading and `text`."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = f"{begin}\n### {title}\n\n{text}\n{end}"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + section + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def stamp(device: str) -> str:
    """The line every GPU table opens with: device, date and torch version."""
    import datetime

    import torch

    return f"Device: {device}; date: {datetime.date.today().isoformat()}; torch {torch.__version__}"


def publish(key: str, title: str, lines: list[str], write: bool) -> None:
    """Print a table's lines and, with ``write``, make them section ``key`` of the doc."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(key, title, text)
