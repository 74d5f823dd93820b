"""Dense PIC stability (issue 16): the diagnostics' bookkeeping and the fixes' mechanics.

Every expected value is computed here by hand or with a slow loop, never by the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from contrast.checkpoint import read_checkpoint
from contrast.models import build_method
from contrast.models.pic import PIC, DenseInstanceClassifier, build_instance_classifier, build_pic_head
from contrast.option import method_config, parse_pretrain_args
from contrast.models.pic_diagnostics import PICDiagnostics, staleness, window_steps_of


def tiny_encoder():
    """BN-free encoder accepting any resolution: (B, 3, H, W) -> (B, 6)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


def images(b, size, seed):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


# ------------------------------------------------------------------------------ staleness bookkeeping
def test_staleness_counters_on_a_hand_built_sequence():
    diag = PICDiagnostics(num_instances=6, window_steps=2, every=100, num_tracked=6)
    weight = torch.randn(6, 4)
    batches = [[0, 1], [2, 3], [0, 4], [5, 5], [1]]
    for b in batches:
        diag.observe(_unit(len(b), 4, 0), torch.tensor(b), weight)
    # steps 0..4; last visit of 0 at step 2, 1 at 4, 2/3 at 1, 4 at 2, 5 at 3 (twice in one batch)
    assert diag.step == 5
    assert diag.last_seen.tolist() == [2, 4, 1, 1, 2, 3]
    assert staleness(diag.last_seen, 5).tolist() == [3, 1, 4, 4, 3, 2]
    assert staleness(torch.tensor([-1, 0]), 7).tolist() == [-1, 7]     # never seen stays -1


def test_window_steps_of_the_pilot():
    # W 512, S 128, B 128: an instance is in 4 consecutive window-epochs of 4 steps each.
    assert window_steps_of(512, 128, 128) == 16
    assert window_steps_of(256, 64, 64) == 16
    assert window_steps_of(100, 100, 64) == 2


# ------------------------------------------------------------------------------ measured scalars
def test_batch_scalars_split_returning_and_revisiting_instances():
    n, d = 8, 5
    weight = torch.randn(n, d)
    diag = PICDiagnostics(n, window_steps=2, every=1, num_tracked=n)
    diag.observe(_unit(2, d, 1), torch.tensor([0, 1]), weight)        # step 0
    for _ in range(3):                                                # steps 1..3
        diag.observe(_unit(1, d, 2), torch.tensor([7]), weight)
    z, index = _unit(3, d, 3), torch.tensor([0, 1, 7])                # step 4: 0, 1 return (4 > 2), 7 revisits
    out = diag.observe(z, index, weight)
    u = F.normalize(weight, dim=1)
    pos, neg = [], []
    for i, y in enumerate(index.tolist()):
        pos.append(float(z[i] @ u[y]))
        neg.append(max(float(z[i] @ u[j]) for j in range(n) if j != y))
    assert out["diag/pos_cos"] == pytest.approx(sum(pos) / 3, abs=1e-6)
    assert out["diag/maxneg_cos"] == pytest.approx(sum(neg) / 3, abs=1e-6)
    assert out["diag/margin_neg_frac"] == pytest.approx(sum(p < q for p, q in zip(pos, neg)) / 3)
    assert out["diag/pos_cos_return"] == pytest.approx((pos[0] + pos[1]) / 2, abs=1e-6)
    assert out["diag/maxneg_cos_return"] == pytest.approx((neg[0] + neg[1]) / 2, abs=1e-6)
    assert out["diag/pos_cos_revisit"] == pytest.approx(pos[2], abs=1e-6)
    then = _unit(2, d, 1)                                             # their embeddings at step 0
    assert out["diag/feat_cos_return"] == pytest.approx(float((z[:2] * then).sum(1).mean()), abs=1e-6)
    assert out["diag/row_cos_return"] == pytest.approx(float((u[:2] * then).sum(1).mean()), abs=1e-6)


