"""Instance datasets: folder layout and ImageNet-Zip layout (one zip or shards), RAM caches,
corrupt-image policy, per-sample augmentation seeds. Formats and index files: ``docs/data.md``.

Every item is ``(sample, index, label)`` with ``sample = transform(image)`` (a list of views for
pretraining), ``index`` the *global* dataset index and ``label`` the class.

Layouts (see the seed README, "Datasets"):

* folder: ``root/<split>/<class>/<image>`` as torchvision's ``ImageFolder``. Class indices are
  the sorted class folders of ``root/train`` (so ``val`` labels agree with ``train`` even if a
  class folder is missing from ``val``); without ``root/train`` the split's own folders are used.
  The file list is scanned once and kept in ``root/<split>_files.idx``.
* ImageNet-Zip: ``root/<split>_map.txt``, one ``relative/path<TAB>label`` per line, and either
  ``root/<split>.zip`` or **shards**: map paths ``<shard>.zip/<entry>`` naming a zip relative to
  ``root`` (``train-00000.zip/n01440764/x.JPEG``, written by ``tools/make_zip_dataset.py
  --shard-size``). Labels must lie in ``[0, num_classes)`` with ``num_classes = 1 + max label of
  train_map.txt``. Real ImageNet zips often keep a top-level folder (entries
  ``train/n01440764/x.JPEG`` while the map says ``n01440764/x.JPEG``): the prefix is detected
  (per zip) from its first map entry (the unique entry ending in ``/<entry>``) and then required
  for all. The map is resolved once against the zips' central directories into
  ``root/<split>_map.idx`` (:mod:`contrast.data.zip_index`; file format: :mod:`contrast.data.index`).

Index files are shared through the page cache by the DataLoader workers of every rank: a worker
reads an entry's 40-byte record and then the entry with one ``os.pread`` each (no
``zipfile.ZipFile``, no per-process index, no per-worker growth). An index whose
sources changed is rebuilt with a warning; where the data folder is read-only indexes go to
``~/.cache/contrast/index`` (or ``index_dir``).

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

Augmentation randomness: an index that carries an ``aug_seed`` (the samplers yield
:class:`~contrast.data.samplers.SampleIndex`, seeded by ``(seed, epoch, position)``) runs the
transform under :func:`~contrast.seeding.seeded_rng`, so the crops of a sample do not
depend on the worker, the number of workers or on where a run was resumed. A replacement for a
corrupt image is transformed under the same seed.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zipfile
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from contrast.data.errors import DatasetError
from contrast.data.folder_index import build_folder_index, scan_folder
from contrast.data.index import RowReader, load_or_build, read_index
from contrast.data.mapfile import parse_map
from contrast.data.zip_index import ZIP_RECORD, build_zip_index
from contrast.data.transforms import to_rgb
from contrast.logger import Progress
from contrast.seeding import seeded_rng
from contrast.data.zipformat import BadZip, read_entry

CACHE_MODES = ("no", "part", "full")
SPLITS = ("train", "val")
# Errors that mean "this file is corrupt / truncated / unreadable", not "the code is wrong".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)
_MAX_OPEN_SHARDS = 64  # open zip file descriptors kept per process


def shard_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s cache shard: ``(rank + k * world_size) % N`` for ``k < ceil(N / world_size)``.

    Shards are disjoint when ``world_size`` divides N; otherwise the last entries wrap around to
    the start (as DistributedSampler pads), so every rank holds the same number of indices.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    per_rank = math.ceil(num_samples / world_size)
    return (rank + world_size * np.arange(per_rank, dtype=np.int64)) % num_samples


def scan_image_folder(root: str, split: str) -> Tuple[List[str], List[int], List[str]]:
    """``(relative paths '<class>/<file>', labels, classes)`` of ``root/<split>``, sorted (a fresh
    scan; the datasets keep the result in an index file). Errors: see :func:`scan_folder`."""
    return scan_folder(root, split)[:3]


def read_map_file(map_path: str) -> Tuple[List[str], List[int]]:
    """Parse an ImageNet-Zip map file into ``(paths, labels)`` lists (see :func:`parse_map`)."""
    m = parse_map(map_path)
    return [m.path_at(i) for i in range(len(m))], m.labels.tolist()


class NumberedClasses(Sequence):
    """Class names ``'0' .. str(n - 1)`` without a list of n strings."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(c) for c in range(self.n)[i]]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return str(i % self.n)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class _EncodedImageDataset(Dataset):
    """Shared machinery: encoded-bytes cache, decoding, corrupt-image policy, item format.

    Subclasses set ``classes`` and ``_size``, and implement ``_read_storage(i) -> bytes``,
    ``_label(i)``, ``_all_labels()``, ``_storage_sizes(indices)`` and ``describe(i) -> str``.
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
        self._cache_off: Optional[torch.Tensor] = None   # slot -> byte offset, length slots + 1
        self._cached: Optional[np.ndarray] = None        # sorted cached indices (part); None: slot = index

    # -- subclass hooks ------------------------------------------------------------------------
    def _read_storage(self, index: int) -> bytes:
        raise NotImplementedError

    def _label(self, index: int) -> int:
        raise NotImplementedError

    def _all_labels(self) -> np.ndarray:
        raise NotImplementedError

    def _storage_sizes(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _storage_order(self, indices: np.ndarray) -> np.ndarray:
        """The order in which to read ``indices`` when filling the cache (default: as given)."""
        return np.arange(len(indices))

    def describe(self, index: int) -> str:
        """The file (or ``zip:entry``) holding item ``index``, for messages."""
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------------
    @property
    def targets(self) -> List[int]:
        return self._all_labels().tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_corrupt(self) -> int:
        """Corrupt images replaced so far (all DataLoader workers of this dataset together)."""
        return int(self._corrupt.item())

    def __len__(self) -> int:
        return self._size

    def read_bytes(self, index: int) -> bytes:
        """Encoded bytes of item ``index``, from the RAM cache when it holds them."""
        if self._cache_buf is not None:
            slot = index
            if self._cached is not None:
                slot = int(np.searchsorted(self._cached, index))
                if slot == len(self._cached) or self._cached[slot] != index:
                    slot = -1
            if slot >= 0:
                lo, hi = self._cache_off[slot].item(), self._cache_off[slot + 1].item()
                return self._cache_buf[lo:hi].numpy().tobytes()
        return self._read_storage(index)

    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index`` to a fully loaded 8-bit RGB image (raises on corrupt data)."""
        with Image.open(io.BytesIO(self.read_bytes(index))) as img:
            rgb = to_rgb(img)
            rgb.load()
            return rgb

    def _decode_and_transform(self, index: int, aug_seed: Optional[int]):
        """``transform`` gets the image still unloaded (fresh from ``Image.open``), so a
        transform may decode a JPEG at reduced scale (PIL draft mode); it converts to RGB
        itself (:func:`~contrast.data.transforms.to_rgb`). It runs under ``seeded_rng(aug_seed)``.
        Without a transform the fully loaded RGB image is returned."""
        if self.transform is None:
            return self.load_image(index)
        with Image.open(io.BytesIO(self.read_bytes(index))) as img, seeded_rng(aug_seed):
            return self.transform(img)

    def __getitem__(self, index: int):
        aug_seed = getattr(index, "aug_seed", None)
        index = int(index)
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        for k in range(n):
            j = (index + k) % n
            try:
                sample = self._decode_and_transform(j, aug_seed)
            except _DECODE_ERRORS as e:
                message = f"{self.describe(j)}: cannot read or decode image ({type(e).__name__}: {e})"
                if self.strict:
                    raise DatasetError(message) from e
                self._corrupt += 1
                warnings.warn(f"{message}; using the next index instead", RuntimeWarning, stacklevel=2)
                continue
            return sample, j, self._label(j)
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
        sizes = self._storage_sizes(cached).astype(np.int64)
        off = np.zeros(len(cached) + 1, dtype=np.int64)
        np.cumsum(sizes, out=off[1:])
        buf = torch.empty(int(off[-1]), dtype=torch.uint8)
        view = buf.numpy()
        with Progress(f"caching {len(cached)} images ({int(off[-1]) / 2 ** 20:.0f} MB)", total=len(cached),
                      unit="img", enabled=self.rank == 0) as bar:
            for s in self._storage_order(cached).tolist():
                i = int(cached[s])
                data = self._read_storage(i)
                if len(data) != sizes[s]:
                    raise DatasetError(f"{self.describe(i)}: size changed while caching "
                                       f"({sizes[s]} bytes listed, {len(data)} read)")
                view[off[s]:off[s + 1]] = np.frombuffer(data, dtype=np.uint8)
                bar.update()
        self._cache_buf, self._cache_off = buf, torch.from_numpy(off)
        self._cached = cached if self.cache_mode == "part" else None


