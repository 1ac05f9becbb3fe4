"""Reading documents from a corpus on disk: plain text, JSON Lines and Parquet.

A corpus (`data.corpus`, a `data.blend` path or `data.eval_corpus`) is one of:

- a `.txt` file: the whole file is one document (UTF-8);
- a `.jsonl` file, also compressed as `.jsonl.gz` / `.jsonl.xz`: one JSON object per line, the
  document's text in the field `text_field`; blank lines are skipped;
- a `.parquet` file: one document per row, the text in the column `text_field`;
- a directory: every file of those kinds directly inside it, in name order.

`CorpusFiles.documents()` yields the texts in a fixed order, so document `i` is the same
document on every run; `fingerprint()` identifies the files (path, size, modification time)
for the token cache. Every error names the file, the line or column, and what would be valid.
Megatron indexed datasets (`.bin` + `.idx`) are not read here: see indexed.py.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                           ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


@dataclass(frozen=True)
class CorpusFiles:
    """The files of one corpus and the field that holds the text."""

    name: str
    """The corpus as the config spelled it (for messages)."""
    files: tuple[Path, ...]
    """Resolved files, in reading order."""
    text_field: str
    """JSON field / Parquet column holding the text (unused for .txt)."""

    def fingerprint(self) -> list[list]:
        """[[path, size, mtime_ns, kind], ...]: changes whenever a file is replaced or edited."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns, _kind(f)])
        return out

    def total_bytes(self) -> int:
        """Bytes on disk of all files (the progress bar's total)."""
        return sum(f.stat().st_size for f in self.files)

    def documents(self, on_bytes=None) -> Iterator[str]:
        """Yield each document's text in corpus order.

        Args:
            on_bytes: called with the number of on-disk bytes consumed since the last call
                (drives a progress bar), or None.
        """
        for f in self.files:
            kind = _kind(f)
            if kind == "txt":
                yield _read_txt(f)
                if on_bytes:
                    on_bytes(f.stat().st_size)
            elif kind == "jsonl":
                yield from _read_jsonl(f, self.text_field, on_bytes)
            else:
                yield from _read_parquet(f, self.text_field, on_bytes)


def find_corpus(spec: str, text_field: str, *, key: str = "data.corpus") -> CorpusFiles:
    """Resolve a corpus path (file or directory) to its files.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file of an unsupported kind, or a directory with no supported files.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{key}={spec!r} does not exist (expected 'embedded', a {'/'.join(SUFFIXES)} file, "
            "a directory of them, or a Megatron indexed dataset prefix with .bin and .idx)")
    if path.is_dir():
        files = tuple(sorted(p.resolve() for p in path.iterdir() if p.is_file() and _kind(p)))
        if not files:
            raise ValueError(f"{key}={spec!r} is a directory with no {'/'.join(SUFFIXES)} files")
        return CorpusFiles(spec, files, text_field)
    if _kind(path) is None:
        raise ValueError(f"{key}={spec!r}: unsupported file kind; expected one of "
                         f"{', '.join(SUFFIXES)}, a directory of them, or a Megatron indexed "
                         "dataset prefix")
    return CorpusFiles(spec, (path.resolve(),), text_field)


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def _read_jsonl(path: Path, field: str, on_bytes) -> Iterator[str]:
    raw = open(path, "rb")  # noqa: SIM115 -- its position drives the progress bar
    done = 0
    try:
        with raw, _open_stream(path, raw) as f:
            for lineno, line in enumerate(_lines(f, path), start=1):
                if on_bytes and lineno % 256 == 0:
                    pos = raw.tell()
                    on_bytes(pos - done)
                    done = pos
                if not line.strip():
                    continue
                yield _jsonl_text(line, field, path, lineno)
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as err:
        raise ValueError(f"{path}: not a complete compressed stream ({err})") from err
    if on_bytes:
        on_bytes(path.stat().st_size - done)


def _open_stream(path: Path, raw):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(raw, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(raw, "rt", encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err


def _jsonl_text(line: str, field: str, path: Path, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}, line {lineno}: expected a JSON object, got "
                         f"{type(obj).__name__}")
    if field not in obj:
        raise ValueError(f"{path}, line {lineno}: no field data.text_field={field!r}; the "
                         f"object has {sorted(obj)} (set data.text_field to the text's field)")
    text = obj[field]
    if not isinstance(text, str):
        raise ValueError(f"{path}, line {lineno}: field {field!r} is a "
                         f"{type(text).__name__}, expected a string")
    return text


def _read_parquet(path: Path, column: str, on_bytes) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # a dependency of the package; a broken install otherwise
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise ValueError(f"{path}: not a Parquet file ({err})") from err
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: no column data.text_field={column!r}; its columns are "
                         f"{names} (set data.text_field to the text's column)")
    kind = pf.schema_arrow.field(column).type
    import pyarrow as pa

    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {column!r} holds {kind}, expected strings")
    rows = max(pf.metadata.num_rows, 1)
    size = path.stat().st_size
    row = done = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for i, text in enumerate(batch.column(0).to_pylist()):
            if text is None:
                raise ValueError(f"{path}: row {row + i} has a null {column!r}")
            yield text
        row += batch.num_rows
        if on_bytes:  # bytes in proportion to rows read, ending exactly at the file size
            target = size if row >= rows else size * row // rows
            on_bytes(target - done)
            done = target


__all__ = ["SUFFIXES", "CorpusFiles", "find_corpus"]
