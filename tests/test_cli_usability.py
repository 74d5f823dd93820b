"""What a new user meets in the first hour: the install, one flag name per concept, checkpoints the
evaluation tools read without repeating the pretraining flags, one-line errors, quiet logs, progress
lines. Shell plumbing of
``scripts/demo.sh`` and ``scripts/recipe.sh`` runs against a stand-in ``$PYTHON`` that records its
arguments (the stages themselves are tested by the CLI tests); the torchrun error runs for real.
"""
import ast
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import main_knn
import main_linear
from contrast import engine, option, option_eval
from contrast.checkpoint import CheckpointError
from contrast.logger import Progress
from tests.conftest import trained_looking_backbone
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(relpath: str):
    name = os.path.splitext(os.path.basename(relpath))[0]
    spec = importlib.util.spec_from_file_location(f"first_hour_{name}", os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(relpath: str) -> str:
    with open(os.path.join(ROOT, relpath), encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------ a fresh install runs the suite
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "yaml": "pyyaml"}


def _setup_requirements():
    """``install_requires`` and ``extras_require`` of setup.py, as {group: {distribution names}}."""
    tree = ast.parse(_read("setup.py"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    groups = {"install": {name(r) for r in kw["install_requires"]}}
    groups.update({extra: {name(r) for r in reqs} for extra, reqs in kw["extras_require"].items()})
    return groups, kw["install_requires"]


def _third_party_imports(paths):
    local = {"contrast", "tests", "benchmarks", "tools", "main_pretrain", "main_linear", "main_knn", "make_zip_dataset"}
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(_read(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(DISTRIBUTION.get(top, top).lower(), set()).add(path)
    return found


def _py_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, folder))
                  for f in fs if f.endswith(".py"))


def test_every_import_is_installed_by_setup_py():
    """The README installs ``.[test]`` and runs the suite: each import of the package, the entry scripts
    and the tests must come with it (scipy was missing); tools and benchmarks may add the ``tools`` extra."""
    groups, _ = _setup_requirements()
    core = ["main_pretrain.py", "main_linear.py", "main_knn.py"] + _py_files("contrast")
    suite = groups["install"] | groups["test"]
    for path_set, allowed in ((core, groups["install"]), (_py_files("tests"), suite),
                              (_py_files("tools") + _py_files("benchmarks"), suite | groups["tools"])):
        missing = {dist: sorted(p) for dist, p in _third_party_imports(path_set).items() if dist not in allowed}
        assert not missing, f"imported but not installed by setup.py: {missing}"
    assert "scipy" in groups["test"]




# ------------------------------------------------------------------ the install: CPU wheels, size, no caps
def test_install_doc_gives_cpu_wheels_sizes_and_no_torch_cap():
    install = _read("docs/install.md")
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in install
    assert re.search(r"\d(\.\d)? GB", install), "the install's size"
    _, install_requires = _setup_requirements()
    torch_reqs = [r for r in install_requires if r.startswith("torch")]
    assert torch_reqs and not any("<" in r for r in torch_reqs), "no upper cap that blocks a newer torch"


# ------------------------------------------------------------------ linear evaluation reads the checkpoint
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("fh_data")), num_classes=2, per_class=4, size=(36, 36))


def test_linear_takes_arch_and_image_size_from_the_checkpoint(small_data, tmp_path, pretrained_checkpoint):
    """Pretrained as ResNet-18 at 32 px; linear evaluation given no --arch/--image-size (the recipe passes
    none) used to build the default ResNet-50 and fail with a shape mismatch."""
    config = {"model": "MoCo", "arch": "resnet18", "stem": "imagenet", "image_size": 32}
    ckpt = pretrained_checkpoint(tmp_path / "pre.pth", trained_looking_backbone("resnet18"), config)
    out = tmp_path / "eval"
    common = ["--data-dir", small_data, "--pretrained-model", ckpt, "--total-batch-size", "4", "--epochs", "1",
              "--num-workers", "0", "--warmup-epoch", "0", "--no-tensorboard", "--amp-opt-level", "O0"]
    result = main_linear.main(common + ["--output-dir", str(out)])
    assert 0 <= result["last_acc1"] <= 100
    log = (out / "log.txt").read_text()
    assert f"backbone resnet18 (imagenet stem), image size 32, val crop fraction 0.875; from {ckpt}: arch, stem, " \
           f"image_size" in log
    # an explicit, wrong --arch: the error names what the checkpoint holds
    with pytest.raises(CheckpointError, match=r"pre\.pth: .*the checkpoint holds model=MoCo, arch=resnet18, "
                                              r"stem=imagenet.*image_size=32"):
        main_linear.main(common + ["--output-dir", str(tmp_path / "e2"), "--arch", "resnet50"])