class _IndexedDataset(_EncodedImageDataset):
    """An :class:`_EncodedImageDataset` described by an index file (:mod:`contrast.data.index`):
    bulk work (caching, ``targets``) uses its memory map, per-sample reads ``os.pread``."""

    _index_name: str
    _index_kind: str

    def _load_index(self, root: str, split: str, build: Callable, lock_path: str, index_dir: Optional[str]) -> None:
        self._index = load_or_build(root, f"{split}{self._index_name}", self._index_kind, split, build, lock_path,
                                    index_dir)
        self.index_path = self._index.path
        self._bind()

    def _bind(self) -> None:
        """Set the attributes derived from the index (again after unpickling)."""
        raise NotImplementedError

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.index_path is not None:  # a spawned worker maps the file instead of receiving a copy
            state["_index"] = None
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        if self._index is None:
            self._index = read_index(self.index_path)


class ImageFolderInstance(_IndexedDataset):
    """``root/<split>/<class>/<image>`` (torchvision ``ImageFolder`` layout) returning
    ``(transform(img), index, label)``. The file list is kept in ``root/<split>_files.idx``."""

    _index_name, _index_kind = "_files.idx", "folder"

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1, strict: bool = False,
                 index_dir: Optional[str] = None) -> None:
        super().__init__(transform, cache_mode, rank, world_size, strict)
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DatasetError(f"{split_dir}: split folder does not exist (expected {root}/{split}/<class>/<image>)")
        self.root = split_dir
        self._load_index(root, split, lambda: build_folder_index(root, split), split_dir, index_dir)
        self._build_cache()

    def _bind(self) -> None:
        self.classes = self._index.meta["classes"]
        self._size = self._index.meta["size"]
        self._names = RowReader(self._index, "names")
        self._name_offsets = RowReader(self._index, "name_offsets")
        self._labels = RowReader(self._index, "labels")

    def _label(self, index: int) -> int:
        return int(self._labels(index)[0])

    def _all_labels(self) -> np.ndarray:
        return self._index.arrays["labels"]

    def describe(self, index: int) -> str:
        lo, hi = self._name_offsets(index, 2).tolist()
        return os.path.join(self.root, self._names.raw(lo, hi - lo).decode("utf-8"))

    def _storage_sizes(self, indices: np.ndarray) -> np.ndarray:
        return np.array([os.path.getsize(self.describe(int(i))) for i in indices], dtype=np.int64)

    def _read_storage(self, index: int) -> bytes:
        with open(self.describe(index), "rb") as f:
            return f.read()


