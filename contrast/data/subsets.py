"""Semi-supervised label subsets: a class-balanced fraction of a training split, or a named list.

The list format is that of the standard ImageNet 1 % / 10 % subsets (google-research/simclr
``imagenet_subsets/1percent.txt``): one image file name (no folder) per line; where bare names are
not unique (two class folders holding ``img_0.png``), the path below the split's folder. The choice
is a pure function of the labels, the fraction and the seed, so every rank computes the same subset.
"""
from __future__ import annotations

import collections
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
    """Sorted indices of ``floor(fraction x n_c + 1/2)`` (at least 1) images of every class ``c`` (``n_c``
    images), drawn without replacement from a generator seeded by ``seed`` alone."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(mix_seed(seed, SUBSET_STREAM)))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(np.floor(fraction * len(members) + 0.5)))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def item_paths(dataset) -> List[str]:
    """The path of every item of ``dataset`` below its root (``<class>/<file>``, or the zip map's entry),
    in dataset order."""
    map_path = getattr(dataset, "map_path", None)
    if map_path is not None:
        m = parse_map(map_path)
        return [m.path_at(i) for i in range(len(m))]
    return [os.path.relpath(dataset.describe(i), dataset.root) for i in range(len(dataset))]


def _base(path: str) -> str:
    return re.split(r"[/\\]", path)[-1]


def read_subset_file(path: str) -> List[str]:
    """The names listed in ``path`` (blank lines skipped); ``DatasetError`` names an unreadable file."""
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the label subset ({e.strerror or e})") from None


def indices_of_names(paths: Sequence[str], wanted: Sequence[str], source: str) -> np.ndarray:
    """Sorted indices of the items named ``wanted``: a bare file name (as in SimCLR's lists) or a path
    of :func:`item_paths`. ``DatasetError`` (naming ``source``) for a name not in the dataset, or a bare
    name several items share."""
    position = {p: i for i, p in enumerate(paths)}
    bases = collections.Counter(_base(p) for p in paths)
    position.update({_base(p): i for i, p in enumerate(paths) if bases[_base(p)] == 1})
    missing = [w for w in wanted if w not in position]
    clash = [w for w in missing if bases.get(w, 0) > 1]
    if clash:
        raise DatasetError(f"{source}: {clash[0]!r} names several images of the training split (give its "
                           f"path below the split's folder instead)")
    if missing:
        raise DatasetError(f"{source}: {len(missing)} of {len(wanted)} names are not in the training split "
                           f"(e.g. {missing[0]!r})")
    return np.unique(np.array([position[w] for w in wanted], dtype=np.int64))


def subset_names(paths: Sequence[str], indices: np.ndarray) -> List[str]:
    """The names of ``indices`` for a list file: bare file names when they identify the images (ImageNet),
    else their paths below the split's folder."""
    bases = [_base(p) for p in paths]
    unique = len(set(bases)) == len(bases)
    return [bases[i] if unique else paths[i] for i in indices]


def write_subset_file(path: str, names: Sequence[str]) -> None:
    """Write ``names`` to ``path``, one per line (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(name + "\n" for name in names)
    os.replace(path + ".tmp", path)


def label_subset(dataset, fraction: Optional[float], subset_file: Optional[str], seed: int) -> Optional[np.ndarray]:
    """The training indices of ``--label-fraction`` or ``--label-subset`` (None: every image)."""
    if subset_file:
        return indices_of_names(item_paths(dataset), read_subset_file(subset_file), subset_file)
    if fraction is not None:
        return balanced_subset(dataset.targets, fraction, seed)
    return None
