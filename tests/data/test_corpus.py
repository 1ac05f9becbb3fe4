"""The shipped corpus and the readers that build and load it.

Compares the shipped `corpus.jsonl.xz` with the split and document inventory of docs/data.md,
"Contents and split" (exact titles per split, 6 novels + 66 books + Bierce, unique ids),
checks that corrupt or missing files and bad arguments fail with messages naming the problem,
and checks the R serialization reader against small streams written here by an independent
XDR encoder (the Debian packages themselves are not available in CI). Everything is exact:
text and metadata, no tolerances.
"""

from __future__ import annotations

import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from megatron_ext.data.build_corpus import KJV_BOOKS, split_of
from megatron_ext.data.corpus import DEFAULT_CORPUS_PATH, Document, load_documents
from megatron_ext.data.rdata import read_lazyload_db, unserialize

TEST_TITLES = {"Emma", "Persuasion", "Psalms", "Isaiah", "Luke", "Acts", "Joshua"}
DEV_TITLES = {"Northanger Abbey"}
AUSTEN_TITLES = {
    "Sense and Sensibility",
    "Pride and Prejudice",
    "Mansfield Park",
    "Emma",
    "Northanger Abbey",
    "Persuasion",
}


def test_documents_load_with_expected_inventory() -> None:
    docs = load_documents()
    assert all(isinstance(d, Document) for d in docs)
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids)) == 6 + 66 + 1
    assert {d.title for d in docs if d.id.startswith("austen/")} == AUSTEN_TITLES
    assert [d.title for d in docs if d.id.startswith("kjv/")] == [t for _, t in KJV_BOOKS]
    assert [d.id for d in docs if d.id.startswith("bierce/")] == ["bierce/devils-dictionary"]
    assert all(d.text and d.text == d.text.strip() for d in docs)
    assert all(d.split == split_of(d.id) for d in docs)


@pytest.mark.parametrize(
    "split, titles",
    [
        pytest.param("test", TEST_TITLES, id="test"),
        pytest.param("dev", DEV_TITLES, id="dev"),
    ],
)
def test_held_out_splits_hold_exactly_the_expected_books(split: str, titles: set[str]) -> None:
    assert {d.title for d in load_documents(split)} == titles


def test_train_split_is_the_rest() -> None:
    train = load_documents("train")
    assert len(train) == 73 - len(TEST_TITLES) - len(DEV_TITLES)
    assert not {d.title for d in train} & (TEST_TITLES | DEV_TITLES)
    assert {"Genesis", "Emma"} & {d.title for d in train} == {"Genesis"}


def test_text_formats() -> None:
    docs = {d.id: d for d in load_documents()}
    genesis = docs["kjv/genesis"].text
    assert genesis.startswith("Genesis\n\nChapter 1\n\nIn the beginning God created")
    assert "Ge1:1" not in genesis and "\nChapter 50\n" in genesis
    assert docs["kjv/psalms"].text.startswith("Psalms\n\nPsalm 1\n\nBlessed is the man")
    assert docs["austen/emma"].text.startswith("EMMA\n\nBy Jane Austen")
    assert "{" not in docs["bierce/devils-dictionary"].text
    assert docs["austen/persuasion"].source == "r-cran-janeaustenr 1.0.0-1"


@pytest.mark.parametrize(
    "split", [pytest.param("validation", id="unknown"), pytest.param("Train", id="case")]
)
def test_bad_split_is_rejected(split: str) -> None:
    with pytest.raises(ValueError, match=rf"split='{split}'; expected None or one of"):
        load_documents(split)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl.xz"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl\.xz does not exist.*build_corpus"):
        load_documents(path=path)


