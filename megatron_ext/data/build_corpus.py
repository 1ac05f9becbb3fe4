"""Rebuild the embedded corpus `assets/corpus.jsonl.xz` from Debian bookworm packages.

    python -m megatron_ext.data.build_corpus [--out megatron_ext/data/assets] [--debs DIR]

Recipe of docs/data.md (contents, split, provenance), with no R and no network beyond
`apt-get download`:

- Austen: the six novels of `r-cran-janeaustenr`, decoded from the package's lazy-load
  database (`data/Rdata.rdx` / `.rdb`) by `rdata.py`; one document per novel, the package's
  lines joined with "\\n" and otherwise verbatim (Gutenberg-style hard wraps, `_italics_`).
- KJV: the package's own `bible` program prints every verse as "Ge1:1 In the beginning ...";
  its first output line is a random verse and is dropped. One document per book: a title line,
  then each chapter as a "Chapter N" heading ("Psalm N" in Psalms) and one verse per line, with
  the verse references removed (they would add ~213k tokens, 20% of the KJV, of numbering).
- Bierce: The Devil's Dictionary from `dict-devil`'s dictd database; the preface, then the
  entries in file order, with dictd's `{CROSS-REFERENCE}` braces removed.

Output is deterministic: a fixed document order, fixed key order, and xz preset 9e.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from megatron_ext.data.corpus import DEFAULT_CORPUS_PATH
from megatron_ext.data.rdata import read_lazyload_db

PACKAGES = {
    "r-cran-janeaustenr": "1.0.0-1",
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "dict-devil": "1.0-13.1",
}
AUSTEN_SOURCE = f"r-cran-janeaustenr {PACKAGES['r-cran-janeaustenr']}"
KJV_SOURCE = f"bible-kjv-text {PACKAGES['bible-kjv-text']}"
BIERCE_SOURCE = f"dict-devil {PACKAGES['dict-devil']}"

# (R variable, slug, title), in order of publication.
AUSTEN_NOVELS = (
    ("sensesensibility", "sense-and-sensibility", "Sense and Sensibility"),
    ("prideprejudice", "pride-and-prejudice", "Pride and Prejudice"),
    ("mansfieldpark", "mansfield-park", "Mansfield Park"),
    ("emma", "emma", "Emma"),
    ("northangerabbey", "northanger-abbey", "Northanger Abbey"),
    ("persuasion", "persuasion", "Persuasion"),
)
# `bible` program's book abbreviation and the book's title, in canonical order.
_KJV_TABLE = """
Ge:Genesis  Exo:Exodus  Lev:Leviticus  Num:Numbers  Deu:Deuteronomy  Josh:Joshua  Jdgs:Judges
Ruth:Ruth  1Sm:1 Samuel  2Sm:2 Samuel  1Ki:1 Kings  2Ki:2 Kings  1Chr:1 Chronicles
2Chr:2 Chronicles  Ezra:Ezra  Neh:Nehemiah  Est:Esther  Job:Job  Psa:Psalms  Prv:Proverbs
Eccl:Ecclesiastes  SSol:Song of Solomon  Isa:Isaiah  Jer:Jeremiah  Lam:Lamentations
Eze:Ezekiel  Dan:Daniel  Hos:Hosea  Joel:Joel  Amos:Amos  Obad:Obadiah  Jonah:Jonah  Mic:Micah
Nahum:Nahum  Hab:Habakkuk  Zep:Zephaniah  Hag:Haggai  Zec:Zechariah  Mal:Malachi
Mat:Matthew  Mark:Mark  Luke:Luke  John:John  Acts:Acts  Rom:Romans  1Cor:1 Corinthians
2Cor:2 Corinthians  Gal:Galatians  Eph:Ephesians  Phi:Philippians  Col:Colossians
1Th:1 Thessalonians  2Th:2 Thessalonians  1Tim:1 Timothy  2Tim:2 Timothy  Titus:Titus
Phmn:Philemon  Heb:Hebrews  Jas:James  1Pet:1 Peter  2Pet:2 Peter  1Jn:1 John  2Jn:2 John
3Jn:3 John  Jude:Jude  Rev:Revelation
"""
KJV_BOOKS = tuple(tuple(e.split(":")) for e in re.split(r"\s{2,}|\n", _KJV_TABLE.strip()))
KJV_VERSES = 31102
# Held-out books (docs/data.md, "Contents and split"); everything else is train.
TEST_IDS = frozenset(
    ("austen/emma", "austen/persuasion")
    + ("kjv/joshua", "kjv/psalms", "kjv/isaiah", "kjv/luke", "kjv/acts")
)
DEV_IDS = frozenset({"austen/northanger-abbey"})

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def split_of(doc_id: str) -> str:
    """The split a document belongs to (docs/data.md): "train", "dev" or "test"."""
    return "test" if doc_id in TEST_IDS else "dev" if doc_id in DEV_IDS else "train"


def _document(doc_id: str, title: str, source: str, text: str) -> dict[str, str]:
    return {"id": doc_id, "title": title, "source": source, "split": split_of(doc_id), "text": text}


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def unpack_packages(work_dir: Path, deb_dir: Path | None, console: Console) -> Path:
    """Fetch (`apt-get download`) or reuse the pinned .debs and extract them; returns the root.

    Raises:
        FileNotFoundError: if `deb_dir` lacks one of the pinned packages.
        subprocess.CalledProcessError: if `apt-get download` or `dpkg-deb` fails.
    """
    if deb_dir is None:
        deb_dir = work_dir / "debs"
        deb_dir.mkdir()
        pins = [f"{name}={version}" for name, version in PACKAGES.items()]
        console.print(f"apt-get download {' '.join(pins)}")
        subprocess.run(["apt-get", "download", *pins], cwd=deb_dir, check=True)
    root = work_dir / "root"
    for name, version in PACKAGES.items():
        debs = sorted(deb_dir.glob(f"{name}_{version}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"no {name}_{version}_<arch>.deb in {deb_dir}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return root


def austen_documents(root: Path, progress: Progress) -> list[dict[str, str]]:
    """Austen's six novels, one document each, from the package's `Rdata.rdx` / `.rdb`."""
    rdx = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
    task = progress.add_task("Austen novels", total=len(AUSTEN_NOVELS))
    objects = read_lazyload_db(rdx)
    docs = []
    for var, slug, title in AUSTEN_NOVELS:
        lines = objects[var].value
        if objects[var].kind != "character" or any(line is None for line in lines):
            raise ValueError(f"{rdx}: {var!r} is not a character vector without NA")
        docs.append(_document(f"austen/{slug}", title, AUSTEN_SOURCE, "\n".join(lines)))
        progress.advance(task)
    return docs


def kjv_documents(root: Path, progress: Progress) -> list[dict[str, str]]:
    """The 66 books of the KJV, one document each, printed by the package's `bible` program."""
    cmd = [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f", "off"]
    result = subprocess.run([*cmd, "Gen1:1-Rev22:21"], capture_output=True, check=True)
    lines = result.stdout.decode("utf-8").splitlines()[1:]  # line 1 is a random verse
    if len(lines) != KJV_VERSES:
        raise ValueError(f"bible printed {len(lines)} verses after line 1; expected {KJV_VERSES}")
    task = progress.add_task("KJV verses", total=len(lines))
    books: list[tuple[str, list[list[str]]]] = []  # (abbreviation, chapters of verses)
    for line in lines:
        m = _VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected bible output line {line!r}")
        abbrev, chapter, verse, text = m[1], int(m[2]), int(m[3]), m[4].strip()
        if not books or books[-1][0] != abbrev:
            books.append((abbrev, []))
        chapters = books[-1][1]
        if chapter == len(chapters) + 1 and verse == 1:
            chapters.append([])
        if not chapters or (chapter, verse) != (len(chapters), len(chapters[-1]) + 1):
            raise ValueError(f"verse out of sequence at {line[:20]!r}")
        chapters[-1].append(text)
        progress.advance(task)
    abbrevs = tuple(abbrev for abbrev, _ in books)
    if abbrevs != tuple(abbrev for abbrev, _ in KJV_BOOKS):
        raise ValueError(f"bible printed books {abbrevs}; expected {KJV_BOOKS}")
    docs = []
    for (_, chapters), (_, title) in zip(books, KJV_BOOKS):
        heading = "Psalm" if title == "Psalms" else "Chapter"
        parts = [title] + [
            f"{heading} {i}\n\n" + "\n".join(verses) for i, verses in enumerate(chapters, 1)
        ]
        docs.append(_document(f"kjv/{_slug(title)}", title, KJV_SOURCE, "\n\n".join(parts)))
    return docs


def _dict_number(code: str) -> int:
    value = 0
    for ch in code:
        value = value * 64 + _DICT_B64.index(ch)
    return value


def bierce_document(root: Path, progress: Progress) -> dict[str, str]:
    """The Devil's Dictionary as one document, from `dict-devil`'s dictd index and data."""
    share = root / "usr/share/dictd"
    data = gzip.decompress((share / "devil.dict.dz").read_bytes()).decode("utf-8")
    spans = {}  # headword -> (offset, length); a few headwords share one entry
    for row in (share / "devil.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = row.split("\t")
        spans[headword] = (_dict_number(offset), _dict_number(length))
    info_offset, info_length = spans["00databaseinfo"]
    info = data[info_offset : info_offset + info_length]
    if "PREFACE" not in info:
        raise ValueError("dict-devil: no PREFACE in the database info entry")
    entries = sorted({span for word, span in spans.items() if not word.startswith("00database")})
    task = progress.add_task("Bierce entries", total=len(entries))
    parts = ["THE DEVIL'S DICTIONARY\n\nby Ambrose Bierce", info[info.index("PREFACE") :].strip()]
    for offset, length in entries:
        parts.append(re.sub(r"\{([^{}]*)\}", r"\1", data[offset : offset + length]).strip("\n"))
        progress.advance(task)
    text = "\n\n".join(parts)
    return _document("bierce/devils-dictionary", "The Devil's Dictionary", BIERCE_SOURCE, text)


def write_corpus(docs: list[dict[str, str]], path: Path, progress: Progress) -> int:
    """Write `docs` as xz (preset 9e) JSON Lines to `path` atomically; returns the byte size."""
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    compressor = lzma.LZMACompressor(lzma.FORMAT_XZ, lzma.CHECK_CRC64, 9 | lzma.PRESET_EXTREME)
    task = progress.add_task("xz -9e", total=len(payload))
    chunks, step = [], 1 << 20
    for start in range(0, len(payload), step):
        chunks.append(compressor.compress(payload[start : start + step]))
        progress.advance(task, min(step, len(payload) - start))
    chunks.append(compressor.flush())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_CORPUS_PATH.parent,
        help="directory for corpus.jsonl.xz (default: the package's assets)",
    )
    parser.add_argument(
        "--debs",
        type=Path,
        default=None,
        help="directory holding the pinned .debs (default: apt-get download)",
    )
    args = parser.parse_args(argv)
    console = Console()
    work_dir = Path(tempfile.mkdtemp(prefix="megatron_ext_corpus_"))
    try:
        root = unpack_packages(work_dir, args.debs, console)
        with Progress(console=console) as progress:
            docs = austen_documents(root, progress) + kjv_documents(root, progress)
            docs.append(bierce_document(root, progress))
            size = write_corpus(docs, args.out / DEFAULT_CORPUS_PATH.name, progress)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for split in ("train", "dev", "test"):
        part = [d for d in docs if d["split"] == split]
        n_bytes = sum(len(d["text"].encode("utf-8")) for d in part)
        console.print(f"{split:>5}: {len(part):3d} documents, {n_bytes:,} bytes of text")
    console.print(f"wrote {args.out / DEFAULT_CORPUS_PATH.name} ({size:,} bytes)")


if __name__ == "__main__":
    main()