STUB = '''\
#!{python}
"""Stand-in for python: records each call; fakes the outputs of the project's scripts."""
import json, os, sys
argv = sys.argv[1:]
if argv[:1] == ["-"]:                       # a script on stdin (the demo's summary): really run it
    os.execv({python!r}, [{python!r}] + argv)
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
def flag(name):
    return argv[argv.index(name) + 1] if name in argv else None
script = next((a for a in argv if a.endswith(".py")), "?")
for i in range(200):                        # enough output to notice a truncated log
    print(f"stdout of {{os.path.basename(script)}} line {{i}}", flush=True)
    print(f"stderr of {{os.path.basename(script)}} line {{i}}", file=sys.stderr, flush=True)
if script.endswith("make_demo_dataset.py"):
    os.makedirs(os.path.join(flag("--data-dir"), "train"))
elif script.endswith("main_pretrain.py"):
    os.makedirs(flag("--output-dir"), exist_ok=True)
    for name in ("current.pth", "ckpt_epoch_" + (flag("--save-freq") or "10") + ".pth"):
        open(os.path.join(flag("--output-dir"), name), "w").write("x")
elif script.endswith("main_knn.py"):
    json.dump({{"knn": {{"20": {{"top1": 61.5}}, "200": {{"top1": 55.0}}}}, "linear": {{"top1": 70.25}}}},
              open(flag("--output-json"), "w"))
elif script.endswith("main_linear.py"):
    out = flag("--output-dir")
    os.makedirs(out, exist_ok=True)
    for name in ("current.pth", "ckpt_epoch_" + (flag("--save-freq") or "10") + ".pth"):
        open(os.path.join(out, name), "w").write("x")
    open(os.path.join(out, "log.txt"), "w").write(
        "linear evaluation done: last top-1 44.00 top-5 90.00, best top-1 45.00 (epoch 7); checkpoint x\\n")
'''


def _stub_python(tmp_path):
    stub = tmp_path / "python-stub"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    return str(stub), calls


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_recipe_launches_both_stages_and_linear_needs_no_arch(tmp_path):
    """``NPROC=2 EXTRA_ARGS="--arch resnet18 --image-size 32" bash scripts/MoCov2.sh 2``: both stages go
    through contrast.launch; linear evaluation gets the checkpoint and no arch (it reads the config)."""
    stub, calls = _stub_python(tmp_path)
    env = dict(os.environ, PYTHON=stub, STUB_CALLS=str(calls), DATA_DIR=str(tmp_path / "data"), NPROC="2",
               OUTPUT_DIR=str(tmp_path / "out"), EXTRA_ARGS="--arch resnet18 --image-size 32")
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "MoCov2.sh"), "2"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    pretrain, linear = _calls(calls)
    for call, script in ((pretrain, "main_pretrain.py"), (linear, "main_linear.py")):
        assert call[:2] == ["-m", "contrast.launch"] and "--nproc_per_node=2" in call and script in call
    assert pretrain[pretrain.index("--arch") + 1] == "resnet18" and "--epochs" in pretrain
    assert linear[linear.index("--pretrained-model") + 1] == str(tmp_path / "out" / "current.pth")
    assert "--arch" not in linear and "--image-size" not in linear


