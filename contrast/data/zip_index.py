"""The index of an ImageNet-Zip layout (one zip or shards): one :data:`ZIP_RECORD` per map entry."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from contrast.data.errors import DatasetError
from contrast.data.index import INDEX_VERSION, file_stamp
from contrast.data.mapfile import MapFile, parse_map
from contrast.data.strings import equal_strings, hash_strings, match_strings
from contrast.data.zipformat import (DEFLATED, FLAG_ENCRYPTED, STORED, TAIL_MASKS, BadZip, PaddedBytes,
                                     find_pattern, masked_words, read_central_directory)

# One record per map entry of a zip layout (40 bytes): where the local header is, how to read and
# check the entry, its label and shard, and where its name is in the map file (for messages).
ZIP_RECORD = np.dtype([("offset", "<i8"), ("name_off", "<i8"), ("comp", "<u4"), ("size", "<u4"), ("crc", "<u4"),
                       ("label", "<i4"), ("shard", "<u2"), ("hdr", "<u2"), ("name_len", "<u2"), ("method", "u1"),
                       ("pad", "u1")])


def _split_shards(root: str, split: str, m: MapFile) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(shard names, shard id per entry, entry name start, entry name length)``.

    One zip ``root/<split>.zip`` when it exists; else every map path is ``<shard>.zip/<entry>``
    with ``<shard>.zip`` relative to ``root`` (shard ids follow the sorted shard names).
    """
    single = f"{split}.zip"
    if os.path.isfile(os.path.join(root, single)):
        return [single], np.zeros(len(m), dtype=np.int64), m.start, m.length
    occ = find_pattern(m.buf, b".zip/")
    at = np.searchsorted(occ, m.start)
    hit = at < len(occ)
    cut = np.where(hit, occ[np.minimum(at, max(len(occ) - 1, 0))] if len(occ) else 0, 0)
    hit &= cut + 5 < m.start + m.length
    zip_path = os.path.join(root, single)
    if not hit.any():
        raise DatasetError(f"{zip_path}: zip file does not exist")
    if not hit.all():
        i = int(np.flatnonzero(~hit)[0])
        raise DatasetError(f"{m.path}:{m.line_of(i)}: path '{m.path_at(i)}' names no shard ('<shard>.zip/<entry>') "
                          f"and {zip_path} does not exist")
    shard_len = cut + 4 - m.start
    h = hash_strings(m.text, m.start, shard_len)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    names = [m.text.take(m.start[i], shard_len[i]).decode("utf-8") for i in first.tolist()]
    rep = first[inverse]
    if not equal_strings(m.text, m.start, shard_len, m.text, m.start[rep], shard_len[rep]).all():
        raise DatasetError(f"{m.path}: shard names collide in the 64-bit hash; rename the shards")  # never seen
    order = np.argsort(names)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return [names[i] for i in order], rank[inverse.ravel()], cut + 5, m.start + m.length - cut - 5


def _detect_prefix(cd, entry: bytes) -> List[int]:
    """Zip entries named ``entry`` exactly, else those ending in ``'/' + entry`` (indices)."""
    target = PaddedBytes.of(entry)
    exact = np.flatnonzero(cd.name_len == len(entry))
    head = target.words[0] & TAIL_MASKS[min(len(entry), 8)]  # cheap first filter: the first 8 bytes
    exact = exact[masked_words(cd.names.words, cd.name_start[exact], cd.name_len[exact]) == head]
    exact = exact[equal_strings(cd.names, cd.name_start[exact], cd.name_len[exact], target,
                                np.zeros(len(exact), dtype=np.int64), np.full(len(exact), len(entry)))]
    if len(exact):
        return [int(exact[-1])]
    suffix = np.frombuffer(b"/" + entry, dtype=np.uint8)
    cand = np.flatnonzero(cd.name_len >= len(suffix))
    tail = cd.name_start[cand] + cd.name_len[cand]
    for j in range(1, len(suffix) + 1):
        keep = cd.names.data[tail - j] == suffix[-j]
        cand, tail = cand[keep], tail[keep]
    return cand.tolist()


