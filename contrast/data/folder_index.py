"""The index of a folder layout ``root/<split>/<class>/<image>``: scanning the folders and the
arrays (file names as one UTF-8 blob, offsets, labels) the folder dataset reads."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from contrast.data.errors import DatasetError
from contrast.data.index import INDEX_VERSION, file_stamp
from contrast.logger import Progress


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_folder_classes(root: str, split: str) -> List[str]:
    """Sorted class folder names that define labels: those of ``root/train`` if it exists."""
    ref = os.path.join(root, "train")
    if not os.path.isdir(ref):
        ref = os.path.join(root, split)
    classes = sorted(e.name for e in os.scandir(ref) if e.is_dir())
    if not classes:
        raise DatasetError(f"{ref}: no class folders found (expected {ref}/<class>/<image>)")
    return classes


def _walk_images(split_dir: str, top: str, stamps: Dict[str, List]) -> List[str]:
    """Image files under ``top`` (following links, as ``os.walk(followlinks=True)``), relative to
    ``split_dir`` with ``/`` separators; each folder is stamped before it is listed."""
    files, stack = [], [top]
    while stack:
        d = stack.pop()
        try:
            stamps[os.path.relpath(d, os.path.dirname(split_dir))] = file_stamp(d)
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir():
                stack.append(e.path)
            elif is_image_file(e.name):
                files.append(os.path.relpath(e.path, split_dir).replace(os.sep, "/"))
    return files


def scan_folder(root: str, split: str) -> Tuple[List[str], List[int], List[str], Dict[str, List]]:
    """``(relative paths '<class>/<file>', labels, classes, folder stamps)`` of ``root/<split>``.

    Raises :class:`DatasetError` naming the folder for a missing root or split, a split with no
    class folders, a class folder with no images, or a ``val`` class unknown to ``train``.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f"{split_dir}: split folder does not exist (expected {root}/{split}/<class>/<image>)")
    stamps: Dict[str, List] = {}
    ref = os.path.join(root, "train")
    if os.path.isdir(ref):
        stamps["train"] = file_stamp(ref)
    stamps[split] = file_stamp(split_dir)
    classes = find_folder_classes(root, split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    split_classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not split_classes:
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class>/<image>)")
    paths: List[str] = []
    labels: List[int] = []
    with Progress(f"scanning {split_dir}", total=len(split_classes), unit="class") as bar:
        for c in split_classes:
            class_dir = os.path.join(split_dir, c)
            if c not in class_to_idx:
                raise DatasetError(f"{class_dir}: class '{c}' does not exist in {os.path.join(root, 'train')}")
            files = sorted(_walk_images(split_dir, class_dir, stamps))
            if not files:
                raise DatasetError(f"{class_dir}: class folder contains no images (extensions "
                                   f"{', '.join(IMG_EXTENSIONS)})")
            paths += files
            labels += [class_to_idx[c]] * len(files)
            bar.update()
    return paths, labels, classes, stamps


def build_folder_index(root: str, split: str) -> Tuple[dict, Dict[str, np.ndarray]]:
    """Index of ``root/<split>/<class>/<image>``: the sorted file list as one UTF-8 blob +
    offsets + labels. Its sources are ``root/train`` (the classes) and every folder walked (adding
    or removing a file changes its folder's mtime)."""
    paths, labels, classes, stamps = scan_folder(root, split)
    data = [p.encode("utf-8") for p in paths]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    meta = {"version": INDEX_VERSION, "kind": "folder", "split": split, "classes": classes, "size": len(paths),
            "sources": [[rel, stamp] for rel, stamp in sorted(stamps.items())]}
    return meta, {"names": np.frombuffer(b"".join(data), dtype=np.uint8), "name_offsets": offsets,
                  "labels": np.asarray(labels, dtype=np.int32)}
