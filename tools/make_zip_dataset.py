#!/usr/bin/env python
"""Convert a folder dataset (``src/<split>/<class>/<image>``) into the ImageNet-Zip layout.

Writes ``dst/<split>.zip`` (entries ``<class>/<file>``) and ``dst/<split>_map.txt``
(``<class>/<file><TAB><label>``, labels = sorted class folders of ``src/train``, exactly as
``ImageFolderInstance`` numbers them), streaming one file at a time (already compressed formats
are stored, others deflated). Each output is written under a temporary name and renamed when
complete, then verified: re-opened with ``ZipImageDataset`` (every map entry present, labels in
range) and every entry read back (CRC check) and, with ``--verify decode``, decoded.

Example::

    python tools/make_zip_dataset.py --src data/ImageNet --dst data/ImageNet-Zip
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contrast.data.datasets import DatasetError, ZipImageDataset, scan_image_folder  # noqa: E402

_STORED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def write_split(src: str, dst: str, split: str) -> int:
    """Write ``dst/<split>.zip`` and ``dst/<split>_map.txt`` from ``src/<split>``; returns the image count."""
    paths, labels, _ = scan_image_folder(src, split)
    zip_path, map_path = os.path.join(dst, f"{split}.zip"), os.path.join(dst, f"{split}_map.txt")
    try:
        with zipfile.ZipFile(zip_path + ".tmp", "w", allowZip64=True) as zf, \
                open(map_path + ".tmp", "w", encoding="utf-8") as mf:
            for rel, label in zip(paths, labels):
                if "\t" in rel or "\n" in rel:
                    raise DatasetError(f"{os.path.join(src, split, rel)}: file name contains a tab or newline")
                method = zipfile.ZIP_STORED if rel.lower().endswith(_STORED_EXTENSIONS) else zipfile.ZIP_DEFLATED
                zf.write(os.path.join(src, split, rel), arcname=rel, compress_type=method)
                mf.write(f"{rel}\t{label}\n")
    except BaseException:
        for tmp in (zip_path + ".tmp", map_path + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    os.replace(zip_path + ".tmp", zip_path)
    os.replace(map_path + ".tmp", map_path)
    return len(paths)


def verify_split(dst: str, split: str, decode: bool) -> None:
    """Re-open the written split; read (CRC-checked) and optionally decode every entry."""
    ds = ZipImageDataset(dst, split, strict=True)
    for i in range(len(ds)):
        try:
            ds.load_image(i) if decode else ds.read_bytes(i)
        except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{ds.describe(i)}: verification failed ({type(e).__name__}: {e})") from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder dataset root holding <split>/<class>/<image>")
    p.add_argument("--dst", required=True, help="output folder for <split>.zip and <split>_map.txt")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                   help="splits to convert (default: train val)")
    p.add_argument("--verify", choices=["decode", "crc", "none"], default="decode",
                   help="after writing: read every entry back (crc) and also decode it (decode, default)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.dst, exist_ok=True)
    written: List[str] = []
    try:
        for split in args.splits:
            for name in (f"{split}.zip", f"{split}_map.txt"):
                if os.path.exists(os.path.join(args.dst, name)) and not args.overwrite:
                    raise DatasetError(f"{os.path.join(args.dst, name)}: exists (pass --overwrite to replace it)")
        for split in args.splits:
            n = write_split(args.src, args.dst, split)
            written.append(split)
            print(f"{split}: wrote {n} images to {os.path.join(args.dst, split + '.zip')}", flush=True)
        for split in written if args.verify != "none" else []:
            verify_split(args.dst, split, decode=args.verify == "decode")
            print(f"{split}: verified ({args.verify})", flush=True)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
