"""A small reader for R's serialization format and lazy-load databases (`.rdx` / `.rdb`).

Enough of R's XDR serialization (format versions 2 and 3, as written by `saveRDS` and
`tools:::makeLazyLoadDB`) to read the data sets of an installed R package without R: NULL,
symbols, pairlists, logical / integer / double / character vectors, lists, attributes and
back-references. Anything else (closures, environments, ALTREP objects) raises a `ValueError`
naming the type, rather than being skipped silently.

An installed package keeps its `data/` objects in `Rdata.rdx` (a gzip'd serialization of a list
whose `variables` entry maps each object name to an `(offset, length)` pair) and `Rdata.rdb`
(the concatenated slices). Each slice is a 4-byte big-endian uncompressed length followed by a
zlib stream (or, for `compressed = 2 / 3`, a one-byte method tag and a bzip2 / xz stream) that
holds one serialization. Used by `build_corpus.py` to decode `r-cran-janeaustenr`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes (R Internals, "Serialization Formats").
_NILSXP, _SYMSXP, _LISTSXP, _LANGSXP, _CHARSXP = 0, 1, 2, 6, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP, _EXPRSXP = 10, 13, 14, 16, 19, 20
_REFSXP, _NILVALUE_SXP, _ALTREP_SXP = 255, 254, 238
_EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP = 242, 241, 253
_NA_INT = -(2**31)
_LATIN1_MASK = 1 << 2
_VECTOR_TYPES = {
    _LGLSXP: "logical",
    _INTSXP: "integer",
    _REALSXP: "double",
    _STRSXP: "character",
    _VECSXP: "list",
    _EXPRSXP: "expression",
}


@dataclass
class RObject:
    """One deserialized R value.

    Attributes:
        kind: "null", "symbol", "pairlist", "environment" or an R vector mode ("logical",
            "integer", "double", "character", "list", "expression").
        value: None for NULL; the name for a symbol; a Python list for vectors (NA is None);
            a list of `(tag or None, RObject)` pairs for a pairlist; the environment's name
            ("global", "base", "empty") for the special environments.
        attributes: attribute name -> value, e.g. "names" for a named list.
    """

    kind: str
    value: Any
    attributes: dict[str, RObject] = field(default_factory=dict)

    def names(self) -> list[str | None] | None:
        """The `names` attribute as a list of strings, or None if there is none."""
        names = self.attributes.get("names")
        return None if names is None else list(names.value)

    def as_dict(self) -> dict[str, RObject]:
        """A named list (or pairlist) as a dict from name to element.

        Raises:
            ValueError: if the object is not a list or has no (or duplicate) names.
        """
        if self.kind == "pairlist":
            items = self.value
        elif self.kind in ("list", "expression"):
            names = self.names()
            if names is None or len(names) != len(self.value):
                raise ValueError(f"R {self.kind} has no names attribute; cannot index by name")
            items = list(zip(names, self.value))
        else:
            raise ValueError(f"R object of kind {self.kind!r} is not a list; expected a list")
        out = {k: v for k, v in items if k is not None}
        if len(out) != len(items):
            raise ValueError("R list has missing or duplicate names; cannot index by name")
        return out


class _Reader:
    """Cursor over one XDR serialization stream with R's reference table."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            raise ValueError(f"R serialization format {fmt!r}; only XDR (b'X\\n') is supported")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name, e.g. b"UTF-8"
        elif version != 2:
            raise ValueError(f"R serialization version {version}; expected 2 or 3")

    def item(self) -> RObject:
        flags = self.int()
        sxp, has_attr = flags & 0xFF, bool(flags & (1 << 9))
        if sxp == _NILVALUE_SXP:
            return RObject("null", None)
        if sxp in (_GLOBALENV_SXP, _BASEENV_SXP, _EMPTYENV_SXP):
            name = {_GLOBALENV_SXP: "global", _BASEENV_SXP: "base", _EMPTYENV_SXP: "empty"}[sxp]
            return RObject("environment", name)
        if sxp == _REFSXP:
            index = (flags >> 8) or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R reference {index} out of range (table has {len(self.refs)})")
            return self.refs[index - 1]
        if sxp == _SYMSXP:
            sym = RObject("symbol", self.item().value)
            self.refs.append(sym)
            return sym
        if sxp in (_LISTSXP, _LANGSXP):
            return self.pairlist(flags)
        if sxp == _CHARSXP:
            return RObject("string", self.charsxp(flags))
        if sxp not in _VECTOR_TYPES:
            kind = "ALTREP" if sxp == _ALTREP_SXP else f"SEXP type {sxp}"
            raise ValueError(f"unsupported R object: {kind} at byte {self.pos - 4}")
        n = self.length()
        if sxp == _STRSXP:
            values = [self.charsxp(self.int()) for _ in range(n)]
        elif sxp in (_VECSXP, _EXPRSXP):
            values = [self.item() for _ in range(n)]
        elif sxp == _REALSXP:
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            values = [None if i == _NA_INT else (bool(i) if sxp == _LGLSXP else i) for i in ints]
        obj = RObject(_VECTOR_TYPES[sxp], values)
        if has_attr:
            obj.attributes = self.item().as_dict()
        return obj

    def charsxp(self, flags: int) -> str | None:
        if flags & 0xFF != _CHARSXP:
            raise ValueError(f"expected a CHARSXP at byte {self.pos - 4}, got type {flags & 0xFF}")
        n = self.int()
        if n == -1:
            return None  # NA_character_
        encoding = "latin-1" if (flags >> 12) & _LATIN1_MASK else "utf-8"
        return self.take(n).decode(encoding)

    def pairlist(self, flags: int) -> RObject:
        # Iterate along the CDR chain instead of recursing, so long pairlists cannot overflow.
        items: list[tuple[str | None, RObject]] = []
        attributes: dict[str, RObject] = {}
        while True:
            if flags & (1 << 9):
                attributes.update(self.item().as_dict())
            tag = self.item().value if flags & (1 << 10) else None
            items.append((tag, self.item()))
            flags = self.int()
            if flags & 0xFF == _NILVALUE_SXP:
                return RObject("pairlist", items, attributes)
            if flags & 0xFF not in (_LISTSXP, _LANGSXP):
                raise ValueError(f"dotted pairlist (CDR of type {flags & 0xFF}) is unsupported")