def test_row_scalars_fresh_vs_stale_and_turn_per_step():
    n, d = 4, 3
    diag = PICDiagnostics(n, window_steps=1, every=2, num_tracked=n)
    e = torch.eye(3)
    weight = torch.stack([e[0] * 2.0, e[1] * 3.0, e[2], e[0] + e[1]])
    feats = {0: e[0], 1: -e[1], 2: F.normalize(e[0] + e[2], dim=0)}
    assert diag.observe(torch.stack([feats[0], feats[1]]), torch.tensor([0, 1]), weight) != {}   # step 0 measures
    assert diag.observe(feats[2][None], torch.tensor([2]), weight) == {}                         # step 1 does not
    diag.set_lr(0.5)
    # step 2: rows 0, 1 are stale (age 2 > 1), row 2 fresh (age 1), row 3 never seen; row 0 turned by 90 deg.
    weight2 = weight.clone()
    weight2[0] = e[2] * 2.0
    z = torch.stack([e[1], e[1]])
    out = diag.observe(z, torch.tensor([3, 3]), weight2)
    assert out["diag/own_cos_fresh"] == pytest.approx(float(F.normalize(e[2], dim=0) @ feats[2]), abs=1e-6)
    # stale: row 0 (now e2) vs its feature e0 -> 0; row 1 (e1) vs -e1 -> -1
    assert out["diag/own_cos_stale"] == pytest.approx(-0.5, abs=1e-6)
    assert out["diag/mean_cos_stale"] == pytest.approx((0.0 + 1.0) / 2, abs=1e-6)        # batch mean is e1
    assert out["diag/mean_cos_fresh"] == pytest.approx(0.0, abs=1e-6)
    assert out["diag/nn_cos_stale"] == pytest.approx(0.5, abs=1e-6)
    assert out["diag/feat_mean_norm"] == pytest.approx(1.0, abs=1e-6)
    assert out["diag/turn_stale"] == pytest.approx((math.pi / 2 + 0.0) / 2 / 2, abs=1e-5)  # 2 steps apart
    assert out["diag/turn_fresh"] == pytest.approx(0.0, abs=1e-6)
    assert out["diag/w_norm_stale"] == pytest.approx(2.5, abs=1e-6)
    assert out["diag/w_norm_fresh"] == pytest.approx(1.0, abs=1e-6)
    norms = torch.tensor([2.0, 3.0, 1.0, math.sqrt(2)])
    assert out["diag/lr_over_w"] == pytest.approx(0.5 / float(norms.mean()), rel=1e-5)
    assert out["diag/lr_over_w2"] == pytest.approx(0.5 / float((norms ** 2).mean()), rel=1e-5)
    assert out["diag/stale_frac"] == pytest.approx(0.5)
    assert out["diag/staleness_mean"] == pytest.approx((2 + 2 + 1) / 3)


def test_tracked_subset_is_fixed_and_sized():
    diag = PICDiagnostics(1000, window_steps=4, every=1, num_tracked=64, seed=3)
    again = PICDiagnostics(1000, window_steps=4, every=1, num_tracked=64, seed=3)
    assert diag.tracked.numel() == 64 and torch.equal(diag.tracked, again.tracked)
    assert torch.equal(diag.slot[diag.tracked], torch.arange(64))
    assert int((diag.slot >= 0).sum()) == 64
    with pytest.raises(ValueError, match="positive"):
        PICDiagnostics(10, window_steps=0)


def test_classifier_reports_diagnostics_only_when_training_and_not_on_every_step():
    clf = DenseInstanceClassifier(6, 4, 0.2, diagnostics=PICDiagnostics(6, 2, every=2))
    z, index = _unit(3, 4, 0), torch.tensor([0, 2, 5])
    clf(z, index)
    assert "diag/pos_cos" in clf.stats()
    clf(z, index)
    assert "diag/pos_cos" not in clf.stats()          # step 1: not a measuring step
    clf.eval()
    clf(z, index)
    assert clf.diagnostics.step == 2                   # evaluation passes are not counted
    clf.on_train_step_end(0, 0.25)
    assert clf.diagnostics.lr == 0.25


# ------------------------------------------------------------------------------ fix: constant table lr
def test_constant_table_lr_is_a_parameter_group_and_leaves_the_gradients_alone():
    """The constant lr is the table's own optimiser group (tests/test_pic_table_lr.py trains it against
    SGD); the gradients of W and of the embeddings are the loss's, whatever lr the schedule is at."""
    torch.manual_seed(0)
    clf = DenseInstanceClassifier(6, 4, 0.2, table_lr=0.3)
    z_param = torch.nn.Parameter(_unit(3, 4, 2))
    index = torch.tensor([1, 4, 4])
    w = clf.weight.detach().clone().requires_grad_()
    z = z_param.detach().clone().requires_grad_()
    F.cross_entropy(F.normalize(z, dim=1) @ F.normalize(w, dim=1).t() / 0.2, index).backward()
    clf.on_train_step_end(0, 0.01)                                     # the schedule is at lr 0.01
    clf(F.normalize(z_param, dim=1), index).backward()
    assert torch.allclose(clf.weight.grad, w.grad, atol=1e-7)
    assert torch.allclose(z_param.grad, z.grad, atol=1e-7)


