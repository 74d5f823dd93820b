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


def _bn_net(bn_cls):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    if bn_cls is not None:
        net = cd.convert_sync_batchnorm(net, torch.device("cpu"))
        assert isinstance(net[1], bn_cls)
    return net


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 6, 6, generator=g) * 3 + 1


def _global_bn_worker(rank, world, out_dir):
    net = _bn_net(cd.GlobalBatchNorm)
    x = _batch()[rank * 4:(rank + 1) * 4]
    for _ in range(2):     # two steps: running statistics and gradients of both
        net.zero_grad()
        out = net(x)
        loss = (out ** 2).mean()
        loss.backward()
    grads = {n: cd.all_reduce_mean(p.grad.clone()) for n, p in net.named_parameters()}
    torch.save(dict(out=out.detach(), grads=grads, loss=cd.all_reduce_mean(loss.detach().clone()),
                    state={k: v.clone() for k, v in net.state_dict().items()}),
               os.path.join(out_dir, f"{rank}.pt"))


def test_global_batchnorm_two_ranks_equal_one_rank_whole_batch():
    """Cross-rank BN on gloo: 2 ranks x 4 images give the outputs, loss, averaged gradients and
    running statistics of plain BatchNorm2d on 1 process x 8 images (which per-rank BN would not)."""
    net = _bn_net(None)
    x = _batch()
    for _ in range(2):
        net.zero_grad()
        out = net(x)
        loss = (out ** 2).mean()
        loss.backward()
    r0, r1 = run_distributed(_global_bn_worker, 2)
    assert torch.allclose(torch.cat([r0["out"], r1["out"]]), out.detach(), atol=1e-5)
    assert torch.allclose(r0["loss"], loss.detach(), atol=1e-6)
    for n, p in net.named_parameters():
        assert torch.allclose(r0["grads"][n], p.grad, atol=1e-5), n
    for k, v in net.state_dict().items():
        assert torch.allclose(r0["state"][k].float(), v.float(), atol=1e-5), k
    # per-rank statistics differ from the global ones on this data: the test can see the bug
    local = _bn_net(None)
    local_out = local(x[:4])
    assert not torch.allclose(local_out, out[:4].detach(), atol=1e-3)


def test_convert_sync_batchnorm_single_process_is_identity():
    net = _bn_net(None)
    assert cd.convert_sync_batchnorm(net, torch.device("cpu")) is net
