"""End-to-end pretraining through ``main_pretrain.main`` on tiny synthetic data (CPU).

Scale: ResNet-18 with the standard stem at 32 px (the small stem costs 16x more), 8 images,
batch 4, one epoch, so each run is a couple of iterations.
"""
import os
import subprocess
import sys
import zipfile
from contextlib import nullcontext

import pytest
import torch

import main_pretrain
from contrast.checkpoint import read_checkpoint
from contrast.engine import NonFiniteLossError
from contrast.precision import build_precision
from contrast.runconfig import flat_config
from tests.dist_utils import free_port
from tests.sequence_runner import joined
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHOD_FLAGS = {
    "PIC": ["--model", "PIC", "--aug", "SimCLR", "--mlp-head", "--use-sliding-window-sampler",
            "--window-size", "8", "--window-stride", "4"],
    "PIC_multicrop": ["--model", "PIC", "--aug", "MultiCrop", "--image-size2", "16", "--num-crop2", "2",
                      "--crop", "0.08", "--crop2", "0.3"],
    "PIC_multicrop_2_large": ["--model", "PIC", "--aug", "MultiCrop", "--num-crop", "2", "--image-size2", "16",
                              "--num-crop2", "1", "--crop", "0.08"],
    "PIC_sampled": ["--model", "PIC", "--aug", "SimCLR", "--mlp-head", "--pic-num-negative", "4"],
    "InstDisc": ["--model", "InstDisc", "--aug", "InstDisc", "--crop", "0.2", "--contrast-num-negative", "16"],
    "MoCo": ["--model", "MoCo", "--aug", "MoCov2", "--mlp-head", "--contrast-num-negative", "16", "--bn-splits", "2"],
    "MoCov2": ["--model", "MoCov2", "--contrast-num-negative", "16", "--mlp-hidden-dim", "64"],
    "SimCLR": ["--model", "SimCLR", "--aug", "SimCLR", "--mlp-head", "--optimizer", "lars"],
    "BYOL": ["--model", "BYOL", "--optimizer", "lars", "--mlp-hidden-dim", "64"],
    "SwAV": ["--model", "SwAV", "--aug", "MultiCrop", "--image-size2", "24", "--num-crop2", "2", "--crop", "0.08",
             "--crop2", "0.3", "--mlp-hidden-dim", "64", "--swav-num-prototypes", "10", "--swav-queue-length", "4",
             "--swav-queue-start-epoch", "0", "--swav-freeze-prototypes-iters", "1", "--optimizer", "lars"],
    "DINO": ["--model", "DINO", "--image-size2", "16", "--num-crop2", "2", "--crop", "0.08", "--crop2", "0.3",
             "--mlp-hidden-dim", "64", "--dino-bottleneck-dim", "8", "--dino-warmup-teacher-temp-epochs", "2",
             "--weight-decay-end", "0.01"],
    "NNCLR": ["--model", "NNCLR", "--optimizer", "lars", "--mlp-hidden-dim", "64", "--nnclr-pred-hidden-dim", "64",
              "--nnclr-support-size", "16"],
    "BarlowTwins": ["--model", "BarlowTwins", "--mlp-hidden-dim", "64"],
    "VICReg": ["--model", "VICReg", "--mlp-hidden-dim", "64"],
    "MoCov3": ["--model", "MoCov3", "--optimizer", "lars", "--mlp-hidden-dim", "64"],
    "SimSiam": ["--model", "SimSiam", "--mlp-hidden-dim", "64", "--simsiam-pred-dim", "8"],
}


def test_every_registered_method_has_tiny_flags():
    """The generic tests (CLI, resume, meta device, host reads) run every method through METHOD_FLAGS."""
    from contrast.models import METHODS
    assert set(METHODS) <= {flags[1] for flags in METHOD_FLAGS.values()}


def tiny_args(data_dir, out_dir, *extra, epochs=1):
    return ["--data-dir", str(data_dir), "--output-dir", str(out_dir), "--arch", "resnet18", "--image-size", "32",
            "--batch-size", "4", "--epochs", str(epochs), "--num-workers", "0", "--print-freq", "1",
            "--feature-dim", "16", "--warmup-epoch", "0", "--no-tensorboard", "--base-learning-rate", "0.5",
            *extra]


