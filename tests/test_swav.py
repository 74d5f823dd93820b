"""SwAV: Sinkhorn-Knopp and the swapped prediction loss against slow references, the method's codes with
the queue, frozen prototypes, the queue's start and per-rank state, 2 gloo ranks x B/2 == 1 process x B
(Sinkhorn over the global batch and over the union of the ranks' queues), and the command line."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_method
from contrast.models.losses import sinkhorn_knopp, swav_loss
from contrast.models.swav import SwAV
from tests.dist_utils import assert_same_training, run_distributed, train_like_ddp
from tests.synthetic import make_image_folder

DTYPE = torch.float64


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------ Sinkhorn-Knopp
def _sinkhorn_reference(scores, eps, iterations):
    """Alternate scaling written element by element: P (B x K) from exp(s / eps), every prototype
    (column of P) rescaled to total 1/K, then every sample (row) to 1/B; finally rows scaled to sum 1."""
    b, k = scores.shape
    p = [[float(torch.exp(scores[i, j] / eps)) for j in range(k)] for i in range(b)]
    total = sum(sum(row) for row in p)
    p = [[v / total for v in row] for row in p]
    for _ in range(iterations):
        col = [sum(p[i][j] for i in range(b)) for j in range(k)]
        p = [[p[i][j] / col[j] / k for j in range(k)] for i in range(b)]
        row = [sum(p[i]) for i in range(b)]
        p = [[p[i][j] / row[i] / b for j in range(k)] for i in range(b)]
    return torch.tensor([[v * b for v in row] for row in p], dtype=DTYPE)


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_reference(iterations):
    scores = F.normalize(_rand(6, 3, seed=1), dim=1) @ F.normalize(_rand(5, 3, seed=2), dim=1).t()
    got = sinkhorn_knopp(scores.float(), epsilon=0.05, iterations=iterations)
    ref = _sinkhorn_reference(scores, 0.05, iterations)
    assert got.shape == (6, 5) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    """Each code sums to 1 (the last scaling is over samples); the prototypes' totals tend to the
    equipartition B / K as the iterations grow."""
    b, k = 12, 4
    scores = F.normalize(_rand(b, 3, seed=3), dim=1) @ F.normalize(_rand(k, 3, seed=4), dim=1).t()
    q3 = sinkhorn_knopp(scores.float(), 0.05, 3)
    assert torch.allclose(q3.sum(dim=1), torch.ones(b), atol=1e-5) and (q3 >= 0).all()
    gap = [(sinkhorn_knopp(scores.float(), 0.5, n).sum(dim=0) - b / k).abs().max() for n in (1, 3, 100)]
    assert gap[2] < 1e-4 < gap[0] and gap[1] < gap[0]
    plain = F.softmax(scores.float() / 0.5, dim=1).sum(dim=0)   # without balancing: far from B / K
    assert (plain - b / k).abs().max() > 10 * gap[2]


# ------------------------------------------------------------------------------ loss
def _swav_reference(scores, codes, tau):
    """Loops over assignment crops i, other crops v, samples and prototypes."""
    n, total = len(scores), 0
    for i, q in enumerate(codes):
        sub = 0
        for v in range(n):
            if v == i:
                continue
            for b in range(q.shape[0]):
                logits = [scores[v][b, j] / tau for j in range(q.shape[1])]
                log_z = torch.log(sum(torch.exp(x) for x in logits))
                sub = sub - sum(q[b, j] * (logits[j] - log_z) for j in range(q.shape[1])) / q.shape[0]
        total = total + sub / (n - 1)
    return total / len(codes)


def test_swav_loss_and_gradients_match_reference():
    scores = [_rand(3, 4, seed=s).requires_grad_() for s in range(5)]   # 2 large + 3 small crops
    codes = [F.softmax(_rand(3, 4, seed=10 + i), dim=1) for i in range(2)]
    got = swav_loss(scores, codes, 0.1)
    ref = _swav_reference(scores, codes, 0.1)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), ref, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(got, scores), torch.autograd.grad(ref, scores)):
        assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-6) and r.abs().sum() > 0
    with pytest.raises(ValueError, match="needs >= 2 crops"):
        swav_loss(scores[:1], codes[:1], 0.1)


# ------------------------------------------------------------------------------ the method
def _encoder():
    """BN-free: (B, 3, H, W) -> (B, 6) at any resolution. No bias: the head's batch norm would cancel
    its gradient (a shift of all samples), leaving float noise to compare."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _swav(**kw):
    torch.manual_seed(0)
    args = dict(feature_dim=4, hidden_dim=8, num_prototypes=5, temperature=0.1, queue_length=0,
                queue_start_epoch=0, freeze_prototypes_iters=0, multi_crop=True)
    return SwAV(_encoder(), 6, **{**args, **kw})


def _views(batch, seed, small=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 4, 4, generator=g) for _ in range(small)]


