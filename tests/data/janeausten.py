"""Jane Austen's six novels as plain text, for the data pipeline's tests and benchmark.

Debian's ``r-cran-janeaustenr`` ships them inside R's lazy-load database
(``data/Rdata.rdx`` index + ``Rdata.rdb`` blobs, R serialization format 2/3, XDR). This
module fetches the package with ``apt-get download`` (no R needed), reads the character
vectors with a minimal R unserializer, and caches one ``<book>.txt`` per novel.

    >>> books = austen_books()          # {"emma": "...", "persuasion": "...", ...}

Set ``LLMTRAIN_AUSTEN_CACHE`` to choose the cache directory (default
``~/.cache/llmtrain/janeausten``). Call :func:`available` to skip when apt is unreachable.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_PKG = "r-cran-janeaustenr"
_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTRAIN_AUSTEN_CACHE", Path.home() / ".cache" / "llmtrain" / "janeausten"))


# ------------------------------------------------------------------ R unserialize

_NILVALUE, _REFSXP, _GLOBALENV, _EMPTYENV, _BASEENV, _MISSINGARG, _BASENAMESPACE = (
    254,
    255,
    253,
    242,
    241,
    251,
    247,
)
_NA_INT = -(2**31)


class _RReader:
    """Just enough of R's XDR serialization for data sets of atomic vectors and lists."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        self.d = data
        self.pos = 2
        self.refs: list[Any] = []
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.pos)
        self.pos += 4
        return int(v)

    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if sxp == _NILVALUE or sxp in (_GLOBALENV, _EMPTYENV, _BASEENV, _MISSINGARG, _BASENAMESPACE):
            return None
        if sxp == _REFSXP:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if sxp == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if sxp in (2, 6):  # LISTSXP (pairlist) / LANGSXP
            out: dict[Any, Any] = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                if flags & 0xFF == _NILVALUE:
                    return out
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if sxp == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            s = self.d[self.pos : self.pos + n]
            self.pos += n
            return s.decode("utf-8" if flags & (1 << 15) or flags & (1 << 14) else "latin-1")
        if sxp in (10, 13):  # LGLSXP / INTSXP
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.d, self.pos))
            self.pos += 4 * n
            value: Any = [None if v == _NA_INT else v for v in vals]
        elif sxp == 14:  # REALSXP
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.d, self.pos))
            self.pos += 8 * n
        elif sxp in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP
            n = self.int()
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R SEXP type {sxp} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None and sxp == 19:
                value = dict(zip(names, value, strict=True))
        return value


def _lazyload_blob(rdb: bytes, offset: int, length: int) -> bytes:
    blob = rdb[offset : offset + length]
    # Blob = 4-byte big-endian uncompressed length, then a zlib stream (R's default
    # compress=TRUE); types 2/3 (bzip2/xz) carry a one-byte tag after the length.
    if blob[4:5] in (b"2", b"Z", b"0"):
        import bz2
        import lzma

        tag, body = blob[4:5], blob[5:]
        if tag == b"2":
            return bz2.decompress(body)
        return lzma.decompress(body) if tag == b"Z" else body
    return zlib.decompress(blob[4:])


def read_rdata(data_dir: Path) -> dict[str, list[str]]:
    """Every variable of an R package's lazy-load data base, as Python values."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = _RReader(_lazyload_blob(rdb, int(offset), int(length))).item()
    return out


# ------------------------------------------------------------------ fetch + cache


def _extract_package(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", _PKG]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
        debs = list(Path(tmp).glob(f"{_PKG}_*.deb"))
        if not debs:
            raise RuntimeError(f"`apt-get download {_PKG}` failed: {res.stderr.strip()[-500:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dest)], check=True)
    return dest / _DATA_DIR


def austen_books() -> dict[str, str]:
    """The six novels, one string each (lines joined with \\n, chapters separated by blank lines)."""
    cache = cache_dir()
    if not all((cache / f"{b}.txt").exists() for b in BOOKS):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            data = read_rdata(_extract_package(Path(tmp)))
            for book in BOOKS:
                lines = ["" if line is None else line for line in data[book]]
                part = cache / f"{book}.txt.part"
                part.write_text("\n".join(lines) + "\n", encoding="utf-8")
                part.replace(cache / f"{book}.txt")
    return {b: (cache / f"{b}.txt").read_text(encoding="utf-8") for b in BOOKS}


def available() -> bool:
    """True when the novels are cached or can be fetched (apt-get and dpkg-deb present)."""
    if all((cache_dir() / f"{b}.txt").exists() for b in BOOKS):
        return True
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    try:
        austen_books()
    except (RuntimeError, subprocess.CalledProcessError, OSError):
        return False
    return True
