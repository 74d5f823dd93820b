"""The typed run configuration: groups, the versioned config.json, --config FILE, old flat configs."""
import json
import os

import pytest
import torch

from contrast.checkpoint import read_checkpoint, write_pretrained_checkpoint
from contrast.option import parse_pretrain_args, pretrain_parser, resolve_from_config, run_config
from contrast.runconfig import (CONFIG_VERSION, FACTS, GROUPS, SECTION_OF, config_value, dump_run_config, flat_config,
                                load_run_config)
from tests.synthetic import make_image_folder
from tests.test_scripts import run_script, stub  # noqa: F401 (stub: a fixture)


def write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_sets_values_and_a_flag_overrides_it(tmp_path):
    recipe = write(tmp_path / "r.yaml", "method:\n  model: MoCo\n  bn_splits: 2\noptim:\n  weight_decay: 5e-4\n"
                   "  lr_decay_epochs: [3, 6]\nloop:\n  epochs: 7\n")
    args = parse_pretrain_args(["--config", recipe])
    assert (args.model, args.bn_splits, args.epochs, args.lr_decay_epochs) == ("MoCo", 2, 7, [3, 6])
    assert args.weight_decay == 5e-4 and isinstance(args.weight_decay, float)   # YAML 1.1 reads 5e-4 as a string
    over = parse_pretrain_args(["--config", recipe, "--epochs", "3", "--weight-decay", "0.01"])
    assert (over.model, over.epochs, over.weight_decay) == ("MoCo", 3, 0.01)
    flat = write(tmp_path / "flat.yml", "model: SimCLR\nbatch_size: 16\n")
    args = parse_pretrain_args(["--config", flat])
    assert (args.model, args.batch_size) == ("SimCLR", 16)


@pytest.mark.parametrize("text, key", [("loop:\n  epochz: 3\n", "loop.epochz"), ("epochz: 3\n", "epochz"),
                                       ("config_version: 2\nloops: {}\n", "loops")])
def test_unknown_key_is_refused_in_one_line(tmp_path, capsys, text, key):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as e:
        parse_pretrain_args(["--config", path])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert path in last and repr(key) in last


def test_bad_value_is_refused_naming_file_and_key(tmp_path, capsys):
    path = write(tmp_path / "bad.json", json.dumps({"data": {"aug": "Nope"}}))
    with pytest.raises(SystemExit):
        parse_pretrain_args(["--config", path])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert path in last and "aug" in last and "Nope" in last


def test_every_pretraining_flag_has_one_group():
    """The groups hold every flag but the methods' own (those join the method section) and --config."""
    method_own = {a.dest for g in pretrain_parser()._action_groups if g.title.startswith("--model ")
                  for a in g._group_actions}
    dests = {a.dest for a in pretrain_parser()._actions if a.option_strings} - {"help", "config"} - method_own
    assert dests <= set(SECTION_OF)
    in_groups = [f for cls in GROUPS.values() for f in cls.__dataclass_fields__]
    assert len(in_groups) == len(set(in_groups))


def test_dump_read_back_with_config_gives_the_same_groups(tmp_path):
    cfg = run_config(parse_pretrain_args(["--model", "MoCo", "--bn-splits", "2", "--epochs", "9", "--lr-decay-epochs",
                                          "4", "5", "--knn-monitor", "--output-dir", "x"]))
    dump = dump_run_config(cfg, effective_lr=0.1)
    assert dump["config_version"] == CONFIG_VERSION and dump[FACTS] == {"effective_lr": 0.1}
    assert dump["method"]["bn_splits"] == 2 and dump["loop"]["epochs"] == 9 and dump["eval"]["knn_monitor"]
    path = write(tmp_path / "config.json", json.dumps(dump))
    assert run_config(parse_pretrain_args(["--config", path])) == cfg
    again = run_config(parse_pretrain_args(["--config", path, "--output-dir", "y"]))
    assert again.runtime.output_dir == "y" and again.method == cfg.method.__class__(
        **{**cfg.method.__dict__, "output_dir": "y"})


OLD_FLAT = {"model": "MoCo", "arch": "resnet18", "small_stem": True, "image_size": 32, "epochs": 5,
            "batch_size": 4, "weight_decay": 1e-4, "bn_splits": 2, "knn_monitor": False, "seed": 3,
            "local_rank": 0, "world_size": 1, "device": "cpu", "effective_lr": 0.01, "loop_epochs": 5, "total_batch": 4}


def test_old_flat_config_migrates(tmp_path):
    grouped = load_run_config(OLD_FLAT)
    assert grouped["config_version"] == CONFIG_VERSION
    assert grouped["method"]["model"] == "MoCo" and grouped["method"]["bn_splits"] == 2
    assert grouped["loop"]["epochs"] == 5 and grouped["data"]["image_size"] == 32 and grouped["runtime"]["seed"] == 3
    assert grouped[FACTS] == {"world_size": 1, "effective_lr": 0.01, "loop_epochs": 5, "total_batch": 4}
    assert flat_config(grouped) == OLD_FLAT == flat_config(OLD_FLAT)
    for source in (OLD_FLAT, grouped):
        assert config_value(source, "arch") == "resnet18" and config_value(source, "nothing", 7) == 7
    # an old run's config.json repeats through --config: flags set, facts ignored, the legacy key skipped
    path = write(tmp_path / "config.json", json.dumps(OLD_FLAT))
    args = parse_pretrain_args(["--config", path])
    assert (args.model, args.arch, args.epochs, args.bn_splits, args.seed, args.device, args.local_rank) == \
        ("MoCo", "resnet18", 5, 2, 3, "cpu", -1)   # the launcher sets the rank of each process
    assert load_run_config(path) == grouped


