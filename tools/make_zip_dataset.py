#!/usr/bin/env python
"""Convert a folder dataset (``src/<split>/<class>/<image>``) into the ImageNet-Zip layout.

Writes ``dst/<split>.zip`` (entries ``<class>/<file>``) and ``dst/<split>_map.txt``
(``<class>/<file><TAB><label>``, labels = sorted class folders of ``src/train``, exactly as
``ImageFolderInstance`` numbers them), streaming one file at a time (already compressed formats
are stored, others deflated). With ``--shard-size K`` the images go to shards
``dst/<split>-00000.zip, <split>-00001.zip, ...`` of K images each and the map names the shard:
``<split>-00000.zip/<class>/<file><TAB><label>`` (for 10M+ images: no single huge archive).

Each output is written under a temporary name and renamed when complete. Then the dataset index
``dst/<split>_map.idx`` is built (every map entry resolved in the zips, labels in range), every
entry is read back (CRC check) and, with ``--verify decode``, decoded.

Example::

    python tools/make_zip_dataset.py --src data/ImageNet --dst data/ImageNet-Zip
    python tools/make_zip_dataset.py --src data/Big --dst data/Big-Zip --shard-size 100000
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import zipfile
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrast.data.datasets import ZipImageDataset, scan_image_folder  # noqa: E402
from contrast.data.errors import DatasetError  # noqa: E402
from contrast.logger import Progress  # noqa: E402
from contrast.option import new_parser  # noqa: E402


def make_zip_parser(doc: str = "") -> argparse.ArgumentParser:
    """``tools/make_zip_dataset.py``."""
    p = new_parser("make_zip_dataset.py", doc)
    p.add_argument("--src", required=True, help="folder dataset root holding <split>/<class>/<image>")
    p.add_argument("--dst", required=True, help="output folder for <split>.zip (or shards) and <split>_map.txt")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="splits to convert")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per zip: write <split>-00000.zip, <split>-00001.zip, ... (default: one zip)")
    p.add_argument("--verify", choices=["decode", "crc", "none"], default="decode",
                   help="after writing and indexing: read every entry back (crc) and also decode it (decode)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def parse_make_zip_args(argv: Optional[Sequence[str]] = None, doc: str = "") -> argparse.Namespace:
    p = make_zip_parser(doc)
    args = p.parse_args(argv)
    if args.shard_size is not None and args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    return args


_STORED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.zip"


def existing_outputs(dst: str, split: str) -> List[str]:
    """Files of ``split`` a previous run may have left in ``dst`` (single zip, shards, map, index)."""
    names = [f"{split}.zip", f"{split}_map.txt", f"{split}_map.idx"]
    found = [os.path.join(dst, n) for n in names if os.path.exists(os.path.join(dst, n))]
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}\.zip$")
    return found + sorted(p for p in glob.glob(os.path.join(glob.escape(dst), f"{split}-*.zip"))
                          if pattern.match(os.path.basename(p)))


def write_split(src: str, dst: str, split: str, shard_size: Optional[int] = None) -> int:
    """Write the zip(s) and ``dst/<split>_map.txt`` from ``src/<split>``; returns the image count."""
    paths, labels, _ = scan_image_folder(src, split)
    map_path = os.path.join(dst, f"{split}_map.txt")
    per = shard_size or len(paths)
    zips = [shard_name(split, k) if shard_size else f"{split}.zip" for k in range(-(-len(paths) // per))]
    try:
        with open(map_path + ".tmp", "w", encoding="utf-8") as mf, \
                Progress(f"writing {split}", total=len(paths), unit="img") as bar:
            for k, name in enumerate(zips):
                with zipfile.ZipFile(os.path.join(dst, name) + ".tmp", "w", allowZip64=True) as zf:
                    for rel, label in zip(paths[k * per:(k + 1) * per], labels[k * per:(k + 1) * per]):
                        if "\t" in rel or "\n" in rel:
                            raise DatasetError(f"{os.path.join(src, split, rel)}: file name contains a tab or newline")
                        stored = rel.lower().endswith(_STORED_EXTENSIONS)
                        method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
                        zf.write(os.path.join(src, split, rel), arcname=rel, compress_type=method)
                        mf.write(f"{name + '/' if shard_size else ''}{rel}\t{label}\n")
                        bar.update()
    except BaseException:
        for tmp in [map_path + ".tmp"] + [os.path.join(dst, z) + ".tmp" for z in zips]:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for old in existing_outputs(dst, split):  # only reached with --overwrite (checked in main)
        os.remove(old)
    for name in zips:
        os.replace(os.path.join(dst, name) + ".tmp", os.path.join(dst, name))
    os.replace(map_path + ".tmp", map_path)
    return len(paths)


def verify_split(dst: str, split: str, verify: str) -> ZipImageDataset:
    """Build the index (resolves every map entry); read (CRC-checked) and optionally decode every entry."""
    ds = ZipImageDataset(dst, split, strict=True)
    with Progress(f"verifying {split} ({verify})", total=len(ds), unit="img") as bar:
        for i in range(len(ds)) if verify != "none" else []:
            try:
                ds.load_image(i) if verify == "decode" else ds.read_bytes(i)
            except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DatasetError(f"{ds.describe(i)}: verification failed ({type(e).__name__}: {e})") from e
            bar.update()
    return ds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_make_zip_args(argv, __doc__)
    os.makedirs(args.dst, exist_ok=True)
    written: List[str] = []
    try:
        for split in args.splits:
            found = existing_outputs(args.dst, split)
            if found and not args.overwrite:
                raise DatasetError(f"{found[0]}: exists (pass --overwrite to replace it)")
        for split in args.splits:
            n = write_split(args.src, args.dst, split, args.shard_size)
            written.append(split)
            where = (f"{-(-n // args.shard_size)} shards {split}-*.zip" if args.shard_size
                     else os.path.join(args.dst, split + ".zip"))
            print(f"{split}: wrote {n} images to {where}", flush=True)
        for split in written:
            ds = verify_split(args.dst, split, args.verify)
            print(f"{split}: indexed ({ds.index_path}), verified ({args.verify})", flush=True)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
