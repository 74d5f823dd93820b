"""Zip archives without ``zipfile.ZipFile`` objects: a vectorised central-directory parser and
single positioned reads of entries.

Record layouts follow PKWARE's APPNOTE (6.3): local file header (signature ``PK\\3\\4``, 30 bytes
+ name + extra, then the data), central directory file header (``PK\\1\\2``, 46 bytes + name +
extra + comment), end of central directory (``PK\\5\\6``, 22 bytes + comment), ZIP64 end of central
directory record (``PK\\6\\6``) and locator (``PK\\6\\7``), ZIP64 extra field (header id 1).

:func:`read_central_directory` reads the whole central directory with one read and turns it into
flat numpy arrays (no per-entry Python object), so 1.28M entries take about a second instead of
building 1.28M ``ZipInfo`` objects. :func:`read_entry` reads one entry with one ``os.pread`` of
its local header and data (a second read only when the local extra field is longer than the
central one), inflates deflated entries and checks the CRC-32, as ``zipfile`` does.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional
import numpy as np

CENTRAL_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
EOCD_SIG = b"PK\x05\x06"
EOCD64_SIG = b"PK\x06\x06"
EOCD64_LOCATOR_SIG = b"PK\x06\x07"
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_UTF8 = 0x1, 0x800
_U32_MAX = 0xFFFFFFFF
_EOCD = struct.Struct("<4s4H2LH")              # signature, disks, entries (disk, total), cd size, cd offset, comment
_EOCD64 = struct.Struct("<4sQ2H2L4Q")          # ... entries (disk, total), cd size, cd offset
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_LOCAL = struct.Struct("<4s5H3L2H")            # signature, version, flags, method, time, date, crc, sizes, n, m
_CHUNK = 1 << 26                               # bytes scanned per vectorised pass (bounds temporaries)


class BadZip(ValueError):
    """Malformed or truncated zip data (the caller adds the file name)."""


@dataclass
class CentralDirectory:
    """The entries of one zip, as flat arrays in central-directory order.

    ``names.data[name_start[i]: name_start[i] + name_len[i]]`` are entry ``i``'s name as UTF-8 bytes
    (names stored in CP437 without the UTF-8 flag are transcoded, as ``zipfile`` decodes them).
    ``header_guess`` is ``30 + name + central extra`` bytes: where the data would start if the
    local header repeats the central one's fields.
    """

    names: PaddedBytes
    name_start: np.ndarray     # int64
    name_len: np.ndarray       # int64
    flags: np.ndarray          # uint16
    method: np.ndarray         # uint16
    crc: np.ndarray            # uint32
    comp_size: np.ndarray      # int64
    file_size: np.ndarray      # int64
    header_offset: np.ndarray  # int64, absolute position of the local header in the file
    header_guess: np.ndarray   # int64

    def __len__(self) -> int:
        return len(self.name_start)

    def name(self, i: int) -> str:
        return self.names.take(int(self.name_start[i]), int(self.name_len[i])).decode("utf-8", "replace")


def find_pattern(buf: np.ndarray, pattern: bytes) -> np.ndarray:
    """Start positions (int64, ascending) of every occurrence of ``pattern`` in ``buf`` (uint8),
    scanned in chunks so temporaries stay small."""
    k = len(pattern)
    head = 4 if k >= 4 else 1
    key = int.from_bytes(pattern[:head], "little")
    out = []
    for lo in range(0, max(len(buf) - k + 1, 0), _CHUNK):
        hi = min(lo + _CHUNK, len(buf) - k + 1)
        view = stride1_view(buf[lo: hi + head - 1], "<u4") if head == 4 else buf[lo:hi]
        hit = np.flatnonzero(view == key) + lo
        for j in range(head, k):
            hit = hit[buf[hit + j] == pattern[j]]
        out.append(hit)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def stride1_view(buf: np.ndarray, dtype) -> np.ndarray:
    """``view[i]`` = the (little-endian) ``dtype`` value stored at byte ``i`` of ``buf``, unaligned."""
    dt = np.dtype(dtype)
    return np.ndarray((max(len(buf) - dt.itemsize + 1, 0),), dtype=dt, buffer=buf, offset=0, strides=(1,))


class PaddedBytes:
    """Bytes kept in a zero-padded buffer, for string operations 8 bytes a step.

    ``data`` is the uint8 array of the bytes; ``words[i]`` is the little-endian uint64 of the 8
    bytes at ``i`` (zeros past the end), an unaligned view of the same memory (no copy).
    """

    __slots__ = ("data", "words")

    def __init__(self, storage: np.ndarray, n: int) -> None:
        storage[n: n + 8] = 0
        self.data = storage[:n]
        self.words = stride1_view(storage[: n + 8], "<u8")

    @classmethod
    def of(cls, data) -> "PaddedBytes":
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        storage = np.empty(len(raw) + 8, dtype=np.uint8)
        storage[: len(raw)] = raw
        return cls(storage, len(raw))

    @classmethod
    def read(cls, path: str, offset: int = 0, size: Optional[int] = None) -> "PaddedBytes":
        """``size`` bytes of the file at ``offset`` (to the end by default), read straight into the
        padded buffer; fewer when the file is shorter."""
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size - offset if size is None else size
            storage = np.empty(max(size, 0) + 8, dtype=np.uint8)
            f.seek(offset)
            view, got = memoryview(storage)[:max(size, 0)], 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
        return cls(storage, got)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, start: int, length: int) -> bytes:
        return self.data[start: start + length].tobytes()


def _u16(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return stride1_view(buf, "<u2")[pos].astype(np.int64)


def _u32(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return stride1_view(buf, "<u4")[pos].astype(np.int64)


def _end_record(fd: int, size: int) -> tuple[int, int, int, int]:
    """``(entries, cd_size, cd_offset, concat)`` from the (ZIP64) end of central directory.

    ``concat`` is the number of bytes prepended to the archive (self-extracting zips), added to
    every stored offset, as ``zipfile`` does.
    """
    tail_len = min(size, _EOCD.size + 0xFFFF)
    tail = os.pread(fd, tail_len, size - tail_len)
    # The last signature whose comment ends the file; else (trailing bytes) the last whole record.
    pos, fallback = tail.rfind(EOCD_SIG), -1
    while pos >= 0:
        if pos + _EOCD.size <= len(tail):
            if pos + _EOCD.size + _EOCD.unpack_from(tail, pos)[-1] == len(tail):
                break
            fallback = max(fallback, pos)
        pos = tail.rfind(EOCD_SIG, 0, pos)
    pos = pos if pos >= 0 else fallback
    if pos < 0:
        raise BadZip("no end of central directory record (not a zip file, or truncated)")
    _, disk, disk_cd, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
    eocd_pos = size - tail_len + pos
    zip64 = None
    if eocd_pos >= _EOCD64_LOCATOR.size:
        loc = os.pread(fd, _EOCD64_LOCATOR.size, eocd_pos - _EOCD64_LOCATOR.size)
        if loc[:4] == EOCD64_LOCATOR_SIG:
            _, _, _, disks = _EOCD64_LOCATOR.unpack(loc)
            if disks > 1:
                raise BadZip("multi-disk zip archives are not supported")
            start = eocd_pos - _EOCD64_LOCATOR.size - _EOCD64.size
            rec = os.pread(fd, _EOCD64.size, start) if start >= 0 else b""
            if len(rec) != _EOCD64.size or rec[:4] != EOCD64_SIG:
                raise BadZip("ZIP64 end of central directory record is missing or corrupt")
            zip64 = _EOCD64.unpack(rec)
    if zip64 is not None:
        _, _, _, _, disk, disk_cd, _, entries, cd_size, cd_offset = zip64
        concat = eocd_pos - _EOCD64_LOCATOR.size - _EOCD64.size - cd_size - cd_offset
    else:
        concat = eocd_pos - cd_size - cd_offset
    if disk or disk_cd:
        raise BadZip("multi-disk zip archives are not supported")
    if concat < 0 or cd_offset + concat + cd_size > size:
        raise BadZip(f"central directory ({cd_size} bytes at offset {cd_offset}) lies outside the "
                     f"{size}-byte file (truncated?)")
    return entries, cd_size, cd_offset, concat


def _record_starts(buf: np.ndarray) -> np.ndarray:
    """Offsets of the central directory records: vectorised when the signature occurs only at
    record starts (checked: the records chain exactly), else a sequential walk."""
    cand = find_pattern(buf, CENTRAL_SIG)
    cand = cand[cand + 46 <= len(buf)]
    if len(cand):
        nxt = cand + 46 + _u16(buf, cand + 28) + _u16(buf, cand + 30) + _u16(buf, cand + 32)
        if cand[0] == 0 and nxt[-1] == len(buf) and np.array_equal(nxt[:-1], cand[1:]):
            return cand
    starts, pos, data = [], 0, buf.tobytes()
    while pos < len(data):
        if data[pos: pos + 4] != CENTRAL_SIG or pos + 46 > len(data):
            raise BadZip(f"bad central directory record at byte {pos} of the central directory")
        starts.append(pos)
        n, m, k = struct.unpack_from("<3H", data, pos + 28)
        pos += 46 + n + m + k
    if pos != len(data):
        raise BadZip("central directory overruns its recorded size")
    return np.array(starts, dtype=np.int64)


def _apply_zip64(buf: np.ndarray, cd: CentralDirectory, starts: np.ndarray) -> None:
    """Replace 0xFFFFFFFF sizes/offsets by the ZIP64 extra field's values (only those entries)."""
    fields = (cd.file_size, cd.comp_size, cd.header_offset)
    need = np.flatnonzero((cd.file_size == _U32_MAX) | (cd.comp_size == _U32_MAX) | (cd.header_offset == _U32_MAX))
    for i in need.tolist():
        s = int(starts[i])
        n, m = struct.unpack_from("<2H", buf[s + 28: s + 32].tobytes())
        extra = buf[s + 46 + n: s + 46 + n + m].tobytes()
        values = None
        pos = 0
        while pos + 4 <= len(extra):
            hid, hlen = struct.unpack_from("<2H", extra, pos)
            if hid == 1:
                values = extra[pos + 4: pos + 4 + hlen]
                break
            pos += 4 + hlen
        at = 0
        for arr in fields:
            if arr[i] == _U32_MAX:
                if values is None or at + 8 > len(values):
                    raise BadZip(f"entry '{cd.name(i)}': ZIP64 extra field missing or too short")
                arr[i] = struct.unpack_from("<Q", values, at)[0]
                at += 8