@pytest.mark.parametrize("grouped", [False, True])
def test_checkpoint_config_of_either_form_reads_back_flat(tmp_path, grouped):
    config = load_run_config(OLD_FLAT) if grouped else OLD_FLAT
    path = str(tmp_path / "c.pth")
    write_pretrained_checkpoint(path, {"backbone.w": torch.zeros(1)}, config, 1, 0.01)
    ckpt = read_checkpoint(path)
    assert ckpt.config["arch"] == "resnet18" and ckpt.config["model"] == "MoCo"
    args = parse_pretrain_args([]).__class__(arch=None, stem=None, image_size=None, val_crop_fraction=None)
    assert resolve_from_config(args, ckpt.config) == ["arch", "stem", "image_size"]
    assert (args.arch, args.stem, args.image_size) == ("resnet18", "small", 32)
    grouped_args = args.__class__(arch=None, stem="imagenet", image_size=None, val_crop_fraction=0.5)
    assert resolve_from_config(grouped_args, load_run_config(OLD_FLAT)) == ["arch", "image_size"]
    assert (grouped_args.arch, grouped_args.stem, grouped_args.image_size) == ("resnet18", "imagenet", 32)


def test_newer_version_is_refused(tmp_path):
    path = write(tmp_path / "config.json", json.dumps({"config_version": CONFIG_VERSION + 1}))
    with pytest.raises(ValueError, match="config.json: config_version"):
        load_run_config(path)


@pytest.mark.slow
def test_config_json_repeats_a_run_bit_for_bit(tmp_path):
    """A tiny run (2 DataLoader workers) and its repeat through --config OUT/config.json --output-dir OUT2."""
    import main_pretrain
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=4, size=(20, 20))
    out, out2 = tmp_path / "out", tmp_path / "out2"
    main_pretrain.main(["--data-dir", data, "--output-dir", str(out), "--model", "MoCo", "--arch", "resnet18",
                        "--stem", "small", "--image-size", "16", "--batch-size", "4", "--epochs", "2",
                        "--num-workers", "2", "--contrast-num-negative", "8", "--bn-splits", "2", "--feature-dim", "8",
                        "--warmup-epoch", "1", "--no-tensorboard", "--device", "cpu", "--seed", "5",
                        "--save-every-minutes", "0"])
    main_pretrain.main(["--config", str(out / "config.json"), "--output-dir", str(out2)])
    first, second = read_checkpoint(str(out / "current.pth")), read_checkpoint(str(out2 / "current.pth"))
    assert second.step == first.step == 4
    assert first.model.keys() == second.model.keys()
    assert all(torch.equal(first.model[k], second.model[k]) for k in first.model)
    one, two = load_run_config(str(out / "config.json")), load_run_config(str(out2 / "config.json"))
    assert two["runtime"].pop("output_dir") == str(out2) and one["runtime"].pop("output_dir") == str(out)
    assert one == two
    assert os.path.isfile(out2 / "log.txt")


def _write_recipes():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "write_recipes.py")
    spec = importlib.util.spec_from_file_location("write_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_yaml_files_are_up_to_date():
    tool = _write_recipes()
    assert tool.main(["--check"]) == 0, "run python tools/write_recipes.py"
    from contrast.models import METHODS
    shipped = sorted(f for f in os.listdir(tool.OUT_DIR) if f.endswith(".yaml"))
    assert shipped == sorted(f"{name}.yaml" for name in METHODS)


@pytest.mark.parametrize("epochs", ["100", "200"])
def test_recipe_yaml_resolves_to_what_the_model_flag_resolves_to(epochs):
    """Each shipped YAML, read through --config, gives every flag the value --model X alone gives it
    (the warm-up rule of recipes with one still follows --epochs)."""
    from contrast.models import METHODS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in METHODS:
        path = os.path.join(root, "scripts", "configs", f"{name}.yaml")
        from_file = vars(parse_pretrain_args(["--config", path, "--epochs", epochs]))
        from_flag = vars(parse_pretrain_args(["--model", name, "--epochs", epochs]))
        from_file.pop("config")
        from_flag.pop("config")
        assert from_file == from_flag, name


def test_recipe_check_names_a_stale_file(tmp_path, capsys):
    tool = _write_recipes()
    assert tool.main(["--out-dir", str(tmp_path)]) == 0
    first = sorted(os.listdir(tmp_path))[0]
    (tmp_path / first).write_text("data: {}\n")
    assert tool.main(["--out-dir", str(tmp_path), "--check"]) == 1
    assert first in capsys.readouterr().err


RUN_SCRIPTS = ["PIC", "InstDisc", "MoCov1", "MoCov2", "SimCLR", "PIC_single_view", "BYOL", "SwAV", "BarlowTwins",
               "VICReg"]


@pytest.mark.parametrize("script", RUN_SCRIPTS)
def test_paper_run_yaml_equals_its_script(script, stub, tmp_path):
    """scripts/configs/runs/<X>.yaml sets what scripts/<X>.sh's pretraining stage passes: both resolve to
    the same values."""
    (launch, entry, argv), _ = run_script(script, stub, tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "scripts", "configs", "runs", f"{script}.yaml")
    from_file = vars(parse_pretrain_args(["--config", path]))
    assert from_file.pop("config") == path
    from_script = vars(parse_pretrain_args(argv))
    assert from_script.pop("config") is None and from_file == from_script
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(f"{s}.yaml" for s in RUN_SCRIPTS)
