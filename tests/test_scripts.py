"""``scripts/<METHOD>.sh`` against the PIC release's scripts, flag for flag.

Each script runs with ``PYTHON`` pointing at a stub that records the command line of both stages
instead of training. The recorded argv goes through our parsers (``parse_pretrain_args``,
``parse_linear_args``, then ``resolve_from_config`` with the pretraining stage's config, as
``main_linear.py`` does), and every resolved value is compared with the release's: the flags its
script passes on top of its ``option.py`` defaults. Both tables below are copied by hand from the
release (github.com/bl0/PIC, commit 21fa56a: ``scripts/*.sh``, ``contrast/option.py``); nothing in
them is computed by our code. The only differences allowed are the deviations named in
``ALLOWED`` (each a row of docs/deviations.md, which the last test checks).

The scripts pass only what the release's scripts set beyond the method's recipe (scale, data,
epochs): each method class declares its recipe, so ``--model X`` alone resolves to the release's
script for X (:func:`test_bare_model_is_the_release_script`).
"""
import math
import os
import stat
import subprocess
import warnings

import pytest
import torch

from contrast.data import window_epochs
from contrast.option import default_num_workers, parse_pretrain_args, resolve_from_config
from contrast.option_eval import fill_protocol, parse_linear_args
from contrast.precision import resolve_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TRAIN = 1281167  # images in ImageNet-1k train

# --------------------------------------------------------------------------- the release (copied)
#: ``parse_option('pre-train')`` defaults of the release's contrast/option.py (``--local_rank`` is required
#: there and set by torch.distributed.launch, so it has no default).
RELEASE_PRETRAIN_DEFAULTS = {
    "data_dir": "./data", "crop": 0.2, "aug": "NULL", "zip": False, "cache_mode": "part", "num_workers": 4,
    "batch_size": 64, "window_size": 131072, "window_stride": 16384, "use_sliding_window_sampler": False,
    "shuffle_per_epoch": False, "image_size": 224, "image_size2": 96, "crop2": 0.14, "num_crop": 1,
    "num_crop2": 3, "arch": "resnet50", "model": "PIC", "contrast_temperature": 0.07,
    "contrast_momentum": 0.999, "contrast_num_negative": 65536, "feature_dim": 128, "mlp_head": False,
    "base_learning_rate": 0.03, "optimizer": "sgd", "lr_scheduler": "cosine", "warmup_epoch": 5,
    "warmup_multiplier": 100, "lr_decay_epochs": [120, 160, 200], "lr_decay_rate": 0.1, "weight_decay": 1e-4,
    "momentum": 0.9, "amp_opt_level": "O1", "start_epoch": 1, "epochs": 100, "output_dir": "./output",
    "auto_resume": False, "resume": "", "print_freq": 100, "save_freq": 10,
}
#: ``parse_option('linear')`` defaults.
RELEASE_LINEAR_DEFAULTS = {
    "data_dir": "./data", "crop": 0.08, "aug": "NULL", "zip": False, "cache_mode": "part", "num_workers": 4,
    "total_batch_size": 256, "window_size": 131072, "window_stride": 16384, "use_sliding_window_sampler": False,
    "shuffle_per_epoch": False, "image_size": 224, "image_size2": 96, "crop2": 0.14, "num_crop": 1,
    "num_crop2": 3, "arch": "resnet50", "learning_rate": 30, "lr_scheduler": "cosine", "warmup_epoch": 5,
    "warmup_multiplier": 100, "lr_decay_epochs": [120, 160, 200], "lr_decay_rate": 0.1, "weight_decay": 0,
    "momentum": 0.9, "amp_opt_level": "O1", "start_epoch": 1, "epochs": 100, "output_dir": "./output",
    "auto_resume": False, "resume": "", "print_freq": 100, "save_freq": 10, "eval": False,
}
#: Flags of the release's linear parser that its linear stage never uses (sliding window, multi-crop):
#: our linear parser does not have them.
RELEASE_LINEAR_UNUSED = ("window_size", "window_stride", "use_sliding_window_sampler", "shuffle_per_epoch",
                         "image_size2", "crop2", "num_crop", "num_crop2")

DATA = "./data/ImageNet-Zip"


