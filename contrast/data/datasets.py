"""Instance datasets: folder layout and ImageNet-Zip layout, RAM caches, corrupt-image policy.

Every item is ``(sample, index, label)`` with ``sample = transform(PIL RGB image)`` (a list of
views for pretraining), ``index`` the *global* dataset index and ``label`` the class.

Layouts (see the seed README, "Datasets"):

* folder: ``root/<split>/<class>/<image>`` as torchvision's ``ImageFolder``. Class indices are
  the sorted class folders of ``root/train`` (so ``val`` labels agree with ``train`` even if a
  class folder is missing from ``val``); without ``root/train`` the split's own folders are used.
* ImageNet-Zip: ``root/<split>.zip`` and ``root/<split>_map.txt``, one ``relative/path<TAB>label``
  per line. Labels must lie in ``[0, num_classes)`` with ``num_classes = 1 + max label of
  train_map.txt``. Real ImageNet zips often keep a top-level folder (entries
  ``train/n01440764/x.JPEG`` while the map says ``n01440764/x.JPEG``): the prefix is detected once
  from the first map entry (the unique zip entry ending in ``/<entry>``) and then required for all.

Cache modes (``--cache-mode``): ``no`` reads every image from storage; ``full`` keeps the encoded
bytes of every image in RAM; ``part`` keeps only this rank's shard
``[(rank + k * world_size) % N for k < ceil(N / world_size)]`` (every rank gets the same, non-empty
number of indices, even when N < world_size) and exposes it as ``local_indices`` for the sampler.
Cached bytes live in one flat uint8 tensor, so forked or spawned DataLoader workers share them
instead of copying them page by page.

Corrupt or truncated images met while training: with ``strict=False`` (default) the item is
replaced by the next index (``i + 1, i + 2, ...`` modulo N) that decodes, a ``RuntimeWarning``
names the bad file, and ``num_corrupt`` counts it. The counter is a shared-memory tensor, so the
training loop reads the total over all DataLoader workers from the main process' dataset object
(increments from concurrent workers are not atomic; the count is exact unless two workers hit a
corrupt file at the same instant). ``strict=True`` raises :class:`DatasetError` instead.
"""
from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

CACHE_MODES = ("no", "part", "full")
SPLITS = ("train", "val")
# Errors that mean "this file is corrupt / truncated / unreadable", not "the code is wrong".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)


class DatasetError(ValueError):
    """Bad dataset input; the message always names the offending file or folder."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s cache shard: ``(rank + k * world_size) % N`` for ``k < ceil(N / world_size)``.

    Shards are disjoint when ``world_size`` divides N; otherwise the last entries wrap around to
    the start (as DistributedSampler pads), so every rank holds the same number of indices.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    per_rank = math.ceil(num_samples / world_size)
    return (rank + world_size * np.arange(per_rank, dtype=np.int64)) % num_samples


def find_folder_classes(root: str, split: str) -> List[str]:
    """Sorted class folder names that define labels: those of ``root/train`` if it exists."""
    ref = os.path.join(root, "train")
    if not os.path.isdir(ref):
        ref = os.path.join(root, split)
    classes = sorted(e.name for e in os.scandir(ref) if e.is_dir())
    if not classes:
        raise DatasetError(f"{ref}: no class folders found (expected {ref}/<class>/<image>)")
    return classes


def scan_image_folder(root: str, split: str) -> Tuple[List[str], List[int], List[str]]:
    """``(relative paths '<class>/<file>', labels, classes)`` of ``root/<split>``, sorted.

    Raises :class:`DatasetError` naming the folder for a missing root or split, a split with no
    class folders, a class folder with no images, or a ``val`` class unknown to ``train``.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DatasetError(f"{split_dir}: split folder does not exist (expected {root}/{split}/<class>/<image>)")
    classes = find_folder_classes(root, split)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    split_classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not split_classes:
        raise DatasetError(f"{split_dir}: no class folders found (expected {split_dir}/<class>/<image>)")
    paths: List[str] = []
    labels: List[int] = []
    for c in split_classes:
        class_dir = os.path.join(split_dir, c)
        if c not in class_to_idx:
            raise DatasetError(f"{class_dir}: class '{c}' does not exist in {os.path.join(root, 'train')}")
        files = []
        for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
            files += [os.path.relpath(os.path.join(dirpath, f), split_dir) for f in filenames if is_image_file(f)]
        if not files:
            raise DatasetError(f"{class_dir}: class folder contains no images (extensions {', '.join(IMG_EXTENSIONS)})")
        files.sort()
        paths += [f.replace(os.sep, "/") for f in files]
        labels += [class_to_idx[c]] * len(files)
    return paths, labels, classes