# ------------------------------------------------------------------ one name per concept
#: concept flags and their aliases -> the one dest every parser uses
CANONICAL = {"--pretrained-model": "pretrained_model", "--checkpoint": "pretrained_model",
             "--output-dir": "output_dir", "--data-dir": "data_dir", "--out": "data_dir", "--seed": "seed",
             "--device": "device", "--batch-size": "batch_size", "--batch": "batch_size",
             "--feature-dim": "feature_dim", "--dim": "feature_dim", "--image-size": "image_size",
             "--size": "image_size", "--arch": "arch", "--archs": "arch", "--stem": "stem",
             "--output-json": "output_json", "--debug": "debug"}
#: older names: never a flag's own name, only an alias after it
OLD_NAMES = {"--checkpoint", "--out", "--batch", "--dim", "--size", "--archs", "--num-negative", "--storage-root",
             "--rng-seed"}
#: each tool's parser, built in the tool's own file from the shared flag groups of contrast/option.py
TOOLS = {name: _load_tool(path) for name, path in [
    ("export_backbone.py", "tools/export_backbone.py"), ("plot_curves.py", "tools/plot_curves.py"),
    ("prepare_fashion_mnist.py", "tools/prepare_fashion_mnist.py"),
    ("make_demo_dataset.py", "tools/make_demo_dataset.py"),
    ("train_step.py", "benchmarks/train_step.py"), ("pic_head.py", "benchmarks/pic_head.py"),
    ("data_pipeline.py", "benchmarks/data_pipeline.py")]}
PARSERS = {
    "main_pretrain.py": option.pretrain_parser, "main_linear.py": option_eval.linear_parser,
    "main_knn.py": main_knn.knn_parser, "export_backbone.py": TOOLS["export_backbone.py"].export_parser,
    "plot_curves.py": TOOLS["plot_curves.py"].plot_curves_parser,
    "prepare_fashion_mnist.py": TOOLS["prepare_fashion_mnist.py"].prepare_fashion_mnist_parser,
    "make_demo_dataset.py": TOOLS["make_demo_dataset.py"].demo_dataset_parser,
    "train_step.py": lambda: TOOLS["train_step.py"].train_step_parser("", ["PIC"]),
    "pic_head.py": TOOLS["pic_head.py"].pic_head_parser,
    "data_pipeline.py": TOOLS["data_pipeline.py"].data_pipeline_parser,
}


@pytest.mark.parametrize("tool", list(PARSERS))
def test_one_flag_name_per_concept_in_every_parser(tool):
    parser = PARSERS[tool]()
    # --out of the JSON-writing benchmarks / main_knn is an alias of --output-json, elsewhere of --data-dir
    for action in parser._actions:
        names = action.option_strings
        if names and names[0] in OLD_NAMES:
            pytest.fail(f"{tool}: {names[0]} is an old name; use the shared one and keep it as an alias")
        for name in names:
            expected = CANONICAL.get(name)
            if name in ("--out", "--output") and action.dest == "output_json":
                continue
            if expected is not None:
                assert action.dest == expected, f"{tool}: {name} -> {action.dest}, not {expected}"


def test_knn_and_linear_take_the_same_names():
    knn = main_knn.parse_knn_args(["--random-init", "--arch", "resnet18", "--output-dir", "/tmp/x"])
    assert knn.output_json == os.path.join("/tmp/x", "knn.json")
    for argv in (["--checkpoint", __file__], ["--pretrained-model", __file__]):
        assert main_knn.parse_knn_args(argv + ["--output", "r.json"]).pretrained_model == __file__
        lin = option_eval.parse_linear_args(argv + ["--output-dir", "o"])
        assert (lin.pretrained_model, lin.output_dir) == (__file__, "o")
    tools = [PARSERS["plot_curves.py"]().parse_args(["--runs", "a", "--debug"]),
             PARSERS["make_demo_dataset.py"]().parse_args(["--out", "d", "--size", "16", "--rng-seed", "3"]),
             PARSERS["pic_head.py"]().parse_args(["--storage-root", "s", "--dim", "8", "--out", "r.json"])]
    assert tools[0].debug and (tools[1].data_dir, tools[1].image_size, tools[1].seed) == ("d", 16, 3)
    assert (tools[2].pic_storage_dir, tools[2].feature_dim, tools[2].output_json) == ("s", 8, "r.json")
    ts = TOOLS["train_step.py"].train_step_parser("", ["PIC", "MoCo"]).parse_args(
        ["--archs", "resnet18,resnet50", "--methods", "MoCo", "--channels-last", "0"])
    assert (ts.arch, ts.methods, ts.channels_last) == (["resnet18", "resnet50"], ["MoCo"], [0])
    with pytest.raises(SystemExit):
        TOOLS["train_step.py"].train_step_parser("", ["PIC"]).parse_args(["--arch", "resnet18,vgg"])


