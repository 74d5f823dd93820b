"""contrast.distributed: single-process identities and real 2-process gloo behaviour."""
import os

import torch

from contrast import distributed as cd
from tests.dist_utils import run_distributed


def test_single_process_identities():
    x = torch.randn(4, 3, requires_grad=True)
    assert cd.get_world_size() == 1 and cd.get_rank() == 0
    assert cd.all_gather_with_grad(x) is x
    assert torch.equal(cd.all_gather_no_grad(x), x)
    shuffled, unshuffle = cd.batch_shuffle(x.detach())
    assert torch.equal(cd.batch_unshuffle(shuffled, unshuffle), x.detach())
    assert cd.shard_range(10, 0, 3) == (0, 4) and cd.shard_range(10, 2, 3) == (8, 10)


def _gather_worker(rank, world, out_dir):
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    g = cd.all_gather_with_grad(x)
    # loss on each rank weights rows differently: d/dx_r sums over ranks
    w = torch.arange(g.shape[0], dtype=torch.float32).unsqueeze(1) * (rank + 1)
    (g * w).sum().backward()
    v = cd.all_gather_variable(torch.arange(rank + 1, dtype=torch.float32))
    y = torch.arange(8, dtype=torch.float32).view(8, 1) + 10 * rank
    s, un = cd.batch_shuffle(y)
    back = cd.batch_unshuffle(s, un)
    torch.save(dict(g=g.detach(), grad=x.grad, v=v, back=back, y=y, s=s,
                    all_true=cd.all_ranks_true(rank == 0, torch.device("cpu"))),
               os.path.join(out_dir, f"{rank}.pt"))


def test_two_process_gathers():
    r0, r1 = run_distributed(_gather_worker, 2)
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    assert torch.equal(r0["g"], expected) and torch.equal(r1["g"], expected)
    # row weights summed over the two ranks' losses: rank factor 1 + 2 = 3
    rows = torch.arange(4, dtype=torch.float32).unsqueeze(1) * 3
    assert torch.allclose(r0["grad"], rows[:2].expand(2, 3))
    assert torch.allclose(r1["grad"], rows[2:].expand(2, 3))
    assert torch.equal(r0["v"], torch.tensor([0.0, 0.0, 1.0]))
    for r in (r0, r1):
        assert torch.equal(r["back"], r["y"])
        assert r["all_true"] is False
    # the shuffle really mixes ranks: the union of shuffled rows is the global batch
    union = torch.cat([r0["s"], r1["s"]]).flatten().sort().values
    assert torch.equal(union, torch.cat([r0["y"], r1["y"]]).flatten().sort().values)
