"""Tokenise a corpus once into a memory-mapped token file (megatron-core's indexed format).

A tokenised corpus is a pair `PREFIX.bin` (all token ids, one document after another) and
`PREFIX.idx` (document lengths and offsets), written by megatron-core's
`IndexedDatasetBuilder` and read back through its `IndexedDataset`. So a corpus prepared with
Megatron-LM's `tools/preprocess_data.py` can be used as it is (`data.corpus=PREFIX`), and ours
can be read by Megatron.

`corpus_tokens(...)` keeps tokenised corpora in `data.cache_dir`, one directory per
(corpus, tokenizer) pair: the key hashes the corpus files' paths, sizes and modification times,
the text field, and the tokenizer's full JSON and EOS. Editing a file or changing the tokenizer
gives a new key, so a stale entry is never read. An entry is built under a file lock (other
processes, e.g. the other ranks, wait for it), written to a temporary directory and renamed into
place, so a crash never leaves an entry that later loads. Each document is stored with the EOS
appended (Megatron's `--append-eod`); empty documents are skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.data.tokenizer import TextTokenizer

CACHE_FORMAT = 1
BATCH_CHARS = 4_000_000
"""Characters of text handed to the tokenizer at once (it encodes a batch in parallel)."""
PIECE_CHARS = 200_000
"""Longer documents are encoded in pieces cut after a newline (bounded memory per call)."""
INDEX_HEADER = b"MMIDIDX\x00\x00"
"""First bytes of a megatron-core .idx file."""


@dataclass(frozen=True)
class TokenDocuments:
    """The documents of one tokenised corpus: a flat memory-mapped token array and extents."""

    tokens: np.ndarray
    """[T] all token ids (uint16 or int32, memory-mapped)."""
    starts: np.ndarray
    """[D] int64: where each document starts in `tokens`."""
    lengths: np.ndarray
    """[D] int64: tokens per document (EOS included when it was appended)."""
    name: str
    """The corpus as configured (for messages)."""
    path_prefix: str | None = None
    """PREFIX of PREFIX.bin / PREFIX.idx, when on disk."""
    splits: tuple[str, ...] | None = None
    """Per-document split ('train' / 'dev' / 'test'): the embedded corpus only."""
    doc_names: tuple[str, ...] | None = None
    """Per-document ids, when the corpus has them (the embedded corpus)."""

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i` (a view into the memory map)."""
        s = int(self.starts[i])
        return self.tokens[s : s + int(self.lengths[i])]


def is_indexed_prefix(spec: str) -> str | None:
    """PREFIX when `spec` names a Megatron indexed dataset (PREFIX, PREFIX.bin or PREFIX.idx)."""
    path = os.path.expanduser(spec)
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return prefix
    return None