_RECORD = struct.Struct("<qqIIIiHHHBB")  # one ZIP_RECORD, field by field
assert _RECORD.size == ZIP_RECORD.itemsize


class ZipImageDataset(_IndexedDataset):
    """ImageNet-Zip layout (``<split>_map.txt`` + ``<split>.zip`` or shards) returning
    ``(transform(img), index, label)``.

    Attributes: ``map_path``, ``zip_path`` (``root/<split>.zip``), ``shards`` (the zip files; one
    for the single-zip layout), ``prefixes`` (entry prefix per shard) and ``prefix`` (the prefix
    when all shards share it, else None), ``index_path`` (None when the index is in memory).

    Each process opens the zips lazily and reads an entry with one ``os.pread`` at the offset
    its index record gives (the record itself is one 40-byte ``pread`` of the index file);
    descriptors inherited across a fork are safe to use (``pread`` has no shared file position)
    and are not pickled to spawned workers.
    """

    _index_name, _index_kind = "_map.idx", "zip"

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1, strict: bool = False,
                 index_dir: Optional[str] = None) -> None:
        super().__init__(transform, cache_mode, rank, world_size, strict)
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: dataset root does not exist or is not a folder")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = root
        self.zip_path = os.path.join(root, f"{split}.zip")
        self.map_path = os.path.join(root, f"{split}_map.txt")
        self._fds: "OrderedDict[int, int]" = OrderedDict()
        lock = self.map_path if os.path.isfile(self.map_path) else root
        self._load_index(root, split, lambda: build_zip_index(root, split), lock, index_dir)
        self._build_cache()
        self.close()

    def _bind(self) -> None:
        meta = self._index.meta
        self.classes = NumberedClasses(meta["num_classes"])
        self._size = meta["size"]
        self.shards = [os.path.join(self.root, s) for s in meta["shards"]]
        self.prefixes = meta["prefixes"]
        self.prefix = self.prefixes[0] if len(set(self.prefixes)) == 1 else None
        self._records = RowReader(self._index, "records")

    def _record(self, index: int) -> tuple:
        """``(offset, name_off, comp, size, crc, label, shard, hdr, name_len, method, pad)``."""
        return _RECORD.unpack(self._records.raw(index))

    def _label(self, index: int) -> int:
        return self._record(index)[5]

    def _all_labels(self) -> np.ndarray:
        return self._index.arrays["records"]["label"]

    def describe(self, index: int) -> str:
        _, name_off, _, _, _, _, shard, _, name_len, _, _ = self._record(index)
        try:
            with open(self.map_path, "rb") as f:
                f.seek(name_off)
                name = f.read(name_len).decode("utf-8", "replace")
        except OSError:
            name = f"<entry {index} of {self.map_path}>"
        return f"{self.shards[shard]}:{self.prefixes[shard]}{name}"

    def _storage_sizes(self, indices: np.ndarray) -> np.ndarray:
        return self._index.arrays["records"]["size"][indices].astype(np.int64)

    def _storage_order(self, indices: np.ndarray) -> np.ndarray:
        rec = self._index.arrays["records"]
        return np.lexsort((rec["offset"][indices], rec["shard"][indices]))

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        else:
            self._fds.move_to_end(shard)
        return fd

    def _read_storage(self, index: int) -> bytes:
        offset, _, comp, size, crc, _, shard, hdr, _, method, _ = self._record(index)
        try:
            return read_entry(self._fd(shard), offset, hdr, comp, size, method, crc)
        except BadZip as e:
            raise zipfile.BadZipFile(str(e)) from None

    def close(self) -> None:
        """Close this process' zip descriptors (they reopen on the next read)."""
        while self._fds:
            try:
                os.close(self._fds.popitem()[1])
            except OSError:
                pass

    def __getstate__(self):
        state = super().__getstate__()
        state["_fds"] = OrderedDict()
        return state

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()