def test_truncated_xz_stream(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jsonl.xz"
    path.write_bytes(DEFAULT_CORPUS_PATH.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.jsonl\.xz: not a complete xz stream"):
        load_documents(path=path)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(lzma.compress("".join(line + "\n" for line in lines).encode("utf-8")))
    return path


GOOD = {"id": "x/a", "title": "A", "source": "s", "split": "train", "text": "t"}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        pytest.param('{"id": "x/b", "title":', r"line 2: not valid JSON", id="bad-json"),
        pytest.param(json.dumps({**GOOD, "id": "x/b", "extra": "1"}), r"line 2: expected an "
                     r"object with keys", id="extra-key"),
        pytest.param(json.dumps({**GOOD, "id": "x/b", "split": "val"}), r"line 2: split='val'",
                     id="bad-split"),
        pytest.param(json.dumps({**GOOD, "id": "x/b", "text": 3}), r"line 2: every field must "
                     r"be a string", id="non-string"),
        pytest.param(json.dumps(GOOD), r"line 2: duplicate document id 'x/a'", id="dup-id"),
    ],
)  # fmt: skip
def test_corrupt_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write_lines(tmp_path / "corrupt.jsonl.xz", [json.dumps(GOOD), bad_line])
    with pytest.raises(ValueError, match=r"corrupt\.jsonl\.xz, " + message):
        load_documents(path=path)


def test_small_custom_corpus_round_trips(tmp_path: Path) -> None:
    other = {**GOOD, "id": "x/b", "split": "test", "text": "naïve\nline two"}
    path = _write_lines(tmp_path / "small.jsonl.xz", [json.dumps(GOOD), json.dumps(other)])
    assert load_documents(path=path) == [Document(**GOOD), Document(**other)]
    assert load_documents("test", path) == [Document(**other)]
    assert load_documents("dev", path) == []


# --- R serialization: an independent XDR writer for the subset the reader supports ---------


def _int(i: int) -> bytes:
    return struct.pack(">i", i)


def _charsxp(s: str | None, latin1: bool = False) -> bytes:
    if s is None:
        return _int(9) + _int(-1)
    data = s.encode("latin-1" if latin1 else "utf-8")
    return _int(9 | ((1 << 2 if latin1 else 1 << 3) << 12)) + _int(len(data)) + data


def _strsxp(values: list[str | None], attrs: bytes = b"") -> bytes:
    flags = 16 | (1 << 9 if attrs else 0)
    return _int(flags) + _int(len(values)) + b"".join(map(_charsxp, values)) + attrs


def _names_attr(names: list[str]) -> bytes:
    # Pairlist node with a tag: the tag is the symbol `names`, the value a STRSXP; then NILVALUE.
    return _int(2 | (1 << 10)) + _int(1) + _charsxp("names") + _strsxp(names) + _int(254)


def _stream(body: bytes) -> bytes:
    return b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8" + body


def test_unserialize_named_list_with_na_and_encodings() -> None:
    ints = _int(13) + _int(3) + _int(7) + _int(-(2**31)) + _int(-1)
    lgl = _int(10) + _int(2) + _int(1) + _int(0)
    chars = _int(16) + _int(3) + _charsxp("caf\u00e9") + _charsxp(None) + _charsxp("£", True)
    body = _int(19 | (1 << 9)) + _int(3) + ints + lgl + chars + _names_attr(["i", "l", "s"])
    obj = unserialize(_stream(body)).as_dict()
    assert obj["i"].kind == "integer" and obj["i"].value == [7, None, -1]
    assert obj["l"].value == [True, False]
    assert obj["s"].value == ["café", None, "£"]


@pytest.mark.parametrize(
    "data, message",
    [
        pytest.param(b"A\n" + _int(3), r"format b'A\\n'; only XDR", id="ascii-format"),
        pytest.param(_stream(_int(3)), r"unsupported R object: SEXP type 3", id="closure"),
        pytest.param(_stream(_int(16) + _int(2) + _charsxp("a")), r"truncated", id="truncated"),
    ],
)
def test_unserialize_rejects_what_it_cannot_read(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unserialize(data)


def test_lazyload_db_round_trip(tmp_path: Path) -> None:
    lines = ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich"]
    payload = _stream(_strsxp(lines))
    blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
    (tmp_path / "Rdata.rdb").write_bytes(b"junk" + blob)
    location = _int(13) + _int(2) + _int(4) + _int(len(blob))
    variables = _int(19 | (1 << 9)) + _int(1) + location + _names_attr(["emma"])
    compressed = _int(10) + _int(1) + _int(1)
    index = _int(19 | (1 << 9)) + _int(2) + variables + compressed
    index += _names_attr(["variables", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_stream(index)))
    objects = read_lazyload_db(tmp_path / "Rdata.rdx")
    assert list(objects) == ["emma"] and objects["emma"].value == lines
