"""The embedded corpus: Austen's six novels, the King James Bible and Bierce, as documents.

The corpus ships as one file, `assets/corpus.jsonl.xz`: xz-compressed JSON Lines, one object per
document with the keys `id`, `title`, `source`, `split` and `text`. `build_corpus.py` rebuilds it
from Debian packages; docs/data.md gives provenance, licences, sizes and the split (held-out
books, never trained on). This module only reads it.
"""

from __future__ import annotations

import json
import lzma
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "dev", "test")
DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent / "assets" / "corpus.jsonl.xz"
REBUILD_HINT = "rebuild it with `python -m megatron_ext.data.build_corpus`"


@dataclass(frozen=True)
class Document:
    """One document of the corpus: a whole novel, a book of the Bible, or the dictionary."""

    id: str
    """Stable identifier `<collection>/<slug>`, e.g. "austen/emma" or "kjv/1-samuel"."""
    title: str
    """Human-readable title, e.g. "Emma" or "1 Samuel"."""
    source: str
    """Debian package and version the text comes from, e.g. "r-cran-janeaustenr 1.0.0-1"."""
    split: str
    """One of "train", "dev", "test"."""
    text: str
    """The full text, lines joined with "\\n"."""


_FIELDS = tuple(f.name for f in fields(Document))


def _parse_line(line: str, path: Path, lineno: int) -> Document:
    where = f"{path}, line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); {REBUILD_HINT}") from err
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: expected an object with keys {list(_FIELDS)}, got {keys}")
    if not all(isinstance(obj[k], str) for k in _FIELDS):
        raise ValueError(f"{where}: every field must be a string")
    if obj["split"] not in SPLITS:
        raise ValueError(f"{where}: split={obj['split']!r}; expected one of {SPLITS}")
    return Document(**obj)


@lru_cache(maxsize=4)
def _read_all(path: Path, mtime_ns: int, size: int) -> tuple[Document, ...]:
    # Keyed on (path, mtime, size) so a rebuilt file is re-read; returns an immutable tuple.
    try:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (lzma.LZMAError, EOFError) as err:
        raise ValueError(
            f"{path}: not a complete xz stream (truncated or corrupt: {err}); {REBUILD_HINT}"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: decompressed data is not UTF-8 ({err}); {REBUILD_HINT}") from err
    if lines and lines[-1] == "":
        lines.pop()
    docs = tuple(_parse_line(line, path, i) for i, line in enumerate(lines, start=1))
    seen: set[str] = set()
    for i, doc in enumerate(docs, start=1):
        if doc.id in seen:
            raise ValueError(f"{path}, line {i}: duplicate document id {doc.id!r}")
        seen.add(doc.id)
    if not docs:
        raise ValueError(f"{path}: holds no documents; {REBUILD_HINT}")
    return docs


def load_documents(
    split: str | None = None, path: str | os.PathLike | None = None
) -> list[Document]:
    """Read the corpus, optionally one split of it.

    Args:
        split: "train", "dev", "test", or None for every document.
        path: a `corpus.jsonl.xz` file; defaults to the one shipped in `assets/`.

    Returns:
        The documents in file order (Austen by publication date, the Bible in canonical
        order, then Bierce), filtered to `split` when given.

    Raises:
        ValueError: if `split` is not one of the above, or the file is corrupt (a truncated xz
            stream, a line that is not a JSON object with the expected string fields, an
            unknown split or a duplicate id); the message names the file and line.
        FileNotFoundError: if the file does not exist.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}; expected None or one of {SPLITS}")
    corpus = Path(path) if path is not None else DEFAULT_CORPUS_PATH
    try:
        stat = corpus.resolve().stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file {corpus} does not exist; {REBUILD_HINT}") from None
    docs = _read_all(corpus.resolve(), stat.st_mtime_ns, stat.st_size)
    return [d for d in docs if split is None or d.split == split]