def open_indexed(prefix: str, name: str | None = None) -> TokenDocuments:
    """Memory-map an indexed dataset (ours or Megatron-LM's `preprocess_data` output).

    A Megatron document may hold several sequences (sentence splitting); they lie back to back in
    the .bin file, so each document is read as one run of tokens.

    Raises:
        ValueError: the .idx is not a Megatron index, or the .bin is shorter than it says.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    name = name or prefix
    with open(prefix + ".idx", "rb") as f:  # megatron's reader asserts; say what is wrong first
        header = f.read(len(INDEX_HEADER))
    if header != INDEX_HEADER:
        raise ValueError(f"{name}: {prefix}.idx is not a megatron-core indexed dataset index "
                         f"(header {header!r}, expected {INDEX_HEADER!r})")
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except (AssertionError, ValueError, struct.error) as err:
        raise ValueError(f"{name}: {prefix}.idx is not a megatron-core indexed dataset index "
                         f"({type(err).__name__}: {err})") from err
    dtype = np.dtype(ds.index.dtype)
    seq_len = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(seq_len)])
    starts = cum[doc_idx[:-1]]
    lengths = cum[doc_idx[1:]] - starts
    pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
    if pointers.size and not np.array_equal(pointers, cum[:-1] * dtype.itemsize):
        raise ValueError(f"{name}: {prefix}.idx has sequences that are not back to back in the "
                         ".bin file; this reader needs the layout preprocess_data writes")
    size = os.path.getsize(prefix + ".bin")
    if size != int(cum[-1]) * dtype.itemsize:
        raise ValueError(f"{name}: {prefix}.bin has {size} bytes but {prefix}.idx describes "
                         f"{int(cum[-1])} tokens of {dtype.itemsize} bytes (truncated or not a "
                         "pair); rebuild it")
    del ds
    tokens = (np.memmap(prefix + ".bin", dtype=dtype, mode="r") if size
              else np.zeros(0, dtype=dtype))
    keep = lengths > 0
    return TokenDocuments(tokens, starts[keep], lengths[keep], name, prefix)


def cache_key(corpus_identity: object, tokenizer: TextTokenizer) -> str:
    """Hex key of a (corpus, tokenizer) pair; any change in either gives another key."""
    blob = json.dumps({"format": CACHE_FORMAT, "corpus": corpus_identity,
                       "tokenizer": tokenizer.identity}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def corpus_tokens(
    name: str,
    identity: object,
    texts: Callable[[Callable[[int], None]], Iterable[str]],
    tokenizer: TextTokenizer,
    cache_dir: str | os.PathLike,
    *,
    total_bytes: int,
    meta: dict | None = None,
    progress: bool = True,
) -> TokenDocuments:
    """Tokenised documents of a corpus, built once into `cache_dir` and reused afterwards.

    Args:
        name: the corpus as configured (messages, directory name).
        identity: JSON-able value that changes whenever the corpus's content may have changed.
        texts: `texts(on_bytes)` yields the documents' texts in a fixed order; `on_bytes(n)`
            advances the progress bar by n of `total_bytes`.
        tokenizer: the run's tokenizer (its identity is part of the key).
        cache_dir: root of the cache.
        total_bytes: progress bar total.
        meta: extra per-document lists to keep in the manifest ({"splits": [...]}), aligned
            with the documents `texts` yields (before empty ones are skipped).
        progress: show a progress bar while tokenising.
    """
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name.rstrip("/")).name)[:40] or "corpus"
    key = cache_key(identity, tokenizer)
    entry = root / f"{slug}-{key}"
    with _locked(root / f"{slug}-{key}.lock"):
        if not (entry / "manifest.json").is_file():
            _build(entry, name, identity, texts, tokenizer, total_bytes, meta, progress)
    return _load_entry(entry, name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_entry(entry: Path, name: str) -> TokenDocuments:
    manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    docs = open_indexed(str(entry / "tokens"), name)
    if len(docs) != manifest["documents"] or docs.num_tokens != manifest["tokens"]:
        raise ValueError(f"{name}: cache entry {entry} holds {len(docs)} documents / "
                         f"{docs.num_tokens} tokens, its manifest says {manifest['documents']} / "
                         f"{manifest['tokens']}; delete the directory to rebuild it")
    splits = manifest.get("splits")
    ids = manifest.get("ids")
    return TokenDocuments(docs.tokens, docs.starts, docs.lengths, name, docs.path_prefix,
                          tuple(splits) if splits else None, tuple(ids) if ids else None)


def _batches(texts: Iterable[str], limit: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    chars = 0
    for i, text in enumerate(texts):
        batch.append((i, text))
        chars += len(text)
        if chars >= limit:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _build(entry: Path, name: str, identity: object, texts, tokenizer: TextTokenizer,
           total_bytes: int, meta: dict | None, progress: bool) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from megatron_ext.data.packing import split_text

    tmp = entry.with_name(f"{entry.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(str(tmp / "tokens.bin"), dtype=dtype)
    kept: list[int] = []
    n_tokens = 0
    columns = (TextColumn(f"tokenizing {name}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("tokenize", total=max(total_bytes, 1))
            stream = texts(lambda n: bar.advance(task, n))
            for batch in _batches(stream, BATCH_CHARS):
                pieces, owner = [], []
                for i, text in batch:
                    for piece in split_text(text, PIECE_CHARS):
                        pieces.append(piece)
                        owner.append(i)
                ids = tokenizer.encode_batch(pieces) if pieces else []
                per_doc: dict[int, list[int]] = {}
                for i, piece_ids in zip(owner, ids):
                    per_doc.setdefault(i, []).extend(piece_ids)
                for i, _ in batch:
                    if i not in per_doc:  # empty text
                        continue
                    doc = np.asarray(per_doc[i] + [tokenizer.eos_id], dtype=dtype)
                    builder.add_document(doc, [doc.size])
                    kept.append(i)
                    n_tokens += doc.size
        builder.finalize(str(tmp / "tokens.idx"))
        if not kept:
            raise ValueError(f"{name}: every document is empty; nothing to train on")
        manifest = {"format": CACHE_FORMAT, "corpus": name, "identity": identity,
                    "tokenizer": tokenizer.source, "tokenizer_sha256": tokenizer.identity,
                    "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
                    "dtype": np.dtype(dtype).name, "documents": len(kept), "tokens": n_tokens}
        for field, values in (meta or {}).items():
            manifest[field] = [values[i] for i in kept]
        _write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(part, path)


__all__ = ["TokenDocuments", "cache_key", "corpus_tokens", "is_indexed_prefix", "open_indexed"]