def unserialize(data: bytes) -> RObject:
    """Decode one uncompressed XDR serialization stream (`serialize(x, NULL)` / `saveRDS`).

    Raises:
        ValueError: on a non-XDR stream, an unsupported object type or truncated data.
    """
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_rds(path: str | os.PathLike) -> RObject:
    """Read an `.rds` / `.rdx` file (gzip-compressed or plain XDR serialization)."""
    raw = Path(path).read_bytes()
    return unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def _decompress_slice(blob: bytes, compressed: int, name: str) -> bytes:
    if len(blob) < 5:
        raise ValueError(f"lazy-load slice {name!r} is {len(blob)} bytes; too short")
    size = struct.unpack(">I", blob[:4])[0]
    if compressed == 1:
        out = zlib.decompress(blob[4:])
    else:  # compressed = 2 or 3: one method byte, then the stream
        method, body = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
        if method == b"0":
            out = body
        elif method in decoders:
            out = decoders[method](body)
        else:
            raise ValueError(f"lazy-load slice {name!r}: unknown compression tag {method!r}")
    if len(out) != size:
        raise ValueError(f"lazy-load slice {name!r}: {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(rdx_path: str | os.PathLike) -> dict[str, RObject]:
    """Read every variable of an R lazy-load database.

    Args:
        rdx_path: the index file, e.g. `.../janeaustenr/data/Rdata.rdx`; the data file is the
            same path with suffix `.rdb`.

    Returns:
        Variable name -> decoded object, in the order of the index.

    Raises:
        ValueError: if the index lacks `variables`, a slice cannot be decoded, or an object
            uses an unsupported R type.
    """
    rdx_path = Path(rdx_path)
    index = read_rds(rdx_path).as_dict()
    if "variables" not in index:
        raise ValueError(f"{rdx_path}: no 'variables' entry; entries are {sorted(index)}")
    compressed_obj = index.get("compressed")
    compressed = 1 if compressed_obj is None else int(compressed_obj.value[0])
    if compressed not in (1, 2, 3):
        raise ValueError(f"{rdx_path}: compressed={compressed}; expected 1 (zlib), 2 or 3")
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    out = {}
    for name, loc in index["variables"].as_dict().items():
        offset, length = loc.value
        out[name] = unserialize(_decompress_slice(rdb[offset : offset + length], compressed, name))
    return out