def _transcode_cp437(cd: CentralDirectory) -> None:
    """Names with bytes >= 0x80 and no UTF-8 flag are CP437 (as ``zipfile`` reads them): store
    their UTF-8 encoding instead, appended to ``cd.names``."""
    cand = np.flatnonzero((cd.flags & FLAG_UTF8) == 0)
    if not len(cand):
        return
    high = np.zeros(len(cand), dtype=bool)
    n = cd.name_len[cand]
    for j in range(0, int(n.max(initial=0)), 8):
        live = np.flatnonzero(n > j)
        w = masked_words(cd.names.words, cd.name_start[cand[live]] + j, n[live] - j)
        high[live] |= (w & np.uint64(0x8080808080808080)) != 0
    owners = cand[high]
    if not len(owners):
        return
    extra, base = [], len(cd.names)
    for i in owners.tolist():
        text = cd.names.take(int(cd.name_start[i]), int(cd.name_len[i])).decode("cp437").encode("utf-8")
        cd.name_start[i], cd.name_len[i] = base, len(text)
        base += len(text)
        extra.append(text)
    cd.names = PaddedBytes.of(np.concatenate([cd.names.data, np.frombuffer(b"".join(extra), dtype=np.uint8)]))


TAIL_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def masked_words(words: np.ndarray, at: np.ndarray, remaining: np.ndarray) -> np.ndarray:
    """The words at ``at`` with the bytes past each string's end zeroed (``remaining`` >= 1 bytes
    of the string are left from ``at``)."""
    return words[at] & TAIL_MASKS[np.minimum(remaining, 8)]


