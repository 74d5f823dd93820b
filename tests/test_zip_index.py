"""Zip central-directory parsing, map parsing, string joins, index files, sharded layouts, staleness,
concurrent builds and the bad-input messages of the indexed datasets (issue 15)."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import struct
import warnings
import zipfile

import numpy as np
import pytest

from benchmarks.data_scale import synthetic_names, write_stored_zip, write_synthetic
from contrast.data import DatasetError, ImageFolderInstance, ZipImageDataset, build_dataset
from contrast.data import folder_index, mapfile, strings, zipformat
from contrast.data import index as index_mod
from contrast.data.index import read_index, write_index
from contrast.data.mapfile import parse_map
from contrast.data.strings import equal_strings, hash_strings, match_strings
from contrast.data.zip_index import ZIP_RECORD
from contrast.data.zipformat import PaddedBytes, find_pattern, read_central_directory, read_entry
from tests.synthetic import make_image_folder


def _read_all(path: str):
    """(name, bytes) of every entry via our parser + reader."""
    cd = read_central_directory(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(cd.name(i), read_entry(fd, int(cd.header_offset[i]), int(cd.header_guess[i]), int(cd.comp_size[i]),
                                        int(cd.file_size[i]), int(cd.method[i]), int(cd.crc[i])))
                for i in range(len(cd))]
    finally:
        os.close(fd)


def _zipfile_all(path: str):
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


# -- zip format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("force_zip64", [False, True])
@pytest.mark.parametrize("utf8", [True, False])
def test_fast_writer_is_read_by_zipfile_and_by_us(tmp_path, force_zip64, utf8):
    names = [f"train/n{c:08d}/n{c:08d}_{k}.JPEG".encode() for c in range(3) for k in range(4)]
    names.append("caf\u00e9.jpg".encode("utf-8" if utf8 else "cp437"))
    entries = [(n, struct.pack("<Q", i) * (i % 3)) for i, n in enumerate(names)]
    path = str(tmp_path / "a.zip")
    assert write_stored_zip(path, entries, force_zip64=force_zip64, utf8=utf8) == len(names)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos][-1] == "caf\u00e9.jpg"  # CP437 0x82 or UTF-8, decoded alike
        assert [zf.read(i) for i in infos] == [d for _, d in entries]
    assert _read_all(path) == _zipfile_all(path)


def test_many_entries_use_zip64_end_record(tmp_path):
    path = str(tmp_path / "big.zip")
    n = 70000  # > 65535 entries: the count only fits the ZIP64 end record
    write_stored_zip(path, ((f"e/{i}".encode(), struct.pack("<I", i)) for i in range(n)))
    with open(path, "rb") as f:
        f.seek(-22 - 20 - 56, os.SEEK_END)
        assert f.read(4) == b"PK\x06\x06"
    with zipfile.ZipFile(path) as zf:
        assert len(zf.infolist()) == n and zf.read("e/69999") == struct.pack("<I", 69999)
    cd = read_central_directory(path)
    assert len(cd) == n and cd.name(n - 1) == "e/69999"


def test_zipfile_archives_all_features(tmp_path):
    path = str(tmp_path / "z.zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/deflated.txt", b"hello " * 500, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("a/stored.bin", bytes(range(256)) * 4)
        zf.writestr("folder/", b"")
        zf.writestr("\u00fcnicode/\u00e9.jpg", b"xyz")
        zf.writestr("empty", b"")
        zf.writestr("dup", b"first")
        with pytest.warns(UserWarning):
            zf.writestr("dup", b"second")
        with zf.open("forced64.bin", "w", force_zip64=True) as f:  # ZIP64 extra in the local header
            f.write(b"q" * 5000)
        zf.writestr("name_with_PK\x01\x02_signature", b"tricky")  # forces the sequential record walk
        zf.comment = b"an archive comment"
    assert _read_all(path) == _zipfile_all(path)
    prepended = str(tmp_path / "sfx.zip")  # self-extracting style: bytes before the archive
    with open(prepended, "wb") as f, open(path, "rb") as g:
        f.write(b"#!/bin/sh\nexit 0\n" + g.read())
    assert _read_all(prepended) == _zipfile_all(prepended)


def test_central_directory_zip64_extra_fields(tmp_path):
    path = str(tmp_path / "z64.zip")
    write_stored_zip(path, [(b"x/1", b"one"), (b"x/2", b"two!")], force_zip64=True)
    cd = read_central_directory(path)
    raw = open(path, "rb").read()
    assert raw.count(b"\xff\xff\xff\xff") >= 2  # offsets really are in the ZIP64 extra field
    assert cd.header_offset.tolist() == [0, 30 + 3 + 3]


@pytest.mark.parametrize("corrupt", ["truncated_end", "not_zip", "empty"])
def test_unreadable_zip_is_reported(tmp_path, corrupt):
    path = str(tmp_path / "a.zip")
    write_stored_zip(path, [(b"a", b"1")])
    data = open(path, "rb").read()
    data = {"truncated_end": data[:-10], "not_zip": b"hello world" * 10, "empty": b""}[corrupt]
    open(path, "wb").write(data)
    with pytest.raises(zipformat.BadZip):
        read_central_directory(path)


def test_read_entry_detects_damage(tmp_path):
    path = str(tmp_path / "a.zip")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("s", b"stored data" * 10)
        zf.writestr("d", b"deflated data" * 100, compress_type=zipfile.ZIP_DEFLATED)
    cd = read_central_directory(path)
    fd = os.open(path, os.O_RDONLY)
    args = [(int(cd.header_offset[i]), int(cd.header_guess[i]), int(cd.comp_size[i]), int(cd.file_size[i]),
             int(cd.method[i]), int(cd.crc[i])) for i in range(2)]
    try:
        off, guess, comp, size, method, crc = args[0]
        with pytest.raises(zipformat.BadZip, match="CRC-32 mismatch"):
            read_entry(fd, off, guess, comp, size, method, crc ^ 1)
        with pytest.raises(zipformat.BadZip, match="no local file header"):
            read_entry(fd, off + 1, guess, comp, size, method, crc)
        with pytest.raises(zipformat.BadZip, match="unsupported compression method 12"):
            read_entry(fd, off, guess, comp, size, 12, crc)
        with pytest.raises(zipformat.BadZip, match="truncated"):
            read_entry(fd, off, guess, os.path.getsize(path), size, method, crc)
        off, guess, comp, size, method, crc = args[1]
        with pytest.raises(zipformat.BadZip, match="size mismatch"):
            read_entry(fd, off, guess, comp, size + 1, method, crc)
        with pytest.raises(zipformat.BadZip, match="bad deflate data"):
            read_entry(fd, args[0][0], args[0][1], args[0][2], size, method, crc)  # stored bytes inflated
        # a local extra field longer than the central one's guess costs a second read, not an error
        assert read_entry(fd, off, guess - 2, comp, size, method, crc) == b"deflated data" * 100
    finally:
        os.close(fd)


def test_find_pattern_across_chunks(monkeypatch):
    monkeypatch.setattr(zipformat, "_CHUNK", 7)
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 3, 500).astype(np.uint8)
    for pat in (b"\x01", b"\x01\x02", b"\x00\x01\x02\x00", b"\x01\x01\x02\x00\x01", b"\x00" * 6):
        brute = [i for i in range(len(buf) - len(pat) + 1) if buf[i:i + len(pat)].tobytes() == pat]
        assert find_pattern(buf, pat).tolist() == brute


# -- strings and maps -----------------------------------------------------------------------------


def _strings(items):
    data = b"".join(items)
    lengths = np.array([len(x) for x in items], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return PaddedBytes.of(data), starts, lengths


def test_string_hash_equality_and_join():
    rng = np.random.default_rng(1)
    keys = [bytes(rng.integers(97, 100, rng.integers(0, 30))) for _ in range(400)] + [b"dup", b"dup", b"x" * 40000]
    queries = keys[::3] + [b"missing!", b"dup", b""]
    kb, ks, kl = _strings([b"pre/" + k for k in keys])
    qb, qs, ql = _strings(queries)
    found = match_strings(qb, qs, ql, kb, ks, kl, b"pre/")
    last = {k: i for i, k in enumerate(keys)}  # zipfile keeps the last entry of a name
    assert found.tolist() == [last.get(q, -1) for q in queries]
    h = hash_strings(kb, ks + 4, kl - 4)
    for i in range(len(keys)):
        for j in range(0, len(keys), 37):
            assert (h[i] == h[j]) == (keys[i] == keys[j])  # no collision among these few
    same = equal_strings(qb, qs, ql, qb, qs[::-1].copy(), ql[::-1].copy())
    assert same.tolist() == [a == b for a, b in zip(queries, queries[::-1])]


def test_join_survives_hash_collisions(monkeypatch):
    monkeypatch.setattr(strings, "hash_strings", lambda buf, start, length: np.zeros(len(start), dtype=np.uint64))
    keys = [b"a", b"bb", b"ccc", b"bb"]
    kb, ks, kl = _strings(keys)
    qb, qs, ql = _strings([b"ccc", b"bb", b"zz", b"a"])
    assert match_strings(qb, qs, ql, kb, ks, kl).tolist() == [2, 3, -1, 0]


def _reference_map(text: str):
    """(path, label, line number) by hand: universal newlines, blank lines skipped."""
    out = []
    for lineno, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if line.strip():
            path, label = line.split("\t")
            out.append((path, int(label), lineno))
    return out


@pytest.mark.parametrize("text", [
    "a/b.jpg\t0\nc/d.jpg\t12\n",                       # regular: vectorised parser
    "a/b.jpg\t0\r\nc/d.jpg\t12\r\n\r\ne\t3",           # CRLF, blank line, no final newline
    "a/b.jpg\t0\n   \nc/d.jpg\t 7\n",                  # whitespace-only line and ' 7' label: line parser
    "x\t1\ry\t2\r",                                     # old Mac line ends: line parser
    "\u00e9t\u00e9/\u00e0.jpg\t0012\n",                 # UTF-8 path, leading zeros
])
def test_parse_map(tmp_path, text):
    path = tmp_path / "m.txt"
    path.write_bytes(text.encode("utf-8"))
    m = parse_map(str(path))
    got = [(m.path_at(i), int(m.labels[i]), m.line_of(i)) for i in range(len(m))]
    assert got == _reference_map(text)
    for i in range(len(m)):  # offsets point into the file (the datasets read names from there)
        assert path.read_bytes()[m.start[i]: m.start[i] + m.length[i]].decode() == got[i][0]


def test_fast_and_line_parsers_agree_on_large_map(tmp_path, monkeypatch):
    monkeypatch.setattr(mapfile, "_SCAN", 1000)  # many scan chunks, lines cut at chunk edges
    rng = np.random.default_rng(3)
    lines = [f"n{rng.integers(0, 99):02d}/{'x' * int(rng.integers(1, 40))}_{i}.JPEG\t{rng.integers(0, 10 ** 6)}"
             for i in range(5000)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "m.txt"
    path.write_text(text)
    fast = parse_map(str(path))
    assert fast.lines is None  # the vectorised parser ran
    slow = mapfile._parse_map_lines(str(path), PaddedBytes.of(text.encode()))
    for a, b in ((fast.start, slow.start), (fast.length, slow.length), (fast.labels, slow.labels)):
        np.testing.assert_array_equal(a, b)
    assert [fast.line_of(i) for i in (0, 17, 4999)] == [1, 18, 5000]


# -- index files -----------------------------------------------------------------------------------


def test_index_file_round_trip_and_damage(tmp_path):
    rec = np.zeros(5, dtype=ZIP_RECORD)
    rec["offset"] = [1, 2, 3, 2 ** 40, 5]
    rec["label"] = [0, 1, 2, 3, 4]
    path = str(tmp_path / "x.idx")
    write_index(path, {"hello": [1, "two"]}, {"records": rec, "blob": np.arange(7, dtype=np.uint8)})
    index = read_index(path)
    meta, arrays = index.meta, index.arrays
    assert meta == {"hello": [1, "two"]} and index.path == path
    np.testing.assert_array_equal(arrays["records"], rec)
    assert arrays["blob"].tolist() == list(range(7)) and not arrays["records"].flags.writeable
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-40])
    with pytest.raises(ValueError, match="truncated"):
        read_index(path)
    open(path, "wb").write(b"something else entirely")
    with pytest.raises(ValueError, match="not an index file"):
        read_index(path)


# -- datasets on zip layouts -------------------------------------------------------------------------


def _entry_values(ds):
    return [struct.unpack("<Q", ds.read_bytes(i))[0] for i in range(len(ds))]


@pytest.mark.parametrize("shards", [0, 3])
def test_synthetic_layouts_read_every_entry(tmp_path, shards):
    root = str(tmp_path / "d")
    write_synthetic(root, 500, shards=shards)
    ds = ZipImageDataset(root, "train")
    assert len(ds) == 500 and len(ds.shards) == max(shards, 1) and ds.prefix == "train/"
    assert _entry_values(ds) == list(range(500))
    expected = list(synthetic_names(500))
    assert ds.targets == [label for _, label in expected] and ds.num_classes == expected[-1][1] + 1
    shard = f"train-{(499 * shards) // 500:05d}.zip" if shards else "train.zip"
    assert ds.describe(499) == f"{root}/{shard}:train/{expected[499][0]}"
    assert os.path.exists(os.path.join(root, "train_map.idx"))
    again = ZipImageDataset(root, "train")  # loaded from the index file, not rebuilt
    assert again.index_path == ds.index_path and _entry_values(again) == list(range(500))


def _write_shards(root, layout, map_lines):
    """``layout``: {zip name: [(entry name, bytes)]}; the map file gets ``map_lines``."""
    os.makedirs(root, exist_ok=True)
    for name, entries in layout.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with zipfile.ZipFile(os.path.join(root, name), "w") as zf:
            for entry, data in entries:
                zf.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED if len(data) > 3 else zipfile.ZIP_STORED)
    with open(os.path.join(root, "train_map.txt"), "w") as f:
        f.write("".join(line + "\n" for line in map_lines))


def test_shards_in_subfolder_with_own_prefixes(tmp_path):
    root = str(tmp_path / "d")
    _write_shards(root, {"shards/b.zip": [("top/x/1.jpg", b"one!"), ("top/x/2.jpg", b"two")],
                         "shards/a.zip": [("y/3.jpg", b"three"), ("y/4.jpg", b"four")]},
                  ["shards/b.zip/x/2.jpg\t1", "shards/a.zip/y/4.jpg\t0", "shards/b.zip/x/1.jpg\t1",
                   "shards/a.zip/y/3.jpg\t2"])
    ds = ZipImageDataset(root, "train", cache_mode="no")
    assert [ds.read_bytes(i) for i in range(4)] == [b"two", b"four", b"one!", b"three"]
    assert ds.prefixes == ["", "top/"] and ds.prefix is None  # shards sorted by name: a.zip, b.zip
    assert ds.targets == [1, 0, 1, 2]
    assert ds.describe(0) == f"{root}/shards/b.zip:top/x/2.jpg"
    for mode in ("full", "part"):
        cached = ZipImageDataset(root, "train", cache_mode=mode, rank=1, world_size=2)
        local = range(4) if mode == "full" else cached.local_indices.tolist()
        assert [cached.read_bytes(i) for i in local] == [[b"two", b"four", b"one!", b"three"][i] for i in local]


def test_shard_errors(tmp_path):
    root = str(tmp_path / "d")
    _write_shards(root, {"s0.zip": [("a.jpg", b"1")]}, ["s0.zip/a.jpg\t0", "s1.zip/b.jpg\t0"])
    with pytest.raises(DatasetError, match=re.escape(f"{root}/s1.zip: shard listed in {root}/train_map.txt "
                                                     f"(line 2) does not exist")):
        ZipImageDataset(root, "train")
    _write_shards(root, {"s0.zip": [("a.jpg", b"1")]}, ["s0.zip/a.jpg\t0", "b.jpg\t0"])
    with pytest.raises(DatasetError, match=re.escape(f"{root}/train_map.txt:2: path 'b.jpg' names no shard "
                                                     f"('<shard>.zip/<entry>') and {root}/train.zip does not exist")):
        ZipImageDataset(root, "train")
    _write_shards(root, {"s0.zip": [("a.jpg", b"1")]}, ["s0.zip/a.jpg\t0", "s0.zip/ghost.jpg\t0"])
    with pytest.raises(DatasetError, match=re.escape(f"{root}/s0.zip: 1 entries of {root}/train_map.txt are missing "
                                                     f"from the zip (entry prefix ''), first: 'ghost.jpg'")):
        ZipImageDataset(root, "train")


def test_index_older_than_zip_is_rebuilt(tmp_path):
    root = str(tmp_path / "d")
    _write_shards(root, {"train.zip": [("a", b"old-a"), ("b", b"old-b")]}, ["a\t0", "b\t1"])
    assert [ZipImageDataset(root, "train").read_bytes(i) for i in range(2)] == [b"old-a", b"old-b"]
    idx = os.path.join(root, "train_map.idx")
    with zipfile.ZipFile(os.path.join(root, "train.zip"), "w") as zf:  # rewritten: new offsets and sizes
        zf.writestr("b", b"new b, longer")
        zf.writestr("a", b"new a")
    st = os.stat(idx)
    os.utime(os.path.join(root, "train.zip"), ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.warns(RuntimeWarning, match=re.escape(f"{idx}: index is out of date ({root}/train.zip was modified "
                                                      f"after the index was written); rebuilding it")):
        ds = ZipImageDataset(root, "train")
    assert [ds.read_bytes(i) for i in range(2)] == [b"new a", b"new b, longer"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZipImageDataset(root, "train")  # fresh again: no warning
    open(idx, "wb").write(open(idx, "rb").read()[:100])
    with pytest.warns(RuntimeWarning, match=re.escape(f"{idx}: index file is unreadable")):
        assert ZipImageDataset(root, "train").read_bytes(0) == b"new a"


def test_zip_truncated_after_indexing(tmp_path):
    root = str(tmp_path / "d")
    os.makedirs(root)
    path = os.path.join(root, "train.zip")
    write_stored_zip(path, [(b"a", b"x" * 100), (b"b", b"y" * 100)])
    with open(os.path.join(root, "train_map.txt"), "w") as f:
        f.write("a\t0\nb\t0\n")
    ds = ZipImageDataset(root, "train", strict=True)
    with open(path, "r+b") as f:
        f.truncate(200)  # cuts into the data of entry b (header at 131) and loses the central directory
    with pytest.raises(DatasetError, match=re.escape(f"{path}:b: cannot read or decode image (BadZipFile: entry data "
                                                     f"truncated")):
        ds[1]  # an open dataset: the read fails, naming the entry...
    with pytest.warns(RuntimeWarning, match="out of date"), \
            pytest.raises(DatasetError, match=re.escape(f"{path}: not a readable zip file (no end of central "
                                                        f"directory record")):
        ZipImageDataset(root, "train")  # ...and a new one rebuilds the index and names the damage


@pytest.mark.parametrize("field,value,message", [(8, 1, "is encrypted"),
                                                 (10, 12, "uses an unsupported compression method")])
def test_unsupported_entries(tmp_path, field, value, message):
    root = str(tmp_path / "d")
    _write_shards(root, {"train.zip": [("a", b"1")]}, ["a\t0"])
    path = os.path.join(root, "train.zip")
    data = bytearray(open(path, "rb").read())
    at = data.index(b"PK\x01\x02")
    data[at + field: at + field + 2] = struct.pack("<H", value)
    open(path, "wb").write(bytes(data))
    with pytest.raises(DatasetError, match=re.escape(f"{path}:a: entry {message}")):
        ZipImageDataset(root, "train")


def test_cp437_names_match_utf8_map(tmp_path):
    root = str(tmp_path / "d")
    os.makedirs(root)
    write_stored_zip(os.path.join(root, "train.zip"), [("caf\u00e9/1.jpg".encode("cp437"), b"e")], utf8=False)
    with open(os.path.join(root, "train_map.txt"), "w", encoding="utf-8") as f:
        f.write("caf\u00e9/1.jpg\t0\n")
    ds = ZipImageDataset(root, "train")
    assert ds.read_bytes(0) == b"e" and ds.describe(0).endswith(":caf\u00e9/1.jpg")


def test_read_only_data_folder_uses_cache_dir(tmp_path, monkeypatch):
    root = str(tmp_path / "d")
    write_synthetic(root, 20)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real = index_mod.write_index

    def refuse_root(path, meta, arrays):
        if os.path.dirname(path) == root:
            raise PermissionError(13, "Permission denied")
        real(path, meta, arrays)

    monkeypatch.setattr(index_mod, "write_index", refuse_root)
    ds = ZipImageDataset(root, "train")
    assert ds.index_path.startswith(str(tmp_path / "home" / ".cache" / "contrast" / "index"))
    assert _entry_values(ds) == list(range(20)) and not os.path.exists(os.path.join(root, "train_map.idx"))
    assert ZipImageDataset(root, "train").index_path == ds.index_path
    explicit = ZipImageDataset(root, "train", index_dir=str(tmp_path / "idx"))
    assert os.path.dirname(explicit.index_path) == str(tmp_path / "idx")
    monkeypatch.setattr(index_mod, "write_index", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only")))
    with pytest.warns(RuntimeWarning, match="cannot write a dataset index"):
        mem = ZipImageDataset(root, "train", index_dir=str(tmp_path / "nowhere"))
    assert mem.index_path is None and _entry_values(pickle.loads(pickle.dumps(mem))) == list(range(20))


def _open_dataset(root, queue):
    ds = ZipImageDataset(root, "train")
    queue.put((ds.index_path, _entry_values(ds)))


def test_concurrent_ranks_build_one_index(tmp_path):
    root = str(tmp_path / "d")
    write_synthetic(root, 3000, shards=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_dataset, args=(root, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == (os.path.join(root, "train_map.idx"), list(range(3000))) for r in results)
    assert sorted(os.listdir(root)) == ["train-00000.zip", "train-00001.zip", "train_map.idx", "train_map.txt"]


def test_pickled_dataset_maps_the_index_again(tmp_path):
    root = str(tmp_path / "d")
    write_synthetic(root, 2000)
    ds = ZipImageDataset(root, "train")
    ds.read_bytes(3)
    blob = pickle.dumps(ds)
    assert len(blob) < 20000  # no copy of the 2000 records, no descriptors
    clone = pickle.loads(blob)
    assert _entry_values(clone) == list(range(2000)) and clone.targets == ds.targets


# -- folder layout ---------------------------------------------------------------------------------


def test_folder_list_is_cached_and_refreshed(tmp_path, monkeypatch):
    root = make_image_folder(str(tmp_path / "f"), num_classes=2, per_class=2, splits=("train",))
    first = ImageFolderInstance(root, "train")
    assert os.path.exists(os.path.join(root, "train_files.idx")) and len(first) == 4

    def no_scan(*args):
        raise AssertionError("folder scanned again")

    monkeypatch.setattr(folder_index, "scan_folder", no_scan)
    again = ImageFolderInstance(root, "train")
    assert [again.describe(i) for i in range(4)] == [first.describe(i) for i in range(4)]
    monkeypatch.undo()
    new = os.path.join(root, "train", "class_1", "img_9.png")
    os.link(os.path.join(root, "train", "class_1", "img_0.png"), new)
    with pytest.warns(RuntimeWarning, match=re.escape(f"{root}/train/class_1 was modified after the index")):
        ds = build_dataset(root, "train", False, "no", None)
    assert len(ds) == 5 and ds.describe(4) == new and ds.targets == [0, 0, 1, 1, 1]