# ------------------------------------------------------------------ the demo: log intact, epochs explained, disk
def test_demo_log_survives_redirection_and_explains_window_epochs(tmp_path):
    """``bash scripts/demo.sh > log 2>&1`` used to wipe its own log (``tee /dev/stderr`` re-opened the
    file with truncation)."""
    stub, calls = _stub_python(tmp_path)
    demo = tmp_path / "demo"
    log = tmp_path / "demo.log"
    env = dict(os.environ, PYTHON=stub, STUB_CALLS=str(calls), DEMO_DIR=str(demo))
    with open(log, "w") as f:
        run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, stdout=f,
                             stderr=subprocess.STDOUT, timeout=120)
    text = log.read_bytes().decode()
    assert run.returncode == 0, text[-3000:]
    assert "\0" not in text
    for script in ("make_demo_dataset.py", "main_pretrain.py", "main_knn.py", "main_linear.py"):
        for stream in ("stdout", "stderr"):
            assert f"{stream} of {script} line 0\n" in text and f"{stream} of {script} line 199\n" in text
    assert text.count("stdout of main_knn.py line 199") == 2               # random init and PIC
    # 80 epochs over 300 images with a 240-image window: the loop (and its log) counts 100 window-epochs
    assert "80 epochs over 300 images = 100 sliding-window epochs of 240 images" in text
    assert "train epoch [e/100]" in text
    assert "random init ResNet-18  : kNN top-1 k=20 61.5, k=200 55.0; cached linear top-1 70.2" in text \
        or "random init ResNet-18  : kNN top-1 k=20 61.5, k=200 55.0; cached linear top-1 70.3" in text
    assert "PIC, linear evaluation : last top-1 44.00 top-5 90.00, best top-1 45.00 (epoch 7) (8 epochs)" in text
    make_data, pretrain, knn_random, knn_pic, linear = _calls(calls)
    assert make_data[make_data.index("--val-per-class") + 1] == "50"                # 500 test images
    assert make_data[make_data.index("--seed") + 1] == "0"                          # DATA_SEED
    assert pretrain[pretrain.index("--save-freq") + 1] == "100" and "--auto-resume" in pretrain
    assert "--arch" not in linear and "--image-size" not in linear                # from the checkpoint
    assert "--random-init" in knn_random and knn_pic[knn_pic.index("--pretrained-model") + 1].endswith("current.pth")
    # only the checkpoints the demo needs: current.pth of each stage, no ckpt_epoch_*.pth
    pths = sorted(os.path.relpath(os.path.join(d, f), demo) for d, _, fs in os.walk(demo) for f in fs
                  if f.endswith(".pth"))
    assert pths == ["PIC/current.pth", "PIC/eval/current.pth"]


# ------------------------------------------------------------------ one clear line, also under torchrun
def test_bad_batch_under_the_launcher_is_one_line(small_data, tmp_path):
    """2 processes, a per-process batch larger than each rank's share: one line, no torchrun report."""
    cmd = [sys.executable, "-m", "contrast.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           "main_pretrain.py", "--model", "MoCo", "--data-dir", small_data, "--output-dir", str(tmp_path / "o"),
           "--arch", "resnet18", "--image-size", "32", "--batch-size", "64", "--num-workers", "0",
           "--no-tensorboard"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == ["main_pretrain.py: error: --batch-size 64 per process is larger than the 4 images each of "
                     "the 2 process(es) gets per epoch; lower the batch size"], run.stderr
    assert "Traceback" not in run.stdout and "ChildFailedError" not in run.stdout


def _failure(exitcode, timestamp, message=""):
    return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, message=message,
                           error_file_data={"message": message} if message else {})