def read_central_directory(path: str) -> CentralDirectory:
    """All entries of the zip at ``path`` (see :class:`CentralDirectory`); raises :class:`BadZip`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        _, cd_size, cd_offset, concat = _end_record(fd, size)
    finally:
        os.close(fd)
    names = PaddedBytes.read(path, cd_offset + concat, cd_size)
    if len(names) != cd_size:
        raise BadZip("central directory is truncated")
    buf = names.data
    starts = _record_starts(buf)
    name_len = _u16(buf, starts + 28)
    cd = CentralDirectory(
        names=names, name_start=starts + 46, name_len=name_len,
        flags=_u16(buf, starts + 8).astype(np.uint16), method=_u16(buf, starts + 10).astype(np.uint16),
        crc=_u32(buf, starts + 16).astype(np.uint32), comp_size=_u32(buf, starts + 20),
        file_size=_u32(buf, starts + 24), header_offset=_u32(buf, starts + 42),
        header_guess=30 + name_len + _u16(buf, starts + 30))
    _apply_zip64(buf, cd, starts)
    cd.header_offset += concat
    _transcode_cp437(cd)
    return cd


def read_entry(fd: int, header_offset: int, header_guess: int, comp_size: int, file_size: int, method: int,
               crc: int) -> bytes:
    """The uncompressed bytes of one entry: one ``os.pread`` of local header + data (two when the
    local extra field is longer than guessed), inflate if deflated, CRC-32 check.

    Raises :class:`BadZip` for a bad local header, a truncated file, bad compressed data, a size
    or CRC mismatch, or an unsupported compression method.
    """
    want = header_guess + comp_size
    buf = os.pread(fd, want, header_offset)
    if len(buf) < 30 or buf[:4] != LOCAL_SIG:
        raise BadZip(f"no local file header at offset {header_offset} (file truncated or changed)")
    n, m = struct.unpack_from("<2H", buf, 26)
    start = 30 + n + m
    if start + comp_size > len(buf):
        if len(buf) < want:
            raise BadZip(f"entry data truncated ({len(buf)} of {want} bytes at offset {header_offset})")
        buf += os.pread(fd, start + comp_size - len(buf), header_offset + len(buf))
        if start + comp_size > len(buf):
            raise BadZip(f"entry data truncated at offset {header_offset}")
    data = buf[start: start + comp_size]
    if method == DEFLATED:
        try:
            data = zlib.decompressobj(-15).decompress(data)
        except zlib.error as e:
            raise BadZip(f"bad deflate data ({e})") from e
    elif method != STORED:
        raise BadZip(f"unsupported compression method {method}")
    if len(data) != file_size:
        raise BadZip(f"size mismatch ({len(data)} bytes, {file_size} expected)")
    if zlib.crc32(data) != crc:
        raise BadZip("CRC-32 mismatch")
    return data