def release_script(name, epochs):
    """(pretraining flags, linear flags, output_dir) that the release's scripts/<name>.sh passes."""
    warmup = epochs // 40
    if name == "PIC":
        out = f"./output/PIC/epoch-{epochs}"
        pre = {"data_dir": DATA, "crop": 0.08, "aug": "MultiCrop", "zip": True, "cache_mode": "part",
               "arch": "resnet50", "model": "PIC", "contrast_temperature": 0.2, "mlp_head": True,
               "warmup_epoch": warmup, "epochs": epochs, "output_dir": out, "window_size": 131072,
               "window_stride": 16384, "use_sliding_window_sampler": True, "shuffle_per_epoch": True,
               "crop2": 0.14, "image_size": 160, "image_size2": 96, "num_crop": 1, "num_crop2": 3}
        lin = {"data_dir": DATA, "zip": True, "cache_mode": "part", "arch": "resnet50"}
    elif name == "InstDisc":
        out = f"./output/InstDisc/epoch-{epochs}"
        pre = {"data_dir": DATA, "crop": 0.2, "aug": "InstDisc", "zip": True, "cache_mode": "part",
               "model": "InstDisc", "contrast_temperature": 0.07, "contrast_momentum": 0.5, "mlp_head": True,
               "warmup_epoch": warmup, "epochs": epochs, "output_dir": out, "save_freq": 10}
        lin = {"data_dir": DATA, "zip": True, "cache_mode": "part"}
    elif name == "MoCov1":
        out = f"./output/MoCov1/epoch-{epochs}"
        pre = {"data_dir": DATA, "crop": 0.2, "aug": "InstDisc", "zip": True, "cache_mode": "part",
               "model": "MoCo", "contrast_temperature": 0.07, "lr_scheduler": "step", "warmup_epoch": warmup,
               "epochs": epochs, "output_dir": out, "save_freq": 10}
        lin = {"data_dir": DATA, "zip": True, "cache_mode": "part"}
    elif name == "MoCov2":
        out = f"./output/MoCo/epoch-{epochs}"
        pre = {"data_dir": DATA, "crop": 0.2, "aug": "MoCov2", "zip": True, "cache_mode": "part",
               "model": "MoCo", "contrast_temperature": 0.2, "mlp_head": True, "warmup_epoch": warmup,
               "epochs": epochs, "output_dir": out, "save_freq": 10}
        lin = {"data_dir": DATA, "zip": True, "cache_mode": "part"}
    elif name == "SimCLR":
        out = "./output/SimCLR"
        pre = {"data_dir": DATA, "crop": 0.08, "aug": "SimCLR", "zip": True, "cache_mode": "part",
               "model": "SimCLR", "optimizer": "lars", "contrast_temperature": 0.1, "mlp_head": True,
               "base_learning_rate": 0.3, "warmup_epoch": warmup, "weight_decay": 1e-6, "epochs": epochs,
               "output_dir": out, "save_freq": 10}
        lin = {"data_dir": DATA, "zip": True, "cache_mode": "part", "learning_rate": 0.1, "weight_decay": 1e-6}
    else:
        raise KeyError(name)
    lin.update(output_dir=f"{out}/eval", pretrained_model=f"{out}/current.pth")
    return pre, lin, out


RELEASE_SCRIPTS = {"PIC": 400, "InstDisc": 200, "MoCov1": 200, "MoCov2": 200, "SimCLR": 200}  # default epochs
RELEASE_LAUNCH = {"master_port": "12348", "nproc_per_node": "4"}