def test_launcher_reports_the_first_real_error():
    from contrast import launch
    line = "main_pretrain.py: error (rank 1): disk full"
    failures = {0: _failure(-15, 100), 1: _failure(1, 101, {"message": line, "extraInfo": {}}), 2: _failure(1, 99)}
    rank, failure = launch.first_failure(failures)
    assert rank == 1 and launch.failure_line("main_pretrain.py", rank, failure) == line
    both = {0: _failure(1, 101, {"message": "rank 0's line"}), 1: _failure(1, 100, {"message": "rank 1's"})}
    assert launch.first_failure(both)[0] == 0                               # an error every rank met: rank 0's
    rank, failure = launch.first_failure({0: _failure(-9, 100), 3: _failure(1, 100)})
    assert rank == 3 and launch.failure_line("x.py", rank, failure) == \
        "contrast.launch: x.py: rank 3 exited with code 1 (its traceback is above)"
    assert "SIGKILL" in launch.failure_line("x.py", 0, _failure(-9, 100))


def test_knn_without_val_folder_is_one_line_before_any_extraction(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "noval"), num_classes=2, per_class=2, size=(36, 36), splits=("train",))
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(main_knn.main, ["--data-dir", data, "--random-init", "--arch", "resnet18", "--image-size",
                                       "32", "--num-workers", "0"])
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        f"{os.path.basename(sys.argv[0])}: error: {data}/val: split folder does not exist "
        f"(expected {data}/val/<class>/<image>)"]
    assert "[knn]" not in out.out                                           # nothing was extracted first


