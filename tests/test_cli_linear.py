"""End-to-end linear evaluation through ``main_linear.main`` on a tiny pretrained checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

import main_linear
import main_pretrain
from contrast.checkpoint import LINEAR, CheckpointError, read_checkpoint, write_pretrained_checkpoint
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder
from tests.test_cli_pretrain import ROOT, tiny_args


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    data = make_image_folder(str(root / "data"), num_classes=2, per_class=4, size=(36, 36))
    main_pretrain.main(tiny_args(data, root / "pre", "--model", "MoCo", "--contrast-num-negative", "8",
                                      "--bn-splits", "2"))
    return data, str(root / "pre" / "current.pth")


def linear_args(data, ckpt, out, *extra, epochs=2):
    """Arch, stem and image size are not given: they come from the checkpoint (resnet18, 32 px)."""
    return ["--data-dir", str(data), "--pretrained-model", str(ckpt), "--output-dir", str(out),
            "--total-batch-size", "4", "--epochs", str(epochs), "--num-workers", "0",
            "--print-freq", "1", "--warmup-epoch", "0", "--learning-rate", "5", "--no-tensorboard", *extra]


def test_linear_trains_evaluates_and_keeps_backbone(pretrained, tmp_path):
    data, ckpt = pretrained
    out = tmp_path / "eval"
    result = main_linear.main(linear_args(data, ckpt, out))
    assert 0 <= result["last_acc1"] <= 100 and result["best_acc1"] >= result["last_acc1"]
    assert result["last_acc5"] == 100.0  # 2 classes: the top-5 always contains the label
    lin, pre_ckpt = read_checkpoint(str(out / "current.pth")), read_checkpoint(ckpt)
    assert lin.kind == LINEAR and lin.epoch == 2 and lin.extra["best"]["acc1"] == result["best_acc1"]
    assert pre_ckpt.config["stem"] == lin.config["stem"] == "imagenet"
    assert (lin.config["arch"], lin.config["image_size"]) == (pre_ckpt.config["arch"], 32) == ("resnet18", 32)
    assert "small_stem" not in pre_ckpt.config
    pre, post = pre_ckpt.backbone_state(), lin.backbone_state()
    assert pre.keys() == post.keys() and all(torch.equal(pre[k], post[k]) for k in pre)  # frozen, BN stats too
    assert not torch.equal(lin.model["fc.weight"], torch.zeros_like(lin.model["fc.weight"]))
    log = open(out / "log.txt").read()
    assert f"loaded {len(pre)} backbone tensors from {ckpt}" in log and "val epoch 2: top-1" in log
    assert f"backbone resnet18 (imagenet stem), image size 32, val crop fraction 0.875; from {ckpt}: arch, stem, " \
           f"image_size, val_crop_fraction" in log

    again = main_linear.main(["-e", "--resume", str(out / "current.pth"), "--data-dir", str(data), "--output-dir",
                              str(tmp_path / "e"), "--num-workers", "0", "--total-batch-size", "4", "--no-tensorboard"])
    assert again["acc1"] == pytest.approx(result["last_acc1"])


def stop_after_the_first_epoch(monkeypatch, argv):
    """Run ``main_linear.main(argv)`` until its first epoch checkpoint is written, then stop it."""
    from contrast import engine
    real = engine.Checkpointer.save_epoch

    class Stop(Exception):
        pass

    def save_then_stop(*a, **kw):
        real(*a, **kw)
        raise Stop
    with monkeypatch.context() as m:
        m.setattr(engine.Checkpointer, "save_epoch", save_then_stop)
        with pytest.raises(Stop):
            main_linear.main(argv)


def test_linear_auto_resume_matches(pretrained, tmp_path, monkeypatch):
    """2 epochs straight == stopped after epoch 1's checkpoint + --auto-resume."""
    data, ckpt = pretrained
    straight = main_linear.main(linear_args(data, ckpt, tmp_path / "a"))
    stop_after_the_first_epoch(monkeypatch, linear_args(data, ckpt, tmp_path / "c"))
    resumed = main_linear.main(linear_args(data, ckpt, tmp_path / "c", "--auto-resume"))
    a, c = read_checkpoint(str(tmp_path / "a" / "current.pth")), read_checkpoint(str(tmp_path / "c" / "current.pth"))
    assert all(torch.equal(a.model[k], c.model[k]) for k in a.model)
    assert resumed["last_acc1"] == straight["last_acc1"]


