"""Full fine-tuning (``main_linear.py --finetune``): the whole network trains, the linear probe's backbone
does not; the same loop (resume, torchrun); the protocol's values against SimCLR's published ones."""
import math
import os
import subprocess
import sys

import pytest
import torch

import main_linear
from contrast.checkpoint import FINETUNE, CheckpointError, read_checkpoint
from contrast.option_eval import eval_config, parse_linear_args, resolve_protocol
from tests.dist_utils import free_port
from tests.test_cli_linear import linear_args, pretrained, stop_after_the_first_epoch  # noqa: F401 (a fixture)
from tests.test_cli_pretrain import ROOT

FT = ["--finetune", "--learning-rate", "0.5"]


def finetune_args(data, ckpt, out, *extra, epochs=1):
    args = linear_args(data, ckpt, out, *extra, epochs=epochs)
    i = args.index("--learning-rate")
    del args[i:i + 2]
    return args + FT


def test_finetune_trains_the_backbone_and_the_linear_probe_does_not(pretrained, tmp_path):
    data, ckpt = pretrained
    pre = read_checkpoint(ckpt).backbone_state()
    main_linear.main(linear_args(data, ckpt, tmp_path / "lin", epochs=1))
    main_linear.main(finetune_args(data, ckpt, tmp_path / "ft"))
    lin, ft = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in ("lin", "ft"))
    assert all(torch.equal(pre[k], lin.backbone_state()[k]) for k in pre)
    moved = {k for k in pre if not torch.equal(pre[k], ft.backbone_state()[k])}
    assert {"conv1.weight", "layer4.1.conv2.weight"} <= moved
    assert "bn1.running_mean" in moved and "layer1.0.bn1.running_var" in moved   # batch norm in train mode
    assert ft.kind == FINETUNE and ft.config["finetune"] and ft.config["nesterov"]
    assert ft.config["effective_lr"] == pytest.approx(0.5 * 4 / 256)
    evaluated = main_linear.main(["-e", "--resume", str(tmp_path / "ft" / "current.pth"), "--data-dir", str(data),
                                  "--output-dir", str(tmp_path / "e"), "--num-workers", "0", "--total-batch-size", "4",
                                  "--no-tensorboard"])
    assert 0 <= evaluated["acc1"] <= 100


def test_finetune_resume_matches_an_uninterrupted_run(pretrained, tmp_path, monkeypatch):
    data, ckpt = pretrained
    args = ("--label-fraction", "0.5", "--total-batch-size", "2")
    straight = main_linear.main(finetune_args(data, ckpt, tmp_path / "a", *args, epochs=2))
    stop_after_the_first_epoch(monkeypatch, finetune_args(data, ckpt, tmp_path / "c", *args, epochs=2))
    resumed = main_linear.main(finetune_args(data, ckpt, tmp_path / "c", *args, "--auto-resume", epochs=2))
    a, c = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in "ac")
    assert a.epoch == c.epoch == 2 and all(torch.equal(a.model[k], c.model[k]) for k in a.model)
    assert resumed == straight
    with pytest.raises(CheckpointError, match="a finetune checkpoint, not a linear evaluation one"):
        main_linear.main(linear_args(data, ckpt, tmp_path / "c", "--auto-resume", epochs=3))


def test_random_init_baseline_is_seeded(pretrained, tmp_path):
    data, _ = pretrained
    base = ["--data-dir", str(data), "--random-init", "--arch", "resnet18", "--stem", "small", "--image-size", "32",
            "--total-batch-size", "4", "--epochs", "1", "--num-workers", "0", "--no-tensorboard"]
    for out in ("r1", "r2"):
        main_linear.main(base + ["--output-dir", str(tmp_path / out), "--finetune", "--learning-rate", "0"])
    r1, r2 = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in ("r1", "r2"))
    assert r1.config["random_init"] and r1.config["stem"] == "small"
    assert all(torch.equal(r1.model[k], r2.model[k]) for k in r1.model)   # same seed, same network


# SimCLR (Chen et al. 2020, arXiv:2002.05709), appendix B.5 "Semi-supervised learning via fine-tuning":
# Nesterov momentum, batch 4096, momentum 0.9, lr 0.8 = 0.05 x BatchSize / 256, no warm-up, random crop
# (with flip, resized to 224) only, no regularisation (no weight decay), 60 epochs for 1 % of the labels
# and 30 for 10 %; evaluation: resize to 256, centre crop 224.
SIMCLR_B5 = {"optimizer": "sgd", "nesterov": True, "momentum": 0.9, "weight_decay": 0.0, "warmup_epoch": 0,
             "epochs": 60, "aug": "NULL", "crop": 0.08, "lr_scaling": "linear", "lr_scheduler": "cosine"}