def test_torchrun_error_file_quotes_the_line(tmp_path, monkeypatch, capsys):
    """Plain torchrun: the agent's report quotes the line (error file) instead of a traceback link."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv(engine.LAUNCHER_ENV, raising=False)

    def fails(argv):
        raise ValueError("--batch-size 64 is too large")
    with pytest.raises(SystemExit):
        engine.run_cli(fails, [])
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    line = f"{os.path.basename(sys.argv[0])}: error: --batch-size 64 is too large"
    assert failure.message["message"] == line and capsys.readouterr().err.strip() == line
    monkeypatch.setenv(engine.LAUNCHER_ENV, "1")                             # the launcher prints it instead
    with pytest.raises(SystemExit):
        engine.run_cli(fails, [])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ noise
def test_ddp_without_the_broadcast_buffers_warning():
    import torch.distributed as dist
    from contrast.distributed import DistEnv
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = engine.wrap_ddp(nn.Linear(2, 2), DistEnv(0, 2, 0, torch.device("cpu"), "gloo"))
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        assert not [w for w in caught if "broadcast_buffers" in str(w.message)], [str(w.message) for w in caught]
    finally:
        dist.destroy_process_group()


def test_default_workers_fit_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert option.default_num_workers() == 1                              # was a fixed 4 on 2 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert option.default_num_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert option.default_num_workers() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert option.pretrain_parser().get_default("num_workers") == 1


def test_single_process_log_has_no_backend_none(tmp_path):
    run = engine.setup_run("pretrain", str(tmp_path), device="cpu", tensorboard=False)
    run.close()   # the signal handlers and their watchdog go with the run
    for h in run.logger.handlers:
        h.flush()
    log = (tmp_path / "log.txt").read_text()
    assert "pretrain: single process, device cpu" in log and "backend None" not in log and "None" not in log


# ------------------------------------------------------------------ curves of a run, not of its sub-runs
def _events(path, lr):
    writer = SummaryWriter(str(path))
    for step in range(1, 5):
        writer.add_scalar("train/lr", lr * step / 4, step)
    writer.close()


def test_plot_curves_reads_only_the_run_folder_unless_recursive(tmp_path):
    plot_curves = _load_tool("tools/plot_curves.py")
    _events(tmp_path / "pre", 0.03)
    _events(tmp_path / "pre" / "eval", 2.8)                                # linear evaluation in OUT/eval
    own = plot_curves.load_run(str(tmp_path / "pre"))
    assert max(v for _, v in own["train/lr"]) == pytest.approx(0.03) and len(own["train/lr"]) == 4
    both = plot_curves.load_run(str(tmp_path / "pre"), recursive=True)
    assert max(v for _, v in both["train/lr"]) == pytest.approx(2.8) and len(both["train/lr"]) == 8
    assert plot_curves.parse_args(["--runs", "a", "--recursive"]).recursive
    (tmp_path / "parent").mkdir()
    _events(tmp_path / "parent" / "run1", 0.1)
    with pytest.raises(FileNotFoundError, match="sub-folders have some"):
        plot_curves.load_run(str(tmp_path / "parent"))


# ------------------------------------------------------------------ pic_head.py creates its storage folder
def test_pic_head_creates_the_storage_folder(tmp_path, capsys):
    pic_head = _load_tool("benchmarks/pic_head.py")
    target = tmp_path / "not" / "yet"
    pic_head.main(["--worker", "sampled", "--n", "300", "--pic-num-negative", "8", "--batch-size", "4",
                   "--feature-dim", "4", "--reps", "1", "--threads", "1", "--storage-root", str(target)])
    result = json.loads(capsys.readouterr().out.split("RESULT ", 1)[1])
    assert result["head"] == "sampled" and result["N"] == 300 and target.is_dir()
    assert os.listdir(target) == []                                        # the run's own sub-folder is removed
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        engine.run_cli(pic_head.main, ["--sizes", "300", "--pic-storage-dir", str(blocker / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and f"--pic-storage-dir {blocker / 'x'}: cannot create" in err[0]


# ------------------------------------------------------------------ progress lines for long steps
def test_progress_lines_off_a_terminal_and_bar_on_one():
    quick = io.StringIO()
    with Progress("fast", total=10, stream=quick, every=60) as bar:
        bar.update(10)
    assert quick.getvalue() == ""                                           # a quick step stays silent
    lines = io.StringIO()
    with Progress("extract train", total=4, unit="img", stream=lines, every=0) as bar:
        for _ in range(4):
            bar.update(1)
    out = lines.getvalue().splitlines()
    assert re.fullmatch(r"\[extract train\] 1/4 \(25%\) [\d.]+ img/s, eta \d:\d\d:\d\d", out[0]), out
    assert out[3].startswith("[extract train] 4/4 (100%)") and re.fullmatch(r"\[extract train\] 4/4 img in "
                                                                             r"\d:\d\d:\d\d", out[-1])
    tty = io.StringIO()
    bar = Progress("knn", total=2, unit="query", stream=tty, tty=True)
    bar._last -= 1.0
    bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") == 2 and "|##########          | 1/2 (50%)" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    silent = io.StringIO()
    with Progress("other rank", total=2, stream=silent, every=0, enabled=False) as bar:
        bar.update(2)
    assert silent.getvalue() == ""


def test_progress_reaches_feature_extraction_and_knn(small_data, capsys, monkeypatch):
    """main_knn.py shows progress for extraction, kNN and the cached probe (forced on with every=0)."""
    import contrast.logger
    real = contrast.logger.Progress.__init__

    def every_update(self, *a, **kw):
        real(self, *a, **{**kw, "every": 0})
    monkeypatch.setattr(contrast.logger.Progress, "__init__", every_update)
    main_knn.main(["--data-dir", small_data, "--raw-pixels", "--image-size", "16", "--num-workers", "0",
                   "--knn-k", "3", "--linear-cached", "--linear-epochs", "2", "--batch-size", "4"])
    err = capsys.readouterr().err
    for desc, total in (("train features", "8 img"), ("val features", "8 img"), ("kNN", "8 query"),
                        ("linear-cached", "2 epoch")):
        assert f"[{desc}] {total.split()[0]}/{total.split()[0]} {total.split()[1]} in " in err, (desc, err)