def _step(method, opt, views, step):
    """One iteration in the loop's order of hooks."""
    opt.zero_grad()
    out = method(views, torch.arange(views[0].shape[0]))
    out["loss"].backward()
    method.on_before_optimizer_step(step)
    opt.step()
    method.on_train_step_end(step, 0.1)
    return out


def test_network_and_joint_encoding():
    cfg = MethodConfig(name="SwAV", backbone=BackboneConfig("resnet18", "small"), mlp_head=True, feature_dim=128,
                       head_hidden_dim=2048, temperature=0.1, view_batching="joint", multi_crop=True, num_crop=2,
                       options={f.dest: f.default for f in SwAV.flags})
    method = build_method(cfg, num_instances=10)
    assert [type(m) for m in method.head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (method.head[0].in_features, method.head[0].out_features, method.head[3].out_features) == (512, 2048, 128)
    assert method.prototypes.weight.shape == (3000, 128) and method.prototypes.bias is None
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(3000), atol=1e-5)
    assert method.recipe.sync_batchnorm and SwAV.views.multi_crop and SwAV.recipe.view_batching == "joint"
    assert method.rank_state_dict() is None   # no queue by default
    # joint: crops of one size through the backbone together, all crops through the head together
    small = _swav(view_batching="joint")
    calls = {"backbone": [], "head": []}
    small.backbone.register_forward_hook(lambda m, i, o: calls["backbone"].append(i[0].shape[0]))
    small.head.register_forward_hook(lambda m, i, o: calls["head"].append(i[0].shape[0]))
    small(_views(3, 0, small=3), torch.arange(3))
    assert calls == {"backbone": [6, 9], "head": [15]}


def _reference_loss(method, views, queue=None):
    """The loss from the method's own embeddings with the slow Sinkhorn and loss references."""
    with torch.no_grad():
        z = [F.normalize(method.head(method.backbone(v)), dim=1).double() for v in views]
        c = method.prototypes.weight.double()
        scores = [e @ c.t() for e in z]
        codes = []
        for i in range(2):
            s = scores[i] if queue is None else torch.cat([queue[:, i].double() @ c.t(), scores[i]])
            codes.append(_sinkhorn_reference(s, 0.05, 3)[-views[0].shape[0]:])
        return _swav_reference(scores, codes, 0.1), z


def test_method_loss_with_and_without_queue_matches_reference():
    method = _swav(queue_length=3, view_batching="separate")
    method.on_train_start(total_steps=10, steps_per_epoch=5)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    views = _views(3, 1)
    ref, z = _reference_loss(method, views)
    out = _step(method, opt, views, 0)
    assert out["queue_used"] == 0 and torch.allclose(out["loss"].double(), ref, rtol=1e-4)
    stored = torch.stack(z[:2], dim=1)   # (B, 2, D): the large crops' embeddings
    assert torch.allclose(method.queue.features.double(), stored, atol=1e-6)
    views = _views(3, 2)
    ref, _ = _reference_loss(method, views, queue=stored)
    out = method(views, torch.arange(3))
    assert out["queue_used"] == 1 and torch.allclose(out["loss"].double(), ref, rtol=1e-4)
    no_queue, _ = _reference_loss(method, views)
    assert not torch.allclose(no_queue, ref, rtol=1e-3)   # the queue changed the codes


def test_prototypes_frozen_for_the_first_iterations():
    method = _swav(freeze_prototypes_iters=2)
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    initial = method.prototypes.weight.detach().clone()
    head = method.head[0].weight.detach().clone()
    for step in range(2):
        _step(method, opt, _views(4, step), step)
        assert torch.allclose(method.prototypes.weight, initial, atol=1e-6), step
    assert not torch.allclose(method.head[0].weight, head)   # the rest trains meanwhile
    _step(method, opt, _views(4, 2), 2)
    assert (method.prototypes.weight - initial).abs().max() > 1e-3
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(5), atol=1e-6)   # renormalised


def test_queue_starts_after_the_given_epochs_and_is_used_once_full():
    """2 iterations per epoch, start after epoch 1, a queue of 2 batches: written at steps 2 and 3
    (0-based), used from step 4 on."""
    method = _swav(queue_length=8, queue_start_epoch=1)
    method.on_train_start(total_steps=12, steps_per_epoch=2)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    used, filled = [], []
    for step in range(6):
        used.append(float(_step(method, opt, _views(4, step), step)["queue_used"]))
        filled.append(method.queue.filled)
    assert used == [0, 0, 0, 0, 1, 1] and filled == [0, 0, 4, 8, 8, 8]
    with pytest.warns(UserWarning, match="shorter than the global batch 4: no queue"):
        short = _swav(queue_length=3)
        short.on_train_start(10, 5)
        _step(short, torch.optim.SGD(short.parameters(), lr=0.1), _views(4, 0), 0)
    assert short.queue.queue is None
    rounded = _swav(queue_length=10)   # rounded down to 2 global batches of 4
    rounded.on_train_start(10, 5)
    _step(rounded, torch.optim.SGD(rounded.parameters(), lr=0.1), _views(4, 0), 0)
    assert len(rounded.queue.features) == 8