# --------------------------------------------------------------------------- allowed differences
#: flag -> (why, a phrase of its row in docs/deviations.md). Everything else must equal the release.
ALLOWED = {
    "num_workers": ("ours: the cores available per process (at most 8); the release: 4", "`--num-workers`"),
    "amp_opt_level": ("ours: auto, which is O1 on CUDA (checked below); the release: O1", "`--amp-opt-level`"),
    "auto_resume": ("scripts/recipe.sh passes --auto-resume, so rerunning a script continues it",
                    "`--auto-resume`"),
}
#: SimCLR.sh only: its run folder is ./output/SimCLR/epoch-E instead of ./output/SimCLR (applied to the
#: release's values below, then compared exactly).
SIMCLR_FOLDER = ("`./output/SimCLR`", "./output/SimCLR", "./output/SimCLR/epoch-{epochs}")
#: MoCov2.sh only: the release's ``--model MoCo`` with its MoCov2.sh flags is our registered ``--model MoCov2``
#: (the same model with that recipe); applied to the release's values below, then compared exactly.
MOCOV2_MODEL = ("`--model MoCov2`", "MoCo", "MoCov2")
#: The flags a release script sets beyond its method's recipe: scale, data, epochs, output.
SCRIPT_SCALE = ("data_dir", "zip", "cache_mode", "arch", "epochs", "output_dir", "save_freq")
#: Per-method defaults and other option.py defaults that differ from the release's (only visible when a
#: script does not pass the flag: the scripts pass all of them). flag -> phrase of its row.
ALLOWED_DEFAULTS = {
    "aug": "`--aug`", "contrast_temperature": "`--contrast-temperature`",
    "contrast_momentum": "`--contrast-momentum`", "cache_mode": "`--cache-mode`",
    "image_size": "linear `--image-size`", "arch": "linear `--arch`",
    "pretrained_model": "`--pretrained-model`",
}
#: Our flags the release did not have, at the value that reproduces the release's behaviour.
OURS_AT_RELEASE = {
    "view_batching": "separate", "zero_init_residual": True, "mlp_hidden_dim": 2048, "cosine_form": "release",
    "lars_form": "release", "lars_trust_coefficient": 0.001, "lars_eps": None, "stem": "imagenet",
    "pic_num_negative": 0, "channels_last": False, "compile": False, "lr_scaling": "linear",
}