# google-research/simclr README, "fine-tune the whole network on ImageNet (1% of labels)": --optimizer=lars
# --learning_rate=0.005 --learning_rate_scaling=sqrt --weight_decay=0 --train_epochs=60
# --train_batch_size=1024 --warmup_epochs=0 --global_bn=True
SIMCLR_README = ["--optimizer", "lars", "--learning-rate", "0.005", "--lr-scaling", "sqrt", "--weight-decay", "0",
                 "--epochs", "60", "--total-batch-size", "1024", "--warmup-epoch", "0"]


def resolved(argv, arch="resnet50"):
    """The typed config of ``argv`` with the protocol defaults of ``arch``'s family (main_linear.py takes the
    arch from the checkpoint)."""
    return resolve_protocol(eval_config(parse_linear_args(["--pretrained-model", "x.pth", "--arch", arch, *argv])))


def test_finetune_protocol_is_simclrs():
    cfg = resolved(["--finetune", "--total-batch-size", "4096"])
    got = {**vars(cfg.optim), **vars(cfg.loop), **vars(cfg.data)}
    assert {k: got[k] for k in SIMCLR_B5} == SIMCLR_B5
    assert cfg.optim.learning_rate * 4096 / 256 == pytest.approx(0.8)     # the paper's lr at batch 4096
    assert cfg.model.sync_bn and cfg.data.val_crop_fraction is None      # None: the checkpoint's (0.875)
    assert (cfg.optim.layer_decay, cfg.optim.label_smoothing) == (1.0, 0.0)   # no layer decay, no smoothing
    assert resolved(["--finetune", "--epochs", "30"]).loop.epochs == 30   # 10 % of the labels
    lars = resolved(["--finetune", *SIMCLR_README])
    assert (lars.optim.optimizer, lars.optim.weight_decay, lars.model.sync_bn) == ("lars", 0.0, True)
    from contrast.models.recipe import peak_lr
    assert peak_lr(lars.optim.learning_rate, 1024, lars.optim.lr_scaling) == pytest.approx(0.005 * math.sqrt(1024))
    for arch in ("resnet50", "vit_small"):   # the linear protocol is unchanged, for both families
        lin = resolved([], arch)
        assert (lin.optim.learning_rate, lin.optim.nesterov, lin.loop.epochs, lin.optim.warmup_epoch,
                lin.model.finetune, lin.optim.layer_decay) == (30.0, False, 100, 5, False, 1.0)
    assert eval_config(parse_linear_args(["--pretrained-model", "x.pth", "--finetune"])).optim.learning_rate is None


def test_label_flags_are_checked(capsys):
    for argv, message in ((["--label-fraction", "0"], "--label-fraction must be in (0, 1]"),
                          (["--label-fraction", "0.1", "--label-subset", "f.txt"], "not both"),
                          (["--label-fraction", "0.1", "--cache-mode", "part"], "--cache-mode part"),
                          (["--random-init"], "--random-init needs --arch")):
        with pytest.raises(SystemExit):
            parse_linear_args(["--pretrained-model", "x.pth", *argv] if argv[0] != "--random-init" else argv)
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_torchrun_two_processes(pretrained, tmp_path):
    data, ckpt = pretrained
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "main_linear.py",
                        *finetune_args(data, ckpt, out, "--label-fraction", "0.5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ft = read_checkpoint(str(out / "current.pth"))
    assert ft.kind == FINETUNE and ft.world_size == 2 and ft.config["sync_bn"] and ft.config["train_images"] == 4
    assert len((out / "label_subset.txt").read_text().splitlines()) == 4
    assert "val epoch 1: top-1" in open(out / "log.txt").read()


@pytest.mark.slow
def test_fashion_mnist_finetune_script(pretrained, tmp_path):
    """scripts/finetune_fashion_mnist.sh: the checkpoint and a random-init network fine-tuned on each label
    fraction, the linear probe, kNN and the cached probe; one table row per run (mechanics, not accuracy)."""
    from tests.test_bench_script import fake_fashion_mnist, run_script
    _, ckpt = pretrained
    src = fake_fashion_mnist(tmp_path / "src", num_train=100, num_val=20)
    out = tmp_path / "ft"
    run_script("finetune_fashion_mnist.sh", dict(CKPT=ckpt, SRC=str(src), OUT=str(out), FRACTIONS="0.1",
                                                 EPOCHS_10="1", EPOCHS_100="1", LINEAR_EPOCHS="1", BATCH="10",
                                                 STEM="imagenet", WORKERS="0"))
    rows = [line.split("|")[1:-1] for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    assert [r[0].strip() for r in rows] == ["finetune-0.1", "random-init-0.1", "linear", "kNN k=20", "kNN k=200",
                                            "linear-cached"]
    assert all(0 <= float(r[3]) <= 100 for r in rows)
    assert len((out / "finetune-0.1" / "label_subset.txt").read_text().splitlines()) == 10
    assert read_checkpoint(str(out / "random-init-0.1" / "current.pth")).config["random_init"]
    assert "linear" in __import__("json").loads((out / "knn.json").read_text())