# ------------------------------------------------------------------------------ fix: centred embeddings
def test_head_center_zero_batch_mean_and_keys():
    torch.manual_seed(0)
    plain = build_pic_head(6, 4, mlp_head=True, center=False)
    centred = build_pic_head(6, 4, mlp_head=True, center=True)
    assert set(plain.state_dict()) <= set(centred.state_dict())        # head.0 / head.2 keys unchanged
    centred.train()
    x = torch.randn(16, 6) + 5.0
    y = centred(x)
    h = centred[2](centred[1](centred[0](x)))
    assert torch.allclose(y, (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5), atol=1e-5)
    assert torch.allclose(y.mean(dim=0), torch.zeros(4), atol=1e-5)
    assert not any(p.requires_grad for n, p in centred.named_parameters() if n.startswith("3."))
    linear = build_pic_head(6, 4, mlp_head=False, center=True)
    assert isinstance(linear[0], torch.nn.Linear) and isinstance(linear[1], torch.nn.BatchNorm1d)


def test_pic_with_centred_head_classifies_the_centred_embedding():
    method = PIC(tiny_encoder(), 6, num_instances=5, feature_dim=4, mlp_head=True, temperature=0.3,
                 head_center=True)
    x, index = images(4, 8, 0), torch.tensor([0, 1, 4, 2])
    loss = method([x], index)["loss"]
    h = method.head[:3](method.backbone(x))
    zc = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    ref = F.cross_entropy(F.normalize(zc, dim=1) @ F.normalize(method.classifier.weight, dim=1).t() / 0.3, index)
    assert torch.allclose(loss, ref, atol=1e-5)


# ------------------------------------------------------------------------------ wiring
def _pic(flags, num_instances=20):
    args = parse_pretrain_args(["--model", "PIC", "--arch", "resnet18", "--stem", "small", "--mlp-head",
                                "--feature-dim", "8", "--batch-size", "4", "--use-sliding-window-sampler",
                                "--window-size", "8", "--window-stride", "2", *flags])
    return build_method(method_config(args, world_size=2), num_instances)


def test_method_config_wires_the_flags():
    plain = _pic([])
    assert plain.classifier.diagnostics is None and plain.classifier.table_lr == 0.0
    assert not isinstance(plain.head[-1], torch.nn.BatchNorm1d)
    m = _pic(["--pic-diagnostics", "--pic-diagnostics-freq", "3", "--pic-head-center"])
    # total batch 4 x 2 processes: W/S = 4 window-epochs of ceil(8 / 8) = 1 step each
    assert m.classifier.diagnostics.every == 3 and m.classifier.diagnostics.window_steps == 4
    assert isinstance(m.head[-1], torch.nn.BatchNorm1d)
    t = _pic(["--pic-table-constant-lr", "--base-learning-rate", "0.06", "--batch-size", "128"])
    assert t.classifier.table_lr == pytest.approx(0.06 * 128 * 2 / 256)
    with pytest.raises(ValueError, match="--pic-num-negative 0"):
        build_instance_classifier(20, 8, 0.2, num_negative=4, table_lr=0.1)
    with pytest.raises(ValueError, match="--pic-num-negative 0"):
        _pic(["--pic-diagnostics", "--pic-num-negative", "4"])


# ------------------------------------------------------------------------------ end to end
def test_pretraining_logs_the_diagnostics_with_the_fixes_on(tmp_path):
    import main_pretrain
    from tests.synthetic import make_image_folder
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
    out = tmp_path / "run"
    main_pretrain.main(["--data-dir", str(data), "--output-dir", str(out), "--arch", "resnet18", "--image-size",
                        "32", "--batch-size", "4", "--epochs", "2", "--num-workers", "0", "--print-freq", "1",
                        "--feature-dim", "16", "--warmup-epoch", "0", "--no-tensorboard", "--base-learning-rate",
                        "0.5", "--model", "PIC", "--aug", "SimCLR", "--mlp-head", "--use-sliding-window-sampler",
                        "--window-size", "4", "--window-stride", "2", "--pic-diagnostics",
                        "--pic-diagnostics-freq", "2", "--pic-head-center", "--pic-table-constant-lr"])
    lines = [line for line in open(out / "log.txt") if "train epoch" in line]
    assert len(lines) == 4                                         # 2 plain epochs of 8 images = 4 windows of 4
    assert [" diag/pos_cos " in line for line in lines] == [True, False, True, False]   # steps 0 and 2
    model = read_checkpoint(str(out / "current.pth")).model
    assert "head.3.running_mean" in model and model["classifier.weight"].shape == (8, 16)
    groups = torch.load(out / "current.pth", weights_only=False)["optimizer"]["param_groups"]
    assert [g.get("constant_lr", False) for g in groups] == [False, True]    # the table's own group
    assert groups[1]["lr"] == pytest.approx(0.5 * 4 / 256) and groups[0]["lr"] < groups[1]["lr"]