# --------------------------------------------------------------------------- running the scripts
@pytest.fixture
def stub(tmp_path):
    """A fake ``python`` recording each call's argv (one argument per line) in calls/<n>."""
    calls = tmp_path / "calls"
    calls.mkdir()
    path = tmp_path / "python"
    path.write_text("#!/usr/bin/env bash\n"
                    f"n=$(ls '{calls}' | wc -l)\n"
                    f"printf '%s\\n' \"$@\" > '{calls}/call'$n\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, calls


def run_script(name, stub, tmp_path, *args, env=None):
    """Run scripts/<name>.sh with the stub; returns [(launcher args, entry script, argv)] per stage."""
    python, calls = stub
    data = tmp_path / "ImageNet-Zip"
    data.mkdir(exist_ok=True)
    (data / "train.zip").write_bytes(b"")  # recipe.sh adds --zip when DATA_DIR holds train.zip
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OUTPUT_DIR", "EXTRA_ARGS", "LINEAR_EXTRA_ARGS", "NPROC", "MASTER_PORT", "DATA_DIR")}
    environ.update(PYTHON=str(python), DATA_DIR=DATA, **(env or {}))
    # DATA_DIR is relative to the repository root (recipe.sh cds there): point ./data/ImageNet-Zip at tmp
    link_root = tmp_path / "root"
    if not link_root.exists():
        link_root.mkdir()
        for entry in os.listdir(ROOT):
            if entry not in ("data", "output"):
                os.symlink(os.path.join(ROOT, entry), link_root / entry)
        (link_root / "data").mkdir()
        os.symlink(data, link_root / "data" / "ImageNet-Zip")
    r = subprocess.run(["bash", str(link_root / "scripts" / f"{name}.sh"), *map(str, args)], env=environ,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    stages = []
    for i in range(len(os.listdir(calls))):
        argv = (calls / f"call{i}").read_text().splitlines()
        entry = next(j for j, a in enumerate(argv) if a.endswith(".py"))
        stages.append((argv[:entry], argv[entry], argv[entry + 1:]))
    for f in os.listdir(calls):
        os.remove(calls / f)
    return stages


def launcher_settings(launch):
    assert launch[:2] == ["-m", "contrast.launch"], launch  # torchrun with one-line error reports
    out = {}
    it = iter(launch[2:])
    for a in it:
        key, _, value = a.lstrip("-").partition("=")
        out[key] = value or next(it)
    return out


def resolve(stages):
    """Our resolved (pretraining, linear) values of the two recorded stages."""
    (launch1, entry1, pre_argv), (launch2, entry2, lin_argv) = stages
    assert (entry1, entry2) == ("main_pretrain.py", "main_linear.py")
    assert launcher_settings(launch1) == RELEASE_LAUNCH == launcher_settings(launch2)
    pre = parse_pretrain_args(pre_argv)
    lin = parse_linear_args(lin_argv)
    resolve_from_config(lin, vars(pre))  # main_linear.py: arch, stem, image size, val crop from the checkpoint
    fill_protocol(lin)                   # then the protocol defaults of the backbone's family
    return vars(pre), vars(lin)


def compare(ours, release, stage, script, allowed=()):
    diffs = {k: (ours.get(k, "<absent>"), v) for k, v in release.items()
             if k not in allowed and ours.get(k, "<absent>") != v}
    assert not diffs, f"{script} {stage}: ours vs release differ in {diffs}"


def check_allowed(ours, release, script, stage):
    assert ours["num_workers"] == default_num_workers()
    assert ours["amp_opt_level"] == "auto"
    with warnings.catch_warnings():   # GradScaler("cuda") warns on a machine without CUDA
        warnings.simplefilter("ignore")
        precision, note = resolve_precision("auto", torch.device("cuda"))
    assert precision.dtype == torch.float16 and precision.scaler is not None and "O1" in note
    assert ours["auto_resume"] is True


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("script", list(RELEASE_SCRIPTS))
@pytest.mark.parametrize("epochs", [None, 400])
def test_script_equals_release(script, epochs, stub, tmp_path):
    epochs_run = RELEASE_SCRIPTS[script] if epochs is None else epochs
    stages = run_script(script, stub, tmp_path, *([] if epochs is None else [epochs]))
    assert len(stages) == 2
    pre, lin = resolve(stages)
    rel_pre_flags, rel_lin_flags, _ = release_script(script, epochs_run)
    rel_pre = {**RELEASE_PRETRAIN_DEFAULTS, **rel_pre_flags}
    rel_lin = {**RELEASE_LINEAR_DEFAULTS, **rel_lin_flags}
    if script == "SimCLR":
        _, old, new = SIMCLR_FOLDER
        for d in (rel_pre, rel_lin):
            for key in ("output_dir", "pretrained_model"):
                if key in d:
                    d[key] = d[key].replace(old, new.format(epochs=epochs_run))
    if script == "MoCov2":
        assert rel_pre["model"] == MOCOV2_MODEL[1]
        rel_pre["model"] = MOCOV2_MODEL[2]
    compare(pre, rel_pre, "pretraining", script, ALLOWED)
    compare(lin, rel_lin, "linear", script, set(ALLOWED) | set(RELEASE_LINEAR_UNUSED))
    check_allowed(pre, rel_pre, script, "pretraining")
    check_allowed(lin, rel_lin, script, "linear")
    assert not any(k in lin for k in RELEASE_LINEAR_UNUSED)
    for key, value in OURS_AT_RELEASE.items():
        if key in pre:
            assert pre[key] == value, (script, key, pre[key])
    assert pre["warmup_epoch"] == epochs_run // 40  # 400 -> 10, 200 -> 5
    # the learning rates the release computes: base x 64 x 4 / 256 (pretraining), --learning-rate (linear)
    assert pre["base_learning_rate"] * pre["batch_size"] * int(RELEASE_LAUNCH["nproc_per_node"]) / 256 == \
        rel_pre["base_learning_rate"]
    assert lin["learning_rate"] * lin["total_batch_size"] / 256 == rel_lin["learning_rate"]
    assert lin["image_size"] == 224 and lin["val_crop_fraction"] == 224 / (224 + 32)


def test_pic_script_loop_lengths_equal_the_release():
    """The release maps --epochs and --warmup-epoch to ceil(e * N / W) window-epochs; on ImageNet-1k with
    W 131072: 400 -> 3910 (warm-up 10 -> 98), 200 -> 1955 (5 -> 49)."""
    assert window_epochs(400, IMAGENET_TRAIN, 131072) == 3910 and window_epochs(10, IMAGENET_TRAIN, 131072) == 98
    assert window_epochs(200, IMAGENET_TRAIN, 131072) == 1955 and window_epochs(5, IMAGENET_TRAIN, 131072) == 49
    assert math.ceil(400 * IMAGENET_TRAIN / 131072) == 3910


@pytest.mark.parametrize("epochs,warmup", [(200, 5), (400, 10), (800, 20), (100, 2), (30, 0)])
def test_warmup_is_epochs_over_40(epochs, warmup, stub, tmp_path):
    for script in ("PIC", "PIC_single_view", "InstDisc", "MoCov1", "MoCov2", "SimCLR"):
        (_, _, pre_argv), _ = run_script(script, stub, tmp_path, epochs)
        args = parse_pretrain_args(pre_argv)
        assert (args.epochs, args.warmup_epoch) == (epochs, warmup), script


def test_single_view_pic_script_is_not_the_papers_recipe(stub, tmp_path):
    text = open(os.path.join(ROOT, "scripts", "PIC_single_view.sh")).read()
    header = text.split("source")[0]
    assert "NOT the paper's recipe" in header and "no published number" in header
    assert "68.6" not in header.replace("(68.6, 70.3, 70.8)", "")
    pic = open(os.path.join(ROOT, "scripts", "PIC.sh")).read().split("source")[0]
    assert "70.3" in pic and "68.6" in pic and "multi-crop" in pic.lower()
    stages = run_script("PIC_single_view", stub, tmp_path)
    pre, lin = resolve(stages)
    assert (pre["model"], pre["aug"], pre["num_crop"]) == ("PIC", "SimCLR", 1)
    assert pre["use_sliding_window_sampler"] and pre["shuffle_per_epoch"] and pre["mlp_head"]
    assert pre["output_dir"] == "./output/PIC_single_view/epoch-200" and lin["image_size"] == 224


def test_environment_overrides_still_work(stub, tmp_path):
    stages = run_script("MoCov2", stub, tmp_path, 100,
                        env={"NPROC": "8", "OUTPUT_DIR": "/tmp/x", "EXTRA_ARGS": "--batch-size 32",
                             "LINEAR_EXTRA_ARGS": "--epochs 5"})
    assert launcher_settings(stages[0][0])["nproc_per_node"] == "8"
    pre, lin = vars(parse_pretrain_args(stages[0][2])), vars(parse_linear_args(stages[1][2]))
    assert (pre["batch_size"], pre["output_dir"], pre["epochs"]) == (32, "/tmp/x", 100)
    assert (lin["epochs"], lin["pretrained_model"]) == (5, "/tmp/x/current.pth")


#: release script -> our --model
SCRIPT_MODEL = {"PIC": "PIC", "InstDisc": "InstDisc", "MoCov1": "MoCo", "MoCov2": "MoCov2", "SimCLR": "SimCLR"}


@pytest.mark.parametrize("script", list(RELEASE_SCRIPTS))
@pytest.mark.parametrize("epochs", [100, 200, 400])
def test_bare_model_is_the_release_script(script, epochs):
    """``--model X --epochs E`` and nothing else resolves to the release's scripts/<X>.sh at E epochs in every
    value but the scale and data the script sets (``SCRIPT_SCALE``) and the documented deviations."""
    model = SCRIPT_MODEL[script]
    ours = vars(parse_pretrain_args(["--model", model, "--epochs", str(epochs)]))
    flags, _, _ = release_script(script, epochs)
    release = {**RELEASE_PRETRAIN_DEFAULTS, **flags, "model": model}
    compare(ours, release, "bare --model", script, set(ALLOWED) | set(SCRIPT_SCALE))
    assert ours["cache_mode"] == "no" and ours["auto_resume"] is False and ours["output_dir"] == "./output"
    for key, value in OURS_AT_RELEASE.items():
        if key in ours:
            assert ours[key] == value, key
    assert parse_pretrain_args([]).model == "PIC"  # the release's default --model


@pytest.mark.parametrize("script", list(RELEASE_SCRIPTS))
def test_scripts_pass_only_scale_and_data(script):
    """The pretraining stage of scripts/<X>.sh sets no flag of the method's recipe (PIC_single_view.sh, the
    ablation, is the one script that overrides PIC's views)."""
    from contrast.models.recipe import FLAG_FIELDS
    text = open(os.path.join(ROOT, "scripts", f"{script}.sh")).read()
    call = text[text.index("run_recipe "):].split(" -- ")[0]
    for field in FLAG_FIELDS:
        assert f"--{field.replace('_', '-')} " not in call and f"--{field.replace('_', '-')}\n" not in call, \
            (script, field)


def test_linear_defaults_equal_the_release_except_documented():
    """main_linear.py's defaults, with arch and image size resolved from a default pretraining run's config."""
    args = parse_linear_args(["--pretrained-model", "x.pth"])
    assert args.arch is None and args.image_size is None  # taken from the checkpoint's config
    resolve_from_config(args, vars(parse_pretrain_args([])))
    ours = vars(fill_protocol(args))   # the default --model PIC pretrains at 160 px (its recipe), so its linear stage too
    assert (ours["arch"], ours["image_size"], ours["val_crop_fraction"]) == ("resnet50", 160, 0.875)
    compare(ours, RELEASE_LINEAR_DEFAULTS, "linear defaults", "main_linear.py",
            set(ALLOWED) | set(ALLOWED_DEFAULTS) | set(RELEASE_LINEAR_UNUSED))
    assert ours["cache_mode"] == "no"


def test_every_allowed_difference_is_a_row_of_the_deviation_table():
    text = open(os.path.join(ROOT, "docs", "deviations.md")).read()
    for flag, (_, phrase) in ALLOWED.items():
        assert phrase in text, f"docs/deviations.md has no row for {flag} ({phrase})"
    assert SIMCLR_FOLDER[0] in text and MOCOV2_MODEL[0] in text
    for flag, phrase in ALLOWED_DEFAULTS.items():
        assert phrase in text, f"docs/deviations.md has no row for {flag} ({phrase})"
    for flag in ("--view-batching", "--zero-init-residual", "--mlp-hidden-dim", "--cosine-form", "--lars-form",
                 "--num-crop"):
        assert f"`{flag}" in text, flag


@pytest.mark.parametrize("argv,message", [
    (["--model", "MoCo", "--num-crop", "3"], "--num-crop counts the large crops of --aug MultiCrop"),
    (["--aug", "MultiCrop", "--crop", "0.2"],
     "--aug MultiCrop needs --crop (small crops' minimum scale) < --crop2, got 0.2 and 0.14"),
    (["--aug", "MultiCrop", "--crop", "0.08", "--num-crop", "0"], "need --num-crop >= 1"),
    (["--model", "MoCo", "--crop2=0.3"], "--crop2 sets the small crops of a multi-crop --aug"),
    (["--model", "BYOL", "--num-crop2", "2", "--image-size2", "16"],
     "--image-size2 and --num-crop2 set the small crops of a multi-crop --aug (MultiCrop, BYOLMultiCrop); "
     "--model BYOL with --aug BYOL has none"),
])
def test_multicrop_flag_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_pretrain_args(argv)
    assert message in capsys.readouterr().err


def test_small_crop_flags_from_a_config_file_or_with_multi_crop_are_accepted(tmp_path):
    config = tmp_path / "moco.yaml"
    config.write_text("model: MoCo\ncrop2: 0.3\nnum_crop2: 2\n")
    assert parse_pretrain_args(["--config", str(config)]).crop2 == 0.3
    args = parse_pretrain_args(["--aug", "MultiCrop", "--crop2", "0.3", "--num-crop2", "2"])
    assert (args.crop2, args.num_crop2) == (0.3, 2)


def test_num_crop_resolution():
    assert parse_pretrain_args(["--aug", "MultiCrop", "--crop", "0.08"]).num_crop == 1   # PIC's view count
    assert parse_pretrain_args(["--aug", "MultiCrop", "--crop", "0.08", "--num-crop", "2"]).num_crop == 2
    assert parse_pretrain_args(["--model", "SimCLR"]).num_crop == 1   # unused without MultiCrop (the release's 1)
    from contrast.option import method_config
    assert method_config(parse_pretrain_args(["--model", "SimCLR"])).num_crop == 2   # the views the data makes
    assert method_config(parse_pretrain_args(["--aug", "MultiCrop", "--crop", "0.08", "--num-crop", "2"])).num_crop == 2
