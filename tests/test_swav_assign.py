"""SwAV's assignment crops are explicit (swav's ``crops_for_assign``): they are the large crops, a
``--num-crop`` that would send a small crop into Sinkhorn (or leave a large crop without a code) is
refused in one line, and the loss and the queue use exactly the named crops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast.models import build_method
from contrast.models.swav import SwAV
from contrast.option import method_config, parse_pretrain_args

TAU, EPS, ITERS = 0.1, 0.05, 3


def _cli(*extra):
    return method_config(parse_pretrain_args(["--model", "SwAV", "--arch", "resnet18", "--stem", "small",
                                              "--data-dir", "unused", *extra]))


def test_default_assignment_crops_are_the_two_large_crops():
    cfg = _cli()
    assert cfg.num_crop == 2 and tuple(cfg.option("swav_crops_for_assign")) == (0, 1)
    assert build_method(cfg, 10).crops_for_assign == (0, 1)
    three = _cli("--num-crop", "3", "--swav-crops-for-assign", "0", "1", "2")
    assert build_method(three, 10).crops_for_assign == (0, 1, 2)


@pytest.mark.parametrize("extra,message", [
    (["--num-crop", "1"], r"names crop\(s\) 1, which are not large crops \(--num-crop 1"),
    (["--num-crop", "3"], r"--num-crop 3 gives large crop\(s\) 2 no code"),
    (["--swav-crops-for-assign", "0", "4"], r"names crop\(s\) 4, which are not large crops"),
    (["--swav-crops-for-assign", "0", "0"], r"must name distinct crop indices"),
    (["--swav-crops-for-assign", "-1", "0"], r"must name distinct crop indices >= 0"),
])
def test_wrong_num_crop_or_assignment_crops_are_refused_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message) as err:
        build_method(_cli(*extra), 10)
    assert "\n" not in str(err.value) and str(err.value).startswith("SwAV: ")


# ------------------------------------------------------------------------------ the loss uses the named crops
def _encoder():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _swav(crops, num_crop):
    torch.manual_seed(0)
    return SwAV(_encoder(), 6, feature_dim=4, hidden_dim=8, num_prototypes=5, temperature=TAU, epsilon=EPS,
                sinkhorn_iterations=ITERS, queue_length=0, queue_start_epoch=0, freeze_prototypes_iters=0,
                view_batching="separate", multi_crop=True, crops_for_assign=crops, num_crop=num_crop)


def _views(batch, large, small, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(large)] + \
        [torch.randn(batch, 3, 4, 4, generator=g) for _ in range(small)]


def _sinkhorn(scores):
    """swav's distributed_sinkhorn for one process, in float64."""
    q = torch.exp(scores.double() / EPS).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(ITERS):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def _reference_loss(method, views, assign):
    """main_swav.py's loop: for each crop id in crops_for_assign, its code predicted by every other crop."""
    with torch.no_grad():
        z = [F.normalize(method.head(method.backbone(v)).double(), dim=1) for v in views]
        c = F.normalize(method.prototypes.weight.double(), dim=1)
        scores = [e @ c.t() for e in z]
        loss = 0.0
        for crop in assign:
            q = _sinkhorn(scores[crop])
            sub = sum(-(q * F.log_softmax(scores[v] / TAU, dim=1)).sum(dim=1).mean()
                      for v in range(len(views)) if v != crop)
            loss = loss + sub / (len(views) - 1)
        return loss / len(assign), z


@pytest.mark.parametrize("assign", [(0, 1, 2), (2, 0, 1)])
def test_three_large_crops_all_get_codes_and_the_queue_keeps_them_in_order(assign):
    method = _swav(assign, num_crop=3)
    views = _views(6, large=3, small=2)
    ref, z = _reference_loss(method, views, assign)
    out = method(views, torch.arange(6))
    assert torch.allclose(out["loss"].double(), ref, rtol=1e-5, atol=1e-6)
    two = _reference_loss(method, views, (0, 1))[0]   # what taking the first two crops would give
    assert not torch.allclose(two, ref, rtol=1e-3)
    assert method._pending.shape == (6, 3, 4)
    for j, crop in enumerate(assign):
        assert torch.allclose(method._pending[:, j].double(), z[crop], atol=1e-6)
