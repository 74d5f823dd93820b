"""Sliding-window sampler (PIC, Sec. 4.1), resumable distributed sampler, epoch mapping."""
from __future__ import annotations

import io
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from contrast.data import (FeistelPermutation, ResumableDistributedSampler, SampleIndex, SlidingWindowSampler,
                           build_sampler, sample_seed, window_epochs)
from tests.dist_utils import run_distributed

N, W, S = 24, 8, 4  # N divisible by S, W divisible by S and by every world size tested


def _windows(world: int, epochs, seed: int = 0, shuffle_per_epoch: bool = False, n: int = N, w: int = W,
             s: int = S):
    """For each epoch: the list of every rank's share."""
    samplers = [SlidingWindowSampler(range(n), w, s, num_replicas=world, rank=r, seed=seed,
                                     shuffle_per_epoch=shuffle_per_epoch) for r in range(world)]
    out = []
    for e in epochs:
        shares = []
        for sampler in samplers:
            sampler.set_epoch(e)
            shares.append(list(sampler))
        out.append(shares)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("first", [0, 5])
def test_sliding_window_properties(world, first):
    windows = _windows(world, range(first, first + N // S + 1))
    sets = []
    for shares in windows:
        assert all(len(share) == W // world for share in shares)
        union = [i for share in shares for i in share]
        assert len(set(union)) == W  # shares disjoint, window has W distinct indices
        sets.append(set(union))
    visits = Counter(i for window in sets[: N // S] for i in window)
    assert sorted(visits) == list(range(N))  # the window leaves the first W entries
    assert set(visits.values()) == {W // S}
    for a, b in zip(sets, sets[1:]):
        assert len(a & b) == W - S


def test_sliding_window_deterministic_and_seeded():
    a = _windows(2, range(4), seed=3)
    assert a == _windows(2, range(4), seed=3)
    assert a != _windows(2, range(4), seed=4)
    # shuffled inside the window: the order is not the stream order of consecutive windows
    first = _windows(1, [0, 1])
    assert first[0][0][S:] != first[1][0][: W - S]


def test_window_larger_than_dataset_is_clamped():
    windows = [shares[0] for shares in _windows(1, range(3), n=10, w=100, s=50)]
    assert all(sorted(w) == list(range(10)) for w in windows)  # every window is the whole dataset
    assert windows[0] != windows[1]  # reshuffled each window-epoch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_clamped_window_shares(world):
    windows = _windows(world, range(3), n=10, w=100, s=50)
    for shares in windows:
        assert {len(share) for share in shares} == {-(-10 // world)}
        assert set(i for share in shares for i in share) == set(range(10))


def test_padding_when_window_not_divisible():
    shares = _windows(4, [0], n=30, w=10, s=5)[0]
    assert [len(s) for s in shares] == [3, 3, 3, 3]
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == 10  # the two extra slots repeat window entries
    dropped = [SlidingWindowSampler(range(30), 10, 5, num_replicas=4, rank=r, drop_last=True) for r in range(4)]
    flat = [i for s in dropped for i in s]
    assert [len(s) for s in dropped] == [2, 2, 2, 2] and len(set(flat)) == 8


def test_shuffle_per_epoch_fresh_permutation_per_pass():
    passes = N // S  # windows 0..4 lie in pass 0 (positions 0..23), 6..10 in pass 1
    sets = [set(shares[0]) for shares in _windows(1, range(2 * passes), shuffle_per_epoch=True)]
    for p0 in (0, passes):
        inside = sets[p0: p0 + N // S - 1]
        assert set().union(*inside) == set(range(N))  # a pass still covers everything
        for a, b in zip(inside, inside[1:]):
            assert len(a & b) == W - S  # and keeps sliding
    fixed = [set(shares[0]) for shares in _windows(1, range(2 * passes))]
    assert fixed[passes] == fixed[0]  # without the flag the permutation repeats
    assert sets[passes] != sets[0]  # with it the second pass is a different permutation


@pytest.mark.parametrize("consumed", [0, 3])
def test_sliding_window_resume_continues_sequence(consumed):
    ref = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=1, seed=7)
    expected = []
    for e in range(5):
        ref.set_epoch(e)
        expected.append(list(ref))
    ref.set_epoch(2)
    buf = io.BytesIO()
    torch.save(ref.state_dict(consumed=consumed), buf)
    buf.seek(0)
    resumed = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=1, seed=0)  # seed comes from the state
    resumed.load_state_dict(torch.load(buf))
    resumed.set_epoch(2)
    assert len(resumed) == W // 2 and resumed.num_remaining == W // 2 - consumed
    assert list(resumed) == expected[2][consumed:]
    for e in (3, 4):
        resumed.set_epoch(e)
        assert list(resumed) == expected[e]


def test_sliding_window_state_validation():
    state = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=0).state_dict(consumed=2)
    with pytest.raises(ValueError, match="num_samples is 24 in the checkpoint but 25 here"):
        SlidingWindowSampler(range(N + 1), W, S, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="window_size is 8 in the checkpoint but 12 here"):
        SlidingWindowSampler(range(N), 12, S, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="window_stride is 4 in the checkpoint but 2 here"):
        SlidingWindowSampler(range(N), W, 2, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        SlidingWindowSampler(range(N), W, S, num_replicas=4, rank=0).load_state_dict(state)
    state["consumed"] = 0  # at an epoch boundary the world size may change
    SlidingWindowSampler(range(N), W, S, num_replicas=4, rank=0).load_state_dict(state)


def test_sliding_window_bad_arguments():
    with pytest.raises(ValueError, match="1 <= window_stride <= window_size"):
        SlidingWindowSampler(range(N), 4, 8, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="invalid rank 2 for num_replicas 2"):
        SlidingWindowSampler(range(N), 4, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="empty dataset"):
        SlidingWindowSampler(range(0), 4, 2, num_replicas=1, rank=0)


def test_window_epochs():
    assert window_epochs(200, 1281167, 131072) == 1955  # 256233400 / 131072 = 1954.9
    assert window_epochs(100, 1000, 250) == 400
    assert window_epochs(1, 1000, 300) == 4
    assert window_epochs(5, 10, 100) == 5  # W clamped to N
    with pytest.raises(ValueError):
        window_epochs(1, 0, 10)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_default_sampler_matches_torch(world, shuffle):
    for r in range(world):
        ours = ResumableDistributedSampler(range(10), num_replicas=world, rank=r, shuffle=shuffle, seed=5)
        ref = DistributedSampler(range(10), num_replicas=world, rank=r, shuffle=shuffle, seed=5)
        for e in range(3):
            ours.set_epoch(e)
            ref.set_epoch(e)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_default_sampler_resume_and_validation():
    ref = ResumableDistributedSampler(range(20), num_replicas=2, rank=0, seed=1)
    ref.set_epoch(3)
    expected = list(ref)
    state = ref.state_dict(consumed=4)
    resumed = ResumableDistributedSampler(range(20), num_replicas=2, rank=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert list(resumed) == expected[4:]
    resumed.set_epoch(4)
    ref.set_epoch(4)
    assert list(resumed) == list(ref)
    with pytest.raises(ValueError, match="num_samples is 20 in the checkpoint but 21 here"):
        ResumableDistributedSampler(range(21), num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="kind is distributed in the checkpoint but sliding_window here"):
        SlidingWindowSampler(range(20), 4, 2, num_replicas=2, rank=0).load_state_dict(state)


class _PartCached:
    def __init__(self, n, local):
        self.n, self.local_indices = n, torch.tensor(local)

    def __len__(self):
        return self.n


@pytest.mark.parametrize("sliding", [False, True])
def test_build_sampler_part_cache_uses_local_shard(sliding):
    ds = _PartCached(40, list(range(1, 40, 2)))  # rank 1 of 2: 20 odd indices
    sampler = build_sampler(ds, sliding, window_size=16, window_stride=8, seed=0, shuffle_per_epoch=False,
                            num_replicas=2, rank=1)
    seen = set()
    for e in range(4):
        sampler.set_epoch(e)
        idx = list(sampler)
        assert len(idx) == (8 if sliding else 20) and len(set(idx)) == len(idx)
        seen |= set(idx)
    assert seen == set(range(1, 40, 2))


def _dist_worker(rank, world_size, out_dir):
    import os
    sampler = build_sampler(range(N), True, W, S, seed=0, shuffle_per_epoch=False)
    sampler.set_epoch(2)
    torch.save({"rank": sampler.rank, "world": sampler.num_replicas, "share": list(sampler)},
               os.path.join(out_dir, f"{rank}.pt"))


def test_sampler_takes_rank_from_process_group():
    results = run_distributed(_dist_worker, world_size=2)
    assert [r["rank"] for r in results] == [0, 1] and all(r["world"] == 2 for r in results)
    expected = _windows(2, [2])[0]
    assert [r["share"] for r in results] == expected


# -- computed permutation, memory, per-sample seeds (issue 15, resilience) --------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = FeistelPermutation(n, key=7)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    chunks = np.concatenate([FeistelPermutation(n, key=7)(np.arange(a, min(a + 13, n))) for a in range(0, n, 13)])
    np.testing.assert_array_equal(chunks, perm)  # element-wise: any subset of positions, same values


def test_feistel_permutation_looks_random():
    n, keys = 1000, 200
    perms = np.stack([FeistelPermutation(n, key=k)(np.arange(n)) for k in range(keys)])
    assert len({p.tobytes() for p in perms}) == keys
    # where position 0 lands is uniform over 10 buckets (chi-square, 9 dof, p > 0.001)
    counts = np.bincount(perms[:, 0] * 10 // n, minlength=10)
    assert ((counts - keys / 10) ** 2 / (keys / 10)).sum() < 27.9
    # neighbours are not kept together: consecutive positions land far apart on average
    assert np.abs(np.diff(perms, axis=1)).mean() > n / 5


def test_sliding_window_memory_is_independent_of_n():
    # an O(N) sampler would need terabytes here; ours touches only the window
    n = 10 ** 12
    sampler = SlidingWindowSampler(range(n), 4096, 512, num_replicas=4, rank=1, seed=3)
    sampler.set_epoch(10 ** 6)
    idx = list(sampler)
    assert len(idx) == 1024 and len(set(idx)) == 1024 and all(0 <= i < n for i in idx)
    windows = _windows(1, [5, 6], n=n, w=4096, s=512)
    assert len(set(windows[0][0]) & set(windows[1][0])) == 4096 - 512  # still slides


def _legacy_window(n, w, s, world, rank, seed, epoch):
    """The sequence of the previous implementation (stored randperm), written out here."""
    def gen(stream, k):
        g = torch.Generator()
        mixed = seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + k * 0x94D049BB133111EB
        g.manual_seed(mixed & ((1 << 63) - 1))
        return g
    perm = torch.randperm(n, generator=gen(0, 0))
    pos = epoch * s + torch.arange(min(w, n))
    win = perm[pos % n][torch.randperm(min(w, n), generator=gen(1, epoch))]
    return win[rank::world].tolist()


def test_old_state_dict_resumes_the_old_sequence():
    state = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=1, seed=5).state_dict(consumed=1)
    del state["permutation"]  # as saved before the computed permutation
    state["epoch"] = 3
    resumed = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["permutation"] == "randperm"
    assert list(resumed) == _legacy_window(N, W, S, 2, 1, 5, 3)[1:]
    resumed.set_epoch(4)
    assert list(resumed) == _legacy_window(N, W, S, 2, 1, 5, 4)


def test_sample_index_is_an_int_with_a_seed():
    s = SampleIndex(7, 123)
    assert s == 7 and isinstance(s, int) and s.aug_seed == 123 and torch.tensor([s]).tolist() == [7]
    t = pickle.loads(pickle.dumps([s]))[0]
    assert type(t) is SampleIndex and (int(t), t.aug_seed) == (7, 123)


def _keyed(sampler):
    return [(int(i), i.aug_seed) for i in sampler]


@pytest.mark.parametrize("sliding", [True, False])
def test_seeds_follow_global_position_not_world_size(sliding):
    def make(world, rank, seed=1):
        if sliding:
            return SlidingWindowSampler(range(N), W, S, num_replicas=world, rank=rank, seed=seed)
        return ResumableDistributedSampler(range(N), num_replicas=world, rank=rank, seed=seed)

    for epoch in (0, 3):
        one = make(1, 0)
        one.set_epoch(epoch)
        glob = _keyed(one)
        for world in (2, 4):
            for r in range(world):
                s = make(world, r)
                s.set_epoch(epoch)
                assert _keyed(s) == glob[r::world]  # same global position -> same index and seed
    seeds = [seed for _, seed in glob]
    assert len(set(seeds)) == len(seeds)
    other_epoch, other_seed = make(1, 0), make(1, 0, seed=2)
    other_epoch.set_epoch(4)
    other_seed.set_epoch(3)
    assert not set(seeds) & {s for _, s in _keyed(other_epoch)}
    assert not set(seeds) & {s for _, s in _keyed(other_seed)}
    assert seeds[0] == sample_seed(1, 3, 0) and seeds[5] == sample_seed(1, 3, 5)


def test_seeds_survive_mid_epoch_resume():
    ref = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=0, seed=9)
    ref.set_epoch(2)
    full = _keyed(ref)
    resumed = SlidingWindowSampler(range(N), W, S, num_replicas=2, rank=0)
    resumed.load_state_dict(ref.state_dict(consumed=3))
    assert _keyed(resumed) == full[3:]


def test_part_cache_ranks_get_distinct_seeds():
    seeds = []
    for r in range(2):
        ds = _PartCached(40, list(range(r, 40, 2)))
        sampler = build_sampler(ds, True, window_size=16, window_stride=8, seed=0, shuffle_per_epoch=False,
                                num_replicas=2, rank=r)
        seeds.append({s for _, s in _keyed(sampler)})
    assert len(seeds[0]) == 8 and not seeds[0] & seeds[1]


def test_default_sampler_large_share_is_chunked_and_exact():
    n = 200_003  # several iteration chunks; padding for 3 ranks
    for r in range(3):
        ours = ResumableDistributedSampler(range(n), num_replicas=3, rank=r, seed=4)
        ref = DistributedSampler(range(n), num_replicas=3, rank=r, seed=4)
        ours.set_epoch(1)
        ref.set_epoch(1)
        assert list(ours) == list(ref)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("old_world, new_world, per_rank_done", [(2, 1, 3), (1, 2, 6), (2, 4, 2), (4, 2, 1)])
def test_resume_global_continues_the_epoch_on_another_world_size(sliding, old_world, new_world, per_rank_done):
    """After ``k`` indices per rank on ``old_world`` ranks, the ranks of a run with ``new_world``
    ranks together yield exactly the rest of the epoch's global order (nothing twice, nothing lost)."""
    def make(world, rank):
        if sliding:
            return SlidingWindowSampler(range(N), 16, S, num_replicas=world, rank=rank, seed=3, drop_last=True)
        return ResumableDistributedSampler(range(N), num_replicas=world, rank=rank, seed=3, drop_last=True)

    epoch = 2
    old = [make(old_world, r) for r in range(old_world)]
    for s in old:
        s.set_epoch(epoch)
    full = [list(s) for s in old]
    done = {i for share in full for i in share[:per_rank_done]}
    rest = Counter(i for share in full for i in share[per_rank_done:])
    state = old[0].state_dict(consumed=per_rank_done)
    new = [make(new_world, r) for r in range(new_world)]
    for s in new:
        s.resume_global(state, per_rank_done * old_world)
        s.set_epoch(epoch)  # the restored epoch keeps the offset
    got = Counter(i for s in new for i in s)
    assert got == rest and not done & set(got)
    assert all(s.num_remaining == len(list(s)) for s in new)