def test_queue_is_saved_per_rank_and_restored():
    method = _swav(queue_length=8)
    method.on_train_start(10, 5)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(3):
        _step(method, opt, _views(4, step), step)
    shard = method.rank_state_dict()
    assert shard["filled"] == 8 and shard["ptr"] == 4 and shard["features"].shape == (8, 2, 4)
    assert not any("queue" in k for k in method.state_dict())   # per-rank: not in the model's state dict
    fresh = _swav(queue_length=8)
    fresh.load_state_dict(method.state_dict())
    fresh.load_rank_state_dicts([shard])
    fresh.on_train_start(10, 5)
    views = _views(4, 9)
    assert torch.equal(fresh(views, torch.arange(4))["loss"], method(views, torch.arange(4))["loss"])
    with pytest.warns(UserWarning, match="saved by 2 rank"):
        fresh.load_rank_state_dicts([shard, shard])
    assert not fresh.queue.full


# ------------------------------------------------------------------------------ 2 ranks x B/2 == 1 x B
GLOBAL_BATCH = 8


def _train(rank, world):
    """Step 0: prototypes frozen, queue written. Step 1: prototypes trained, the queue (one global
    batch) used by Sinkhorn. Global batch norm in the projection head."""
    method = cd.convert_sync_batchnorm(_swav(queue_length=GLOBAL_BATCH, freeze_prototypes_iters=1),
                                       torch.device("cpu"))
    method.on_train_start(total_steps=4, steps_per_epoch=2)
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    record = train_like_ddp(method, opt, [_views(GLOBAL_BATCH, 100 + step) for step in range(2)], rank, world)
    record["queue"] = method.queue.features.clone()
    return record


def _worker(rank, world, out_dir):
    torch.save(_train(rank, world), os.path.join(out_dir, f"{rank}.pt"))


def test_two_ranks_match_one_process():
    ref = _train(0, 1)
    ranks = run_distributed(_worker, 2)
    assert [o["queue_used"] for o in ref["out"]] == [0.0, 1.0]
    assert "prototypes.weight" not in ref["grads"][0] and "prototypes.weight" in ref["grads"][1]
    for got in ranks:
        assert [o["queue_used"] for o in got["out"]] == [0.0, 1.0]
        assert_same_training(got, ref, zero_grads=("head.0.bias",))   # a bias feeding batch norm
    # each rank holds its half of the global batch's embeddings; together, the one process's queue
    half = GLOBAL_BATCH // 2
    for rank, got in enumerate(ranks):
        assert got["queue"].shape == (half, 2, 4)
        assert torch.allclose(got["queue"], ref["queue"][rank * half:(rank + 1) * half], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ command line
def test_pretrain_then_knn_and_linear(pretrained_run):
    """main_knn.py and main_linear.py on the run of test_cli_pretrain.py's cell, and the recipe it recorded."""
    ckpt, _ = pretrained_run("SwAV").evaluated()
    assert ckpt.config["view_batching"] == "joint" and ckpt.config["contrast_temperature"] == 0.1
    assert ckpt.rank_shards and len(ckpt.shard_files) == 1 and torch.load(ckpt.shard_files[0])["state"]["filled"] == 4
    assert "queue_used 1" in open(pretrained_run("SwAV").dir / "log.txt").read()


def test_auto_resume_restores_the_queue(tmp_path, monkeypatch):
    """2 epochs straight == interrupted after epoch 1's checkpoint + --auto-resume: the queue is in use
    in epoch 2, so its per-rank state must come back."""
    import main_pretrain
    from contrast.checkpoint import load_file, read_checkpoint
    from tests.test_cli_pretrain import METHOD_FLAGS, tiny_args
    from tests.test_resume import _Stop, _assert_same_state, _stop_after_first_save
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
    flags = METHOD_FLAGS["SwAV"] + ["--warmup-epoch", "1", "--amp-opt-level", "O0"]
    main_pretrain.main(tiny_args(data, tmp_path / "a", *flags, epochs=2))
    with monkeypatch.context() as m:
        _stop_after_first_save(m)
        with pytest.raises(_Stop):
            main_pretrain.main(tiny_args(data, tmp_path / "b", *flags, epochs=2))
    torch.manual_seed(1234)
    main_pretrain.main(tiny_args(data, tmp_path / "b", *flags, "--auto-resume", epochs=2))
    _assert_same_state(*(load_file(str(tmp_path / d / "current.pth")) for d in "ab"))
    qa, qb = (torch.load(read_checkpoint(str(tmp_path / d / "current.pth")).shard_files[0])["state"] for d in "ab")
    assert qa["filled"] == qb["filled"] == 4 and qa["ptr"] == qb["ptr"]
    assert torch.equal(qa["features"], qb["features"])
