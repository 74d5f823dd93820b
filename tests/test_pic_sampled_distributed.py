"""Sampled PIC classifier on 2 real gloo processes: sharded rows give the single-process result; resharding."""
import os

import torch
import torch.nn.functional as F

from contrast.models.pic_sampled import SampledInstanceClassifier
from tests.dist_utils import run_distributed

N, D, K, B, TAU = 41, 8, 10, 8, 0.2      # N odd: the two shards differ in size


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    index = torch.randint(0, N, (B,), generator=g)
    z = F.normalize(torch.randn(B, D, generator=g), dim=1)
    zs = F.normalize(torch.randn(B, D, generator=g), dim=1)
    return index, z, zs


def _train(clf, steps, rank=0, world=1):
    """Steps of the head on this rank's slice of the global batch; returns the losses."""
    losses = []
    per = B // world
    for step in steps:
        index, z, zs = _batch(step)
        sl = slice(rank * per, (rank + 1) * per)
        loss = clf(z[sl], index[sl], [zs[sl]])
        loss.backward()
        clf.on_train_step_end(step, 0.3 + 0.05 * step)
        losses.append(loss.item())
    return losses


def _worker(rank, world, out_dir, restart_shard):
    clf = SampledInstanceClassifier(N, D, TAU, num_negative=K, weight_decay=1e-2)
    assert clf.shard.stop - clf.shard.start < N
    losses = _train(clf, range(6), rank, world)
    ids, w, u = clf.local_state()
    shard = clf.rank_state_dict()
    resumed = SampledInstanceClassifier(N, D, TAU, num_negative=K, weight_decay=1e-2)
    resumed.load_rank_state_dicts([restart_shard])          # resharding 1 -> 2
    _train(resumed, range(3, 6), rank, world)
    _, w_resumed, u_resumed = resumed.local_state()
    torch.save(dict(losses=losses, ids=ids, w=w, u=u, shard=shard, w_resumed=w_resumed, u_resumed=u_resumed),
               os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_match_one_process_and_reshard_both_ways():
    single = SampledInstanceClassifier(N, D, TAU, num_negative=K, weight_decay=1e-2)
    single_losses = _train(single, range(3))
    restart_shard = single.rank_state_dict()
    single_losses += _train(single, range(3, 6))
    _, w_ref, u_ref = single.local_state()

    r0, r1 = run_distributed(_worker, 2, args=(restart_shard,))
    # each rank's loss is its local mean: their average is the full-batch loss
    mean_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.tensor(r0["losses"]), torch.tensor(r1["losses"]))
    assert torch.equal(torch.cat([r0["ids"], r1["ids"]]), torch.arange(N))
    for key, ref in (("w", w_ref), ("u", u_ref), ("w_resumed", w_ref), ("u_resumed", u_ref)):
        # fp32: the 2-rank gradient is a sum of two half-batch means, rounded differently
        torch.testing.assert_close(torch.cat([r0[key], r1[key]]), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())

    # resharding 2 -> 1: continue the 2-rank run in one process, against the uninterrupted single run
    resumed = SampledInstanceClassifier(N, D, TAU, num_negative=K, weight_decay=1e-2)
    resumed.load_rank_state_dicts([r0["shard"], r1["shard"]])
    _train(resumed, range(6, 10))
    _train(single, range(6, 10))
    _, w_res, u_res = resumed.local_state()
    _, w_ref, u_ref = single.local_state()
    torch.testing.assert_close(w_res, w_ref, rtol=1e-5, atol=1e-6 * w_ref.abs().max().item())
    torch.testing.assert_close(u_res, u_ref, rtol=1e-5, atol=1e-6 * u_ref.abs().max().item())
