"""One-process MoCo emulates shuffling BN with a split batch norm (the MoCo authors' one-GPU demo):
``SplitBatchNorm`` against batch norm computed per group by hand, evaluation mode against
``nn.BatchNorm2d``, unchanged state-dict keys, and MoCo's keys: with the split BN the shuffled keys
differ from the unshuffled ones and equal per-group batch norm over the shuffled groups."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast import distributed as cd
from contrast.config import BackboneConfig, MethodConfig
from contrast.models import build_backbone, build_method
from contrast.models.moco import MoCo
from contrast.models.split_bn import SplitBatchNorm, convert_split_batchnorm
from contrast.option import method_config, parse_pretrain_args

EPS, MOMENTUM = 1e-5, 0.1


def _split_bn(c=3, splits=4, seed=0):
    torch.manual_seed(seed)
    bn = SplitBatchNorm(c, splits, eps=EPS, momentum=MOMENTUM)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def _reference(x, weight, bias, running_mean, running_var, splits):
    """Batch norm of each group j = samples j, j + splits, ... written out; running statistics: each
    group's momentum update of the shared ones (unbiased variance), averaged over the groups."""
    y = torch.empty_like(x)
    means, variances = [], []
    for j in range(splits):
        g = x[j::splits]
        mean = g.mean(dim=(0, 2, 3))
        var = ((g - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        count = g.numel() / g.shape[1]
        y[j::splits] = (g - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS) \
            * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        means.append((1 - MOMENTUM) * running_mean + MOMENTUM * mean)
        variances.append((1 - MOMENTUM) * running_var + MOMENTUM * var * count / (count - 1))
    return y, sum(means) / splits, sum(variances) / splits


def test_training_mode_is_batch_norm_per_group():
    bn = _split_bn().double()
    x = torch.randn(8, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    ref, ref_mean, ref_var = _reference(x, w, b, bn.running_mean.clone(), bn.running_var.clone(), 4)
    y = bn(x)
    assert torch.allclose(y, ref, atol=1e-10)
    assert torch.allclose(bn.running_mean, ref_mean, atol=1e-12) and torch.allclose(bn.running_var, ref_var, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(got, want):
        assert torch.allclose(a, r, atol=1e-10)
    # not one batch norm over the whole batch
    assert not torch.allclose(y, F.batch_norm(x, None, None, w, b, True, 0.0, EPS), atol=1e-3)


def test_eval_mode_equals_batchnorm2d_with_the_same_running_stats_and_keys():
    split = _split_bn()
    split(torch.randn(8, 3, 4, 4))                        # running stats from a training step
    plain = nn.BatchNorm2d(3, eps=EPS, momentum=MOMENTUM)
    assert list(split.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(split.state_dict())
    split.eval(), plain.eval()
    x = torch.randn(6, 3, 4, 4)                           # any batch size in eval mode
    assert torch.equal(split(x), plain(x))


def test_convert_keeps_parameters_buffers_and_state_dict_keys():
    backbone, _ = build_backbone("resnet18", stem="small")
    keys = list(backbone.state_dict())
    bn1 = backbone.bn1
    converted = convert_split_batchnorm(backbone, 8)
    assert list(converted.state_dict()) == keys
    assert isinstance(converted.bn1, SplitBatchNorm) and converted.bn1.weight is bn1.weight
    assert converted.bn1.running_mean is bn1.running_mean and converted.bn1.num_splits == 8
    assert sum(isinstance(m, SplitBatchNorm) for m in converted.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in converted.modules()) == 20
    plain, _ = build_backbone("resnet18", stem="small")
    plain.load_state_dict(converted.state_dict())           # linear evaluation / export read these keys
    assert convert_split_batchnorm(plain, 1) is plain and not any(isinstance(m, SplitBatchNorm) for m in plain.modules())


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match=r"a batch of 6 \(4x4\) cannot be cut into --bn-splits 4 groups"):
        _split_bn()(torch.randn(6, 3, 4, 4))
    with pytest.raises(ValueError, match=r"--bn-splits must be >= 1, got 0"):
        SplitBatchNorm(3, 0)
    with pytest.raises(ValueError, match=r"MoCo: --batch-size 12 is not divisible by --bn-splits 8 \(one process") as e:
        build_method(method_config(parse_pretrain_args(["--model", "MoCo", "--batch-size", "12", "--data-dir", "x",
                                                        "--arch", "resnet18", "--bn-splits", "8"])), 10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("batch,splits", [(256, 8), (64, 8), (16, 8), (12, 6), (8, 4), (6, 3), (2, 1), (7, 1)])
def test_default_bn_splits_is_the_demos_8_or_what_the_batch_allows(batch, splits):
    assert parse_pretrain_args(["--model", "MoCo", "--data-dir", "x"]).bn_splits is None
    method = build_method(method_config(parse_pretrain_args(["--model", "MoCo", "--batch-size", str(batch),
                                                             "--data-dir", "x", "--arch", "resnet18"])), 10)
    found = {m.num_splits for m in method.backbone.modules() if isinstance(m, SplitBatchNorm)}
    assert found == ({splits} if splits > 1 else set())


# ------------------------------------------------------------------------------ MoCo
def _cfg(**kw):
    return MethodConfig(name="MoCo", backbone=BackboneConfig("resnet18", "small"), feature_dim=8, mlp_head=True,
                        head_hidden_dim=16, temperature=0.2, momentum=0.99, num_negative=16, total_batch_size=8,
                        options={"bn_splits": 4, **kw})


@torch.no_grad()
def test_one_process_moco_keys_see_other_batch_norm_groups_than_unshuffled():
    """The key encoder's batch norm with the shuffle differs from the unshuffled one (without the split,
    a local shuffle leaves every statistic unchanged and both are equal)."""
    method = build_method(_cfg(), 10).train()
    x = torch.randn(8, 3, 16, 16)
    shuffled = method.encode_keys(x)
    unshuffled = F.normalize(method.key_encoder(x), dim=1)
    assert not torch.allclose(shuffled, unshuffled, atol=1e-3)
    method.train(False)                                   # evaluation: running statistics, order-free
    assert torch.allclose(method.encode_keys(x), F.normalize(method.key_encoder(x), dim=1), atol=1e-5)


def _tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


@torch.no_grad()
def test_moco_keys_equal_batch_norm_per_shuffled_group_by_hand():
    splits, batch = 4, 12
    method = MoCo(_tiny_encoder(), 6, feature_dim=4, num_negative=8, bn_splits=splits).train()
    plain = _tiny_encoder()                                # same weights, plain BatchNorm2d
    head = copy.deepcopy(method.head)
    plain.load_state_dict(method.key_encoder.backbone.state_dict())
    x = torch.randn(batch, 3, 5, 5)
    torch.manual_seed(7)
    perm = torch.randperm(batch)                           # the shuffle encode_keys draws after the same seed
    torch.manual_seed(7)
    keys = method.encode_keys(x)
    want = torch.empty(batch, 4)
    for j in range(splits):
        members = perm[j::splits]                          # shuffled positions j, j + splits, ... = one "GPU"
        want[members] = F.normalize(head(plain(x[members])), dim=1)
    assert torch.allclose(keys, want, atol=1e-5)
    queries = [F.normalize(head(plain(x[j::splits])), dim=1) for j in range(splits)]   # the query encoder's groups
    q = torch.empty(batch, 4)
    for j in range(splits):
        q[j::splits] = queries[j]
    assert torch.allclose(F.normalize(method.head(method.backbone(x)), dim=1), q, atol=1e-5)
    assert not torch.allclose(keys, q, atol=1e-3)


def test_several_processes_keep_plain_batch_norm(monkeypatch):
    monkeypatch.setattr(cd, "get_world_size", lambda: 2)
    method = build_method(_cfg(), 10)                      # total batch 8 over 2 ranks: 4 per rank, not refused
    assert not any(isinstance(m, SplitBatchNorm) for m in method.modules())
    monkeypatch.setattr(cd, "get_world_size", lambda: 1)
    method = build_method(_cfg(), 10)
    assert all(isinstance(m, SplitBatchNorm) for m in method.modules() if isinstance(m, nn.BatchNorm2d))
    off = build_method(_cfg(bn_splits=1), 10)
    assert not any(isinstance(m, SplitBatchNorm) for m in off.modules())
