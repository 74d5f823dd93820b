"""Semi-supervised label subsets: a class-balanced fraction of a training split, or a named list.

The list format is that of the standard ImageNet 1 % / 10 % subsets (google-research/simclr
``imagenet_subsets/1percent.txt``): one image file name (no folder) per line. The choice is a pure
function of the labels, the fraction and the seed, so every rank computes the same subset.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

import numpy as np

from contrast.data.errors import DatasetError
from contrast.data.mapfile import parse_map
from contrast.seeding import mix_seed

#: Stream of :func:`~contrast.seeding.mix_seed` for the subset draw (no other draw uses it).
SUBSET_STREAM = 0x5B5E7


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction x n_c)`` (at least 1) images of every class ``c`` (``n_c``
    images), drawn without replacement from a generator seeded by ``seed`` alone."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(mix_seed(seed, SUBSET_STREAM)))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def item_names(dataset) -> List[str]:
    """The file name (no folder) of every item of ``dataset``, in dataset order."""
    map_path = getattr(dataset, "map_path", None)
    if map_path is not None:
        m = parse_map(map_path)
        return [_base(m.path_at(i)) for i in range(len(m))]
    return [_base(dataset.describe(i)) for i in range(len(dataset))]


def _base(path: str) -> str:
    return re.split(r"[/\\:]", path)[-1]


def read_subset_file(path: str) -> List[str]:
    """The names listed in ``path`` (blank lines skipped); ``DatasetError`` names an unreadable file."""
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the label subset ({e.strerror or e})") from None


def indices_of_names(names: Sequence[str], wanted: Sequence[str], source: str) -> np.ndarray:
    """Sorted indices of the items named ``wanted``; ``DatasetError`` (naming ``source``) when a name
    is not in the dataset or is ambiguous."""
    position = {}
    repeated = set()
    for i, name in enumerate(names):
        if name in position:
            repeated.add(name)
        position[name] = i
    missing = [w for w in wanted if w not in position]
    if missing:
        raise DatasetError(f"{source}: {len(missing)} of {len(wanted)} names are not in the training split "
                           f"(e.g. {missing[0]!r})")
    clash = [w for w in wanted if w in repeated]
    if clash:
        raise DatasetError(f"{source}: {clash[0]!r} names several images of the training split")
    return np.unique(np.array([position[w] for w in wanted], dtype=np.int64))


def write_subset_file(path: str, names: Sequence[str], indices: np.ndarray) -> None:
    """Write the names of ``indices`` to ``path``, one per line (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(names[i] + "\n" for i in indices)
    os.replace(path + ".tmp", path)


def label_subset(dataset, fraction: Optional[float], subset_file: Optional[str], seed: int) -> Optional[np.ndarray]:
    """The training indices of ``--label-fraction`` or ``--label-subset`` (None: every image)."""
    if subset_file:
        return indices_of_names(item_names(dataset), read_subset_file(subset_file), subset_file)
    if fraction is not None:
        return balanced_subset(dataset.targets, fraction, seed)
    return None