def pretrain(tmp_path, method: str) -> str:
    """Pretrain ``METHOD_FLAGS[method]`` on a tiny folder (8 images, batch 4, one epoch); returns the run's
    directory."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(36, 36))
    main_pretrain.main(tiny_args(data, tmp_path / "pre", *METHOD_FLAGS[method]))
    return str(tmp_path / "pre")


def evaluate(tmp_path, run_dir: str, method: str):
    """Evaluate the checkpoint of ``pretrain`` with main_knn.py and one epoch of main_linear.py (they read the
    ``backbone.`` tensors only); checks the linear run kept the backbone. Returns the pretraining checkpoint
    and the kNN result."""
    import main_knn
    import main_linear
    data = os.path.join(os.path.dirname(run_dir), "data")
    path = os.path.join(run_dir, "current.pth")
    knn = main_knn.main(["--checkpoint", path, "--data-dir", data, "--knn-k", "3", "--num-workers", "0",
                         "--batch-size", "4", "--device", "cpu"])
    assert knn["model"] == METHOD_FLAGS[method][1] and 0 <= knn["knn"]["3"]["top1"] <= 100
    lin = main_linear.main(["--data-dir", data, "--pretrained-model", path, "--output-dir", str(tmp_path / "lin"),
                            "--total-batch-size", "4", "--epochs", "1", "--num-workers", "0", "--warmup-epoch", "0",
                            "--no-tensorboard"])
    assert 0 <= lin["last_acc1"] <= 100
    ckpt = read_checkpoint(path)
    pre, post = ckpt.backbone_state(), read_checkpoint(str(tmp_path / "lin" / "current.pth")).backbone_state()
    assert pre.keys() == post.keys() and all(torch.equal(pre[k], post[k]) for k in pre)
    return ckpt, knn


def pretrain_then_evaluate(tmp_path, method: str):
    """``pretrain`` then ``evaluate``: (the pretraining checkpoint, the kNN result)."""
    return evaluate(tmp_path, pretrain(tmp_path, method), method)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=4, size=(36, 36))


def make_zip_dataset(folder: str, out: str) -> str:
    """ImageNet-Zip layout (<split>.zip + <split>_map.txt) with the images of an image folder."""
    os.makedirs(out, exist_ok=True)
    for split in ("train", "val"):
        classes = sorted(os.listdir(os.path.join(folder, split)))
        with zipfile.ZipFile(os.path.join(out, f"{split}.zip"), "w") as zf, \
                open(os.path.join(out, f"{split}_map.txt"), "w") as mf:
            for label, c in enumerate(classes):
                for name in sorted(os.listdir(os.path.join(folder, split, c))):
                    zf.write(os.path.join(folder, split, c, name), f"{c}/{name}")
                    mf.write(f"{c}/{name}\t{label}\n")
    return out


def log_lines(out_dir, word="train epoch"):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [line for line in f if word in line]


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_every_method_pretrains_and_saves(method, pretrained_run):
    """The run is shared with the methods' own tests (``pretrained_run``), which evaluate it and check their
    recipe in it."""
    out = pretrained_run(method).dir
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.resumable and len(ckpt.sampler_states) == 1
    assert ckpt.epoch == 1 and ckpt.world_size == 1
    assert ckpt.step == 2  # 8 images (PIC: one window of 8), batch 4
    assert ckpt.effective_lr == pytest.approx(0.5 * 4 / 256)
    assert os.path.isfile(out / "ckpt_epoch_1.pth")  # the last epoch is always kept
    assert any(k.startswith("backbone.") for k in ckpt.model)
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
    cfg = flat_config(str(out / "config.json"))
    assert cfg["model"] == METHOD_FLAGS[method][1] and cfg["world_size"] == 1
    assert cfg["effective_lr"] == pytest.approx(0.5 * 4 / 256)
    lines = log_lines(out)
    assert lines and all("images/s" in line and "loss" in line and "eta" in line and "data" in line
                         for line in lines)


def test_sliding_window_maps_epochs(data_dir, tmp_path):
    """2 plain epochs of 8 images with a window of 4 -> ceil(2 * 8 / 4) = 4 window-epochs of 1 iteration."""
    out = tmp_path / "sw"
    main_pretrain.main(tiny_args(data_dir, out, "--model", "PIC", "--use-sliding-window-sampler", "--window-size",
                                 "4", "--window-stride", "2", "--save-freq", "2", "--warmup-epoch", "1",
                                 epochs=2))
    cfg = flat_config(str(out / "config.json"))
    assert cfg["loop_epochs"] == 4 and cfg["warmup_loop_epochs"] == 2 and cfg["iters_per_epoch"] == 1
    assert sorted(p for p in os.listdir(out) if p.startswith("ckpt_") and p.endswith(".pth")) == ["ckpt_epoch_2.pth",
                                                                                               "ckpt_epoch_4.pth"]
    assert read_checkpoint(str(out / "current.pth")).step == 4


def test_zip_dataset_and_tensorboard(data_dir, tmp_path):
    zdir = make_zip_dataset(data_dir, str(tmp_path / "zip"))
    out = tmp_path / "out"
    argv = tiny_args(zdir, out, "--model", "PIC", "--zip", "--cache-mode", "full")
    argv[argv.index("--no-tensorboard")] = "--tensorboard"
    main_pretrain.main(argv)
    assert read_checkpoint(str(out / "current.pth")).config["zip"] is True
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))


@pytest.mark.parametrize("extra", [["--channels-last"], ["--amp-opt-level", "O1"], ["--plain-aug"]])
def test_step_options(extra, data_dir, tmp_path):
    out = tmp_path / "o"
    argv = tiny_args(data_dir, out, "--model", "SimCLR", "--mlp-head", *extra)
    argv[argv.index("--image-size") + 1] = "24"  # small: bf16 is slow on CPUs without AMX; 16 px hits a CPU bf16 bug
    main_pretrain.main(argv)
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.step == 2
    assert all(v.dtype != torch.bfloat16 for v in ckpt.model.values())  # weights stay fp32 under autocast
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())


def test_precision_levels():
    """O1 on the CPU and O2 anywhere are the same bf16 autocast path (so O2 is not run separately);
    O1 on CUDA is fp16 with a GradScaler; autocast really computes the matmul in the chosen dtype."""
    cpu = torch.device("cpu")
    assert build_precision("O0", cpu).dtype is None and build_precision("O0", cpu).scaler is None
    for level in ("O1", "O2"):
        p = build_precision(level, cpu)
        assert p.dtype is torch.bfloat16 and p.scaler is None
        with p.autocast(cpu):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        cuda = build_precision("O1", torch.device("cuda"))
    assert cuda.dtype is torch.float16 and isinstance(cuda.scaler, torch.amp.GradScaler)
    assert build_precision("O2", torch.device("cuda")).scaler is None


def test_compile(data_dir, tmp_path, monkeypatch):
    """--compile (inductor + gcc) on a PIC whose backbone is one tiny conv block, to keep compile time
    short; checks the compiled run trains and that the checkpoint keys are unchanged."""
    from torch import nn

    from contrast.models import PIC
    from contrast.models.backbone_base import Backbone

    class TinyBackbone(nn.Sequential, Backbone):   # a backbone implements the interface main_pretrain uses
        feat_dim = 8

    def tiny_pic(args, n):
        backbone = TinyBackbone(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return PIC(backbone, 8, n, feature_dim=16, mlp_head=False, temperature=0.2)
    monkeypatch.setattr(main_pretrain, "build_method", tiny_pic)
    out = tmp_path / "c"
    main_pretrain.main(tiny_args(data_dir, out, "--model", "PIC", "--aug", "SimCLR", "--compile", epochs=2))
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.step == 4
    assert "backbone.0.weight" in ckpt.model and not any("_orig_mod" in k for k in ckpt.model)


def _nan_after(build, bad_steps):
    """Wrap ``build_method`` so that the loss is NaN on the (0-based) forward calls in ``bad_steps``."""
    def wrapped(args, n):
        method = build(args, n)
        forward, calls = method.forward, [0]

        def nan_forward(views, index):
            out = forward(views, index)
            if calls[0] in bad_steps:
                out["loss"] = out["loss"] * float("nan")
            calls[0] += 1
            return out
        method.forward = nan_forward
        return method
    return wrapped


def test_nonfinite_step_is_skipped(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_pretrain, "build_method", _nan_after(main_pretrain.build_method, {0}))
    out = tmp_path / "n"
    main_pretrain.main(tiny_args(data_dir, out, "--model", "PIC"))
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.step == 1  # 2 iterations, the first skipped
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
    assert any("non-finite loss at epoch 1 iteration 1" in line for line in log_lines(out, "non-finite"))


def test_nonfinite_run_stops_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_pretrain, "build_method", _nan_after(main_pretrain.build_method, {2, 3}))
    out = tmp_path / "n"
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite losses \(--max-nonfinite 2\) at epoch 2"):
        main_pretrain.main(tiny_args(data_dir, out, "--model", "PIC", "--max-nonfinite", "2", epochs=2))
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.epoch == 1 and ckpt.step == 2


@pytest.mark.parametrize("flags, message", [
    (["--model", "Barlow"], "argument --model: invalid choice: 'Barlow'"),
    (["--model", "PIC", "--aug", "Foo"], "argument --aug: invalid choice: 'Foo'"),
    (["--model", "PIC", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_flags(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main_pretrain.main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), *flags])
    assert message in capsys.readouterr().err


def test_cli_errors_are_one_clear_line(tmp_path):
    """Through the real command line: a nonexistent --data-dir, and a batch larger than the data."""
    missing = tmp_path / "nope"
    r = subprocess.run([sys.executable, "main_pretrain.py", *tiny_args(missing, tmp_path / "o", "--model", "PIC")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "main_pretrain.py: error:" in r.stderr and str(missing) in r.stderr and "Traceback" not in r.stderr


def test_batch_larger_than_data(data_dir, tmp_path):
    argv = tiny_args(data_dir, tmp_path / "o", "--model", "PIC")
    argv[argv.index("--batch-size") + 1] = "16"
    with pytest.raises(ValueError, match="--batch-size 16 per process is larger than the 8 images"):
        main_pretrain.main(argv)


def test_torchrun_two_processes_every_method(data_dir, tmp_path):
    """``python -m torch.distributed.run --nproc_per_node=2`` on the CPU (gloo), batch 2 per process: every
    configuration of METHOD_FLAGS trains in turn in one launch (tests/sequence_runner.py; its 2-rank =
    1-process equality is in the method's own test file)."""
    outs = {method: tmp_path / method for method in METHOD_FLAGS}
    flags = joined(tiny_args(data_dir, out, *METHOD_FLAGS[method], "--batch-size", "2") for method, out in outs.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", os.path.join("tests", "sequence_runner.py"), *flags],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for method, out in outs.items():
        ckpt = read_checkpoint(str(out / "current.pth"))
        assert ckpt.world_size == 2 and ckpt.effective_lr == pytest.approx(0.5 * 4 / 256), method
        assert [state["rank"] for state in ckpt.sampler_states] == [0, 1], method
        assert ckpt.step == 2, method
        assert os.path.isfile(out / "log_rank1.txt") and log_lines(out), method
        if method in ("PIC_sampled", "SwAV"):  # each rank wrote its shard of the classifier table / its queue
            assert ckpt.rank_shards and os.path.isfile(out / "current.step2.rank1-of-2.pth"), method


def test_reproduction_script_runs(data_dir, tmp_path):
    """scripts/PIC.sh end to end (pretraining + linear) with tiny overrides through its env vars."""
    out = tmp_path / "script"
    tiny = "--arch resnet18 --image-size 32 --num-workers 0 --no-tensorboard --warmup-epoch 0"
    env = {**os.environ, "DATA_DIR": str(data_dir), "NPROC": "1", "OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(free_port()), "PYTHON": sys.executable,
           "EXTRA_ARGS": f"{tiny} --image-size2 16 --batch-size 4 --window-size 8 --window-stride 4 --feature-dim 16",
           "LINEAR_EXTRA_ARGS": f"{tiny} --total-batch-size 4 --epochs 1"}
    r = subprocess.run(["bash", "scripts/PIC.sh", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    pre = read_checkpoint(str(out / "current.pth"))
    assert pre.config["use_sliding_window_sampler"] and pre.config["mlp_head"]
    assert pre.config["contrast_temperature"] == 0.2 and pre.config["aug"] == "MultiCrop"
    assert (pre.config["num_crop"], pre.config["num_crop2"], pre.config["shuffle_per_epoch"]) == (1, 3, True)
    assert read_checkpoint(str(out / "eval" / "current.pth")).epoch == 1


def test_corrupt_images_are_counted_or_fatal(tmp_path):
    data = make_image_folder(str(tmp_path / "d"), num_classes=2, per_class=4, size=(36, 36))
    bad = os.path.join(data, "train", "class_0", "img_0.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "o"
    with pytest.warns(RuntimeWarning, match="img_0.png: cannot read or decode image"):
        main_pretrain.main(tiny_args(data, out, "--model", "PIC"))
    assert any("corrupt image(s) replaced so far" in line for line in log_lines(out, "corrupt"))
    with pytest.raises(ValueError, match="img_0.png"):
        main_pretrain.main(tiny_args(data, tmp_path / "s", "--model", "PIC", "--strict-data"))


def test_knn_monitor_logs_accuracy_every_epoch(data_dir, tmp_path):
    out = tmp_path / "knn"
    main_pretrain.main(tiny_args(data_dir, out, *METHOD_FLAGS["SimCLR"], "--knn-monitor", "--knn-k", "3",
                                 epochs=2))
    lines = log_lines(out, "knn epoch")
    assert [line.split("knn epoch ")[1].split(":")[0] for line in lines] == ["1", "2"]
    for line in lines:
        top1 = float(line.split("top-1 ")[1].split()[0])
        top5 = float(line.split("top-5 ")[1].split()[0])
        assert 0.0 <= top1 <= top5 <= 100.0
