"""Weighted kNN (InstDisc) against a slow reference, sharded feature extraction, the kNN monitor,
and cached-feature linear evaluation."""
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrast.eval.features import ShardSampler, build_eval_loader, extract_features
from contrast.eval.knn import KNNMonitor, knn_evaluate, knn_predict, knn_predict_multi, topk_accuracy
from contrast.eval.linear_cached import train_linear_cached
from main_knn import parse_knn_args
from tests.conftest import trained_looking_backbone


def reference_knn(train, labels, queries, k, temperature, num_classes):
    """Python loops: cosine similarity, sort, take k, sum exp(s/T) per class, normalise."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train_u = [unit(row) for row in train.tolist()]
    out = []
    for q in queries.tolist():
        qu = unit(q)
        sims = sorted(((sum(a * b for a, b in zip(qu, t)), i) for i, t in enumerate(train_u)), reverse=True)
        scores = [0.0] * num_classes
        for s, i in sims[:k]:
            scores[int(labels[i])] += math.exp(s / temperature)
        total = sum(scores)
        out.append([s / total for s in scores])
    return torch.tensor(out, dtype=torch.float64)


def test_knn_predict_matches_reference_with_chunking():
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(37, 5, generator=g) * 3, torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 4, (37,), generator=g)
    for k, t in [(7, 0.1), (1, 0.07), (37, 0.5)]:
        got = knn_predict(train, labels, queries, k=k, temperature=t, num_classes=4, chunk_size=3)
        torch.testing.assert_close(got.double(), reference_knn(train, labels, queries, k, t, 4), atol=1e-5, rtol=1e-4)


def test_knn_small_temperature_does_not_overflow():
    g = torch.Generator().manual_seed(2)
    train, queries = torch.randn(20, 6, generator=g), torch.randn(5, 6, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    got = knn_predict(train, labels, queries, k=5, temperature=0.005, num_classes=3)  # exp(1/0.005) is inf in fp32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference_knn(train, labels, queries, 5, 0.005, 3), atol=1e-4, rtol=1e-3)


def test_knn_multi_k_and_k_larger_than_train():
    g = torch.Generator().manual_seed(3)
    train, queries = torch.randn(9, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    multi = knn_predict_multi(train, labels, queries, [2, 5, 50], 0.2, 3, chunk_size=4)
    for k in (2, 5):
        torch.testing.assert_close(multi[k].double(), reference_knn(train, labels, queries, k, 0.2, 3), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(multi[50].double(), reference_knn(train, labels, queries, 9, 0.2, 3), atol=1e-5, rtol=1e-4)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.05, 0.05, 0.1],    # label 1: top-1 hit
                           [0.3, 0.2, 0.1, 0.15, 0.14, 0.11],   # label 2: rank 6 -> miss both
                           [0.3, 0.2, 0.1, 0.15, 0.14, 0.11]])  # label 4: rank 4 -> top-5 hit
    acc = topk_accuracy(scores, torch.tensor([1, 2, 4]))
    assert acc["top1"] == pytest.approx(100 / 3) and acc["top5"] == pytest.approx(200 / 3)
    assert topk_accuracy(scores[:, :3], torch.tensor([1, 2, 0]))["top5"] == 100.0  # k >= C


def test_knn_evaluate_separable_clusters():
    g = torch.Generator().manual_seed(4)
    centres = torch.eye(5) * 4
    train_labels, val_labels = torch.arange(50) % 5, torch.arange(20) % 5
    train = centres[train_labels] + 0.3 * torch.randn(50, 5, generator=g)
    val = centres[val_labels] + 0.3 * torch.randn(20, 5, generator=g)
    acc = knn_evaluate(train, train_labels, val, val_labels, [3, 200], 0.07, 5)
    assert acc[3]["top1"] == 100.0 and acc[200]["top1"] == 100.0
    shuffled = knn_evaluate(train, train_labels[torch.randperm(50, generator=g)], val, val_labels, [3], 0.07, 5)
    assert shuffled[3]["top1"] < 60.0


# ------------------------------------------------------------------------- feature extraction
class TensorInstances(Dataset):
    """(sample, index, label) items; ``as_list`` wraps the sample in a one-view list like ``aug.cpu``."""

    def __init__(self, x, y, as_list=True):
        self.x, self.y, self.as_list = x, y, as_list
        self.num_classes = int(y.max()) + 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return ([self.x[i]] if self.as_list else self.x[i]), i, int(self.y[i])


def small_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_shard_sampler_covers_dataset_without_padding():
    for n, w in [(7, 2), (2, 3), (0, 2), (10, 4)]:
        blocks = [list(ShardSampler(n, r, w)) for r in range(w)]
        assert sorted(sum(blocks, [])) == list(range(n))
        assert all(len(ShardSampler(n, r, w)) == len(b) for r, b in enumerate(blocks))


def test_extract_features_single_process_order_and_mode():
    x, y = torch.randn(7, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    net = small_net().train()
    feats, labels = extract_features(net, DataLoader(TensorInstances(x, y), batch_size=3), torch.device("cpu"))
    assert net.training
    with torch.no_grad():
        expected = net.eval()(x)
    torch.testing.assert_close(feats, expected)
    assert labels.tolist() == y.tolist()
    normed, _ = extract_features(net, DataLoader(TensorInstances(x, y, as_list=False), batch_size=4),
                                 torch.device("cpu"), normalize=True)
    torch.testing.assert_close(normed, expected / expected.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------- kNN monitor
def test_knn_monitor_restores_mode_and_tracks_best():
    g = torch.Generator().manual_seed(6)
    y_train, y_val = torch.arange(24) % 3, torch.arange(9) % 3
    colour = torch.tensor([[2.0, -1, 0], [-1, 2, 0], [0, -1, 2]])
    x_train = colour[y_train][:, :, None, None] + 0.2 * torch.randn(24, 3, 6, 6, generator=g)
    x_val = colour[y_val][:, :, None, None] + 0.2 * torch.randn(9, 3, 6, 6, generator=g)
    net = small_net().train()
    bn_before = net[1].running_mean.clone()
    monitor = KNNMonitor(TensorInstances(x_train, y_train), TensorInstances(x_val, y_val), torch.device("cpu"),
                         k=5, temperature=0.1, batch_size=5)
    acc = monitor(net)
    assert net.training and torch.equal(net[1].running_mean, bn_before)  # eval mode used, then restored
    with torch.no_grad():
        f_train, f_val = net.eval()(x_train), net(x_val)
    expected = reference_knn(f_train, y_train, f_val, 5, 0.1, 3).argmax(1)
    assert acc["top1"] == pytest.approx(100.0 * (expected == y_val).double().mean().item())
    assert acc["top5"] == 100.0
    assert monitor.best == acc
    zero = nn.Sequential(nn.Flatten(), nn.Linear(108, 4))
    nn.init.zeros_(zero[1].weight)
    nn.init.constant_(zero[1].bias, 1.0)  # all features equal: chance accuracy, best must not drop
    worse = monitor(zero)
    assert worse["top1"] < acc["top1"] and monitor.best == acc


# ---------------------------------------------------------------------------- cached linear
def test_linear_cached_learns_separable_problem_with_copies():
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(4, 16, generator=g) * 3 + 10   # offset: standardisation must cope
    y_train, y_val = torch.arange(80) % 4, torch.arange(40) % 4
    train = centres[y_train] + torch.randn(3, 80, 16, generator=g)   # 3 augmented copies
    val = centres[y_val] + torch.randn(40, 16, generator=g)
    losses = []
    probe, acc = train_linear_cached(train, y_train, val, y_val, 4, epochs=15, lr=0.1, batch_size=16,
                                     log=lambda e, l: losses.append(l))
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    _, chance = train_linear_cached(train, y_train[torch.randperm(80, generator=g)], val, y_val, 4, epochs=15,
                                    lr=0.1, batch_size=16)
    assert chance["top1"] < 60.0
    manual = probe[1](((val - probe[0].running_mean) / (probe[0].running_var + 1e-6).sqrt()))
    assert (manual.argmax(1) == y_val).all()  # the probe is standardise-then-linear


def test_linear_cached_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        train_linear_cached(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3),
                            torch.zeros(2, dtype=torch.long), 2, epochs=1)


# ------------------------------------------------------------------------------ main_knn.py CLI
def _folder(tmp_path):
    from tests.synthetic import make_image_folder
    return make_image_folder(str(tmp_path / "data"), num_classes=3, per_class=5, size=(18, 20))


def _split_tensors(root, split, image_size):
    """The val-transformed images and labels of a split, built here without main_knn."""
    from contrast.data import build_dataset
    from contrast.data.transforms import build_augmentation
    aug = build_augmentation("val", num_views=1, image_size=image_size)
    ds = build_dataset(root, split, False, "no", aug.cpu)
    x = torch.stack([ds[i][0][0] for i in range(len(ds))])
    return aug.device([x])[0], torch.tensor([ds[i][2] for i in range(len(ds))])


def test_main_knn_checkpoint_matches_reference(tmp_path, pretrained_checkpoint):
    import main_knn
    root = _folder(tmp_path)
    backbone = trained_looking_backbone("resnet18", "small", seed=3)
    # An older config: ``small_stem: True`` and no ``stem`` is read as the "small" stem.
    pretrained_checkpoint(tmp_path / "c.pth", backbone, {"arch": "resnet18", "small_stem": True, "model": "MoCo",
                                                         "image_size": 16}, epoch=4)
    result = main_knn.main(["--checkpoint", str(tmp_path / "c.pth"), "--data-dir", root,
                            "--knn-k", "3", "7", "--knn-t", "0.1", "--num-workers", "0", "--batch-size", "4",
                            "--device", "cpu", "--linear-cached", "--linear-epochs", "2", "--linear-aug-copies", "2",
                            "--output", str(tmp_path / "r.json")])
    (xt, yt), (xv, yv) = _split_tensors(root, "train", 16), _split_tensors(root, "val", 16)
    with torch.no_grad():
        ft, fv = backbone.eval()(xt), backbone(xv)
    for k in (3, 7):
        pred = reference_knn(ft, yt, fv, k, 0.1, 3).argmax(1)
        assert result["knn"][str(k)]["top1"] == pytest.approx(100.0 * (pred == yv).double().mean().item())
    assert result["epoch"] == 4 and result["model"] == "MoCo" and result["feat_dim"] == 512
    assert result["linear"]["aug_copies"] == 2 and 0.0 <= result["linear"]["top1"] <= 100.0
    assert (tmp_path / "r.json").is_file()


def test_main_knn_torchrun_two_processes_equals_one(tmp_path):
    """Sharded extraction + gather in the CLI; the val split has one image, so rank 1's block is empty."""
    import glob
    import json
    import subprocess
    import sys
    import main_knn
    from tests.dist_utils import free_port
    root = _folder(tmp_path)
    import shutil
    for path in sorted(glob.glob(os.path.join(root, "val", "*")))[1:]:
        shutil.rmtree(path)
    for path in sorted(glob.glob(os.path.join(root, "val", "*", "*")))[1:]:
        os.remove(path)
    args = ["--random-init", "--arch", "resnet18", "--stem", "small", "--data-dir", root, "--image-size", "8",
            "--knn-k", "1", "4", "--num-workers", "0", "--batch-size", "3", "--device", "cpu"]
    single = main_knn.main(args + ["--save-features", str(tmp_path / "one.pt")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "main_knn.py", *args, "--output", str(tmp_path / "two.json"),
                          "--save-features", str(tmp_path / "two.pt")],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["num_train"] == single["num_train"] == 15 and two["num_val"] == 1
    assert two["knn"] == single["knn"]
    one_f, two_f = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in ("train_feats", "val_feats"):
        torch.testing.assert_close(two_f[key], one_f[key], rtol=0, atol=1e-5)
    for key in ("train_labels", "val_labels"):
        assert torch.equal(two_f[key], one_f[key])
    assert two_f["train_labels"].tolist() == sorted(two_f["train_labels"].tolist())  # dataset order: by class


def test_main_knn_flag_errors(tmp_path, capsys):
    for argv, message in [(["--data-dir", "x"], "exactly one"),
                          (["--data-dir", "x", "--random-init"], "--random-init needs --arch"),
                          (["--data-dir", "x", "--checkpoint", str(tmp_path / "none.pth")], "does not exist"),
                          (["--data-dir", "x", "--raw-pixels", "--knn-k", "0"], "--knn-k")]:
        with pytest.raises(SystemExit):
            parse_knn_args(argv)
        assert message in capsys.readouterr().err


def test_knn_monitor_on_folder(tmp_path):
    root = _folder(tmp_path)
    monitor = KNNMonitor.from_data_dir(root, torch.device("cpu"), zip_mode=False, cache_mode="part", image_size=12,
                                       k=4, temperature=0.2, batch_size=4, num_workers=0)
    assert monitor.num_classes == 3 and len(monitor.train_set) == 15
    net = small_net()
    acc = monitor(net)
    (xt, yt), (xv, yv) = _split_tensors(root, "train", 12), _split_tensors(root, "val", 12)
    with torch.no_grad():
        pred = reference_knn(net.eval()(xt), yt, net(xv), 4, 0.2, 3).argmax(1)
    assert acc["top1"] == pytest.approx(100.0 * (pred == yv).double().mean().item())


class ReplacingInstances(TensorInstances):
    """Item 2 is 'corrupt': the dataset returns item 3 instead (index 3), like the contract's datasets."""

    def __getitem__(self, i):
        return super().__getitem__(3 if i == 2 else i)


def test_extract_features_keeps_slots_of_replaced_items():
    x, y = torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    net = small_net()
    loader = build_eval_loader(ReplacingInstances(x, y), batch_size=2)
    feats, labels = extract_features(net, loader, torch.device("cpu"))
    with torch.no_grad():
        expected = net.eval()(x[[0, 1, 3, 3, 4]])
    torch.testing.assert_close(feats, expected)
    assert labels.tolist() == [0, 1, 0, 0, 1]