def test_backbone_change_is_detected(pretrained, tmp_path, monkeypatch):
    """If BN were left in train mode its running statistics would move: the check must raise."""
    data, ckpt = pretrained
    monkeypatch.setattr(main_linear.LinearClassifier, "train", torch.nn.Module.train)
    with pytest.raises(RuntimeError, match="frozen backbone changed during linear training: .*running_mean"):
        main_linear.main(linear_args(data, ckpt, tmp_path / "x", epochs=1))


def test_bad_checkpoints(pretrained, tmp_path):
    data, ckpt = pretrained
    with pytest.raises(CheckpointError, match=r"current\.pth: checkpoint does not fit this model \(the checkpoint "
                                              r"holds model=MoCo, arch=resnet18, stem=imagenet, mlp_head=False, "
                                              r"feature_dim=16, image_size=32\)"):
        main_linear.main(linear_args(data, ckpt, tmp_path / "o", "--arch", "resnet34"))
    for stem in (["--stem", "small-maxpool"], ["--small-stem"]):  # the pretraining used the imagenet stem
        with pytest.raises(CheckpointError, match=r"current\.pth: .*shape mismatch \(e\.g\. conv1\.weight"):
            main_linear.main(linear_args(data, ckpt, tmp_path / "o", *stem))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match=r"junk\.pth: not a readable PyTorch checkpoint"):
        main_linear.main(linear_args(data, junk, tmp_path / "o"))
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*absent\.pth"):
        main_linear.main(linear_args(data, tmp_path / "absent.pth", tmp_path / "o"))
    nobackbone = tmp_path / "nb.pth"
    write_pretrained_checkpoint(str(nobackbone), {"head.weight": torch.zeros(2)}, {"arch": "resnet18"}, 1)
    with pytest.raises(CheckpointError, match=r"nb\.pth: no 'backbone\.' tensors"):
        main_linear.main(linear_args(data, nobackbone, tmp_path / "o"))


def test_bad_linear_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main_linear.main(["--data-dir", str(tmp_path)])
    assert "--pretrained-model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_linear.main(["-e", "--data-dir", str(tmp_path)])
    assert "-e/--eval needs the linear checkpoint" in capsys.readouterr().err


def test_linear_torchrun_two_processes(pretrained, tmp_path):
    data, ckpt = pretrained
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "main_linear.py", *linear_args(data, ckpt, out, epochs=1)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lin = read_checkpoint(str(out / "current.pth"))
    assert lin.world_size == 2 and lin.config["per_process_batch"] == 2
    assert "val epoch 1: top-1" in open(out / "log.txt").read()


def test_config_json_repeats_the_linear_run(pretrained, tmp_path):
    """config.json is the versioned grouped dump; `--config OUT/config.json --output-dir OUT2` parses to the
    same settings (arch, stem and image size resolved from the checkpoint included) and the same weights."""
    import json
    from contrast.option_eval import eval_config, parse_linear_args
    data, ckpt = pretrained
    argv = linear_args(data, ckpt, tmp_path / "a", "--label-fraction", "0.5", epochs=1)
    main_linear.main(argv)
    path = tmp_path / "a" / "config.json"
    dump = json.loads(path.read_text())
    assert dump["config_version"] == 2 and dump["eval"] == {}
    assert dump["method"]["arch"] == "resnet18" and dump["data"]["label_fraction"] == 0.5
    assert dump["optim"]["learning_rate"] == 5 and dump["run"]["effective_lr"] == 5 * 4 / 256
    used, _ = main_linear.resolve_backbone(eval_config(parse_linear_args(argv)), read_checkpoint(ckpt))
    again = eval_config(parse_linear_args(["--config", str(path)]))
    assert again == used
    main_linear.main(["--config", str(path), "--output-dir", str(tmp_path / "b")])
    a, b = (read_checkpoint(str(tmp_path / d / "current.pth")) for d in "ab")
    assert a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert (tmp_path / "a" / "label_subset.txt").read_text() == (tmp_path / "b" / "label_subset.txt").read_text()


def test_every_evaluation_flag_has_one_group():
    """main_linear.py and main_knn.py: each flag (but --help, --config) is a field of exactly one typed group."""
    from dataclasses import fields
    import main_knn
    from contrast.evalconfig import EVAL_GROUPS, KNN_GROUPS
    from contrast.option_eval import linear_parser
    for parser, groups in ((linear_parser(), EVAL_GROUPS), (main_knn.knn_parser(), KNN_GROUPS)):
        dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "config"}
        in_groups = [f.name for cls in groups.values() for f in fields(cls)]
        assert sorted(in_groups) == sorted(dests), parser.prog