def read_map_file(map_path: str) -> Tuple[List[str], List[int]]:
    """Parse an ImageNet-Zip map file: one ``relative/path<TAB>label`` per line (blank lines skipped)."""
    if not os.path.isfile(map_path):
        raise DatasetError(f"{map_path}: map file does not exist")
    paths: List[str] = []
    labels: List[int] = []
    with open(map_path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            label = _parse_int(parts[1]) if len(parts) == 2 and parts[0] else None
            if label is None:
                raise DatasetError(f"{map_path}:{lineno}: expected '<relative path><TAB><integer label>', got {line!r}")
            if label < 0:
                raise DatasetError(f"{map_path}:{lineno}: negative label {label} (labels must be >= 0)")
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DatasetError(f"{map_path}: map file lists no images")
    return paths, labels


def _parse_int(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def _max_label(map_path: str) -> int:
    return max(read_map_file(map_path)[1])


class _EncodedImageDataset(Dataset):
    """Shared machinery: encoded-bytes cache, decoding, corrupt-image policy, item format.

    Subclasses set ``self._paths`` (np.str_ array of storage keys), ``self._labels`` (int64 array),
    ``classes``, and implement ``_read_storage(i) -> bytes`` and ``describe(i) -> str``.
    """

    def __init__(self, transform: Optional[Callable], cache_mode: str, rank: int, world_size: int,
                 strict: bool) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"--cache-mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.transform = transform
        self.cache_mode = cache_mode
        self.rank = rank
        self.world_size = world_size
        self.strict = strict
        self._corrupt = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.local_indices: Optional[np.ndarray] = None
        self._cache_buf: Optional[torch.Tensor] = None
        self._cache_slot: Optional[np.ndarray] = None  # global index -> slot, -1 when not cached
        self._cache_off: Optional[np.ndarray] = None   # slot -> byte offset, length slots + 1

    # -- subclass hooks ------------------------------------------------------------------------
    def _read_storage(self, index: int) -> bytes:
        raise NotImplementedError

    def _storage_size(self, index: int) -> int:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """The file (or ``zip:entry``) holding item ``index``, for messages."""
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------
    @property
    def targets(self) -> List[int]:
        return self._labels.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_corrupt(self) -> int:
        """Corrupt images replaced so far (all DataLoader workers of this dataset together)."""
        return int(self._corrupt.item())

    def __len__(self) -> int:
        return len(self._labels)

    def read_bytes(self, index: int) -> bytes:
        """Encoded bytes of item ``index``, from the RAM cache when it holds them."""
        if self._cache_buf is not None:
            slot = self._cache_slot[index]
            if slot >= 0:
                return self._cache_buf[self._cache_off[slot]:self._cache_off[slot + 1]].numpy().tobytes()
        return self._read_storage(index)

    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index`` to a fully loaded RGB image (raises on corrupt data)."""
        with Image.open(io.BytesIO(self.read_bytes(index))) as img:
            return img.convert("RGB")

    def _decode_and_transform(self, index: int):
        """``transform`` gets the image still unloaded (fresh from ``Image.open``), so a
        transform may decode a JPEG at reduced scale (PIL draft mode); it converts to RGB
        itself. Without a transform the fully loaded RGB image is returned."""
        if self.transform is None:
            return self.load_image(index)
        with Image.open(io.BytesIO(self.read_bytes(index))) as img:
            return self.transform(img)

    def __getitem__(self, index: int):
        index = int(index)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        for k in range(n):
            j = (index + k) % n
            try:
                sample = self._decode_and_transform(j)
            except _DECODE_ERRORS as e:
                message = f"{self.describe(j)}: cannot read or decode image ({type(e).__name__}: {e})"
                if self.strict:
                    raise DatasetError(message) from e
                self._corrupt += 1
                warnings.warn(f"{message}; using the next index instead", RuntimeWarning, stacklevel=2)
                continue
            return sample, j, int(self._labels[j])
        raise DatasetError(f"{self.describe(index)}: no image of the dataset can be decoded")

    # -- cache --------------------------------------------------------------------------------
    def _build_cache(self) -> None:
        n = len(self)
        if self.cache_mode == "no":
            return
        if self.cache_mode == "part":
            self.local_indices = shard_indices(n, self.rank, self.world_size)
            cached = np.unique(self.local_indices)
        else:
            cached = np.arange(n, dtype=np.int64)
        sizes = np.array([self._storage_size(int(i)) for i in cached], dtype=np.int64)
        off = np.zeros(len(cached) + 1, dtype=np.int64)
        np.cumsum(sizes, out=off[1:])
        buf = torch.empty(int(off[-1]), dtype=torch.uint8)
        view = buf.numpy()
        for s, i in enumerate(cached):
            data = self._read_storage(int(i))
            if len(data) != sizes[s]:
                raise DatasetError(f"{self.describe(int(i))}: size changed while caching "
                                   f"({sizes[s]} bytes listed, {len(data)} read)")
            view[off[s]:off[s + 1]] = np.frombuffer(data, dtype=np.uint8)
        slot = np.full(n, -1, dtype=np.int64)
        slot[cached] = np.arange(len(cached))
        self._cache_buf, self._cache_off, self._cache_slot = buf, off, slot


class ImageFolderInstance(_EncodedImageDataset):
    """``root/<split>/<class>/<image>`` (torchvision ``ImageFolder`` layout) returning
    ``(transform(img), index, label)``."""

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1, strict: bool = False) -> None:
        super().__init__(transform, cache_mode, rank, world_size, strict)
        paths, labels, self.classes = scan_image_folder(root, split)
        self.root = os.path.join(root, split)
        self._paths = np.array(paths)
        self._labels = np.array(labels, dtype=np.int64)
        self._build_cache()

    def describe(self, index: int) -> str:
        return os.path.join(self.root, str(self._paths[index]))

    def _storage_size(self, index: int) -> int:
        return os.path.getsize(self.describe(index))

    def _read_storage(self, index: int) -> bytes:
        with open(self.describe(index), "rb") as f:
            return f.read()


class ZipImageDataset(_EncodedImageDataset):
    """ImageNet-Zip layout (``<split>.zip`` + ``<split>_map.txt``) returning
    ``(transform(img), index, label)``.

    The zip is opened lazily once per process (keyed by pid): a handle inherited across a fork
    shares its file offset with the parent and corrupts reads.
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1, strict: bool = False) -> None:
        super().__init__(transform, cache_mode, rank, world_size, strict)
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.zip_path = os.path.join(root, f"{split}.zip")
        self.map_path = os.path.join(root, f"{split}_map.txt")
        paths, labels = read_map_file(self.map_path)
        train_map = os.path.join(root, "train_map.txt")
        num_classes = max(labels) + 1 if split == "train" else _max_label(train_map) + 1
        for path, lab in zip(paths, labels):
            if lab >= num_classes:
                raise DatasetError(f"{self.map_path}: label {lab} of '{path}' is out of range "
                                   f"[0, {num_classes}) (num_classes = 1 + max label of {train_map})")
        if not os.path.isfile(self.zip_path):
            raise DatasetError(f"{self.zip_path}: zip file does not exist")
        try:
            with zipfile.ZipFile(self.zip_path) as zf:
                infos = {i.filename: i for i in zf.infolist()}
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{self.zip_path}: not a readable zip file ({e})") from e
        self.prefix = self._detect_prefix(paths[0], infos)
        missing = [p for p in paths if self.prefix + p not in infos]
        if missing:
            raise DatasetError(f"{self.zip_path}: {len(missing)} entries of {self.map_path} are missing from the "
                               f"zip (entry prefix '{self.prefix}'), first: '{missing[0]}'")
        self._sizes = np.array([infos[self.prefix + p].file_size for p in paths], dtype=np.int64)
        self.classes = [str(c) for c in range(num_classes)]
        self._paths = np.array(paths)
        self._labels = np.array(labels, dtype=np.int64)
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None
        self._build_cache()
        self._close()

    def _detect_prefix(self, first: str, infos) -> str:
        if first in infos:
            return ""
        hits = [name for name in infos if name.endswith("/" + first)]
        if len(hits) != 1:
            what = "is missing from" if not hits else f"matches {len(hits)} entries of"
            raise DatasetError(f"{self.zip_path}: entry '{first}' (first line of {self.map_path}) {what} the zip")
        return hits[0][: -len(first)]

    def describe(self, index: int) -> str:
        return f"{self.zip_path}:{self.prefix}{self._paths[index]}"

    def _storage_size(self, index: int) -> int:
        return int(self._sizes[index])

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)  # never close an inherited handle: it is the parent's
            self._zip_pid = os.getpid()
        return self._zip

    def _close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, None

    def _read_storage(self, index: int) -> bytes:
        return self._handle().read(self.prefix + str(self._paths[index]))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"], state["_zip_pid"] = None, None
        return state