def build_zip_index(root: str, split: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Index of the ImageNet-Zip layout ``root/<split>_map.txt`` + ``<split>.zip`` or shards.

    Raises :class:`DatasetError` (message naming the file) for every bad input the datasets report.
    """
    map_path = os.path.join(root, f"{split}_map.txt")
    train_map = os.path.join(root, "train_map.txt")
    sources = [[os.path.basename(map_path), file_stamp(map_path)]] if os.path.isfile(map_path) else []
    m = parse_map(map_path)
    if split == "train":
        num_classes = int(m.labels.max()) + 1
    else:
        if os.path.isfile(train_map):
            sources.append(["train_map.txt", file_stamp(train_map)])
        num_classes = int(parse_map(train_map).labels.max()) + 1
    bad = np.flatnonzero(m.labels >= num_classes)
    if len(bad):
        i = int(bad[0])
        raise DatasetError(f"{map_path}: label {int(m.labels[i])} of '{m.path_at(i)}' is out of range "
                          f"[0, {num_classes}) (num_classes = 1 + max label of {train_map})")
    if num_classes > 2 ** 31 - 1:
        raise DatasetError(f"{map_path}: labels must be < 2^31")
    shards, shard_of, e_start, e_len = _split_shards(root, split, m)
    if len(shards) > 65535:
        raise DatasetError(f"{map_path}: {len(shards)} shards (at most 65535 are supported)")
    if e_len.max() > 65535:
        raise DatasetError(f"{map_path}:{m.line_of(int(e_len.argmax()))}: path longer than 65535 bytes")
    rec = np.zeros(len(m), dtype=ZIP_RECORD)
    rec["label"], rec["shard"], rec["name_off"], rec["name_len"] = m.labels, shard_of, e_start, e_len
    members_of = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[members_of], np.arange(len(shards) + 1))
    prefixes = []
    for s, name in enumerate(shards):
        members = members_of[bounds[s]: bounds[s + 1]]
        path = os.path.join(root, name)
        first = int(members[0])
        if not os.path.isfile(path):
            if len(shards) == 1 and name == f"{split}.zip":
                raise DatasetError(f"{path}: zip file does not exist")
            raise DatasetError(f"{path}: shard listed in {map_path} (line {m.line_of(first)}) does not exist")
        sources.append([name, file_stamp(path)])
        try:
            cd = read_central_directory(path)
        except (BadZip, OSError) as e:
            raise DatasetError(f"{path}: not a readable zip file ({e})") from e
        entry0 = m.text.take(e_start[first], e_len[first])
        hits = _detect_prefix(cd, entry0)
        if len(hits) != 1:
            what = "is missing from" if not hits else f"matches {len(hits)} entries of"
            raise DatasetError(f"{path}: entry '{entry0.decode('utf-8', 'replace')}' (first line of {map_path}"
                              f"{'' if len(shards) == 1 else ' in this shard'}) {what} the zip")
        prefix = cd.name(hits[0])[: len(cd.name(hits[0])) - len(entry0.decode("utf-8"))]
        prefixes.append(prefix)
        z = match_strings(m.text, e_start[members], e_len[members], cd.names, cd.name_start, cd.name_len,
                          prefix.encode("utf-8"))
        missing = np.flatnonzero(z < 0)
        if len(missing):
            i = int(members[missing[0]])
            raise DatasetError(f"{path}: {len(missing)} entries of {map_path} are missing from the zip (entry prefix "
                              f"'{prefix}'), first: '{m.text.take(e_start[i], e_len[i]).decode()}'")
        for what, bad in (("is encrypted (not supported)", (cd.flags[z] & FLAG_ENCRYPTED) != 0),
                          ("uses an unsupported compression method (only stored and deflated entries are read; "
                           "rewrite the zip with tools/make_zip_dataset.py)",
                           (cd.method[z] != STORED) & (cd.method[z] != DEFLATED)),
                          ("is 4 GiB or larger", (cd.file_size[z] > 0xFFFFFFFF) | (cd.comp_size[z] > 0xFFFFFFFF))):
            if bad.any():
                raise DatasetError(f"{path}:{cd.name(int(z[np.argmax(bad)]))}: entry {what}")
        rec["offset"][members] = cd.header_offset[z]
        rec["hdr"][members] = np.minimum(cd.header_guess[z], 65535)
        rec["comp"][members] = cd.comp_size[z]
        rec["size"][members] = cd.file_size[z]
        rec["crc"][members] = cd.crc[z]
        rec["method"][members] = cd.method[z]
        del cd
    meta = {"version": INDEX_VERSION, "kind": "zip", "split": split, "num_classes": num_classes, "size": len(m),
            "map": os.path.basename(map_path), "shards": shards, "prefixes": prefixes, "sources": sources}
    return meta, {"records": rec}
