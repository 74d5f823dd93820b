"""Every shell command the README shows is run: by CI (.ci/run), by a named test, or here in a reduced
form (tiny data, few steps, fewer processes) that keeps the command's own flags.

``COVERED`` maps each command (comments stripped) to how it runs; a command added to the README
without an entry fails ``test_every_readme_command_is_covered``.
"""
import os
import re
import subprocess
import sys

import pytest

from tests.dist_utils import free_port
from tests.synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
        "--epochs", "1", "--warmup-epoch", "0", "--num-workers", "2", "--print-freq", "1", "--no-tensorboard",
        "--contrast-num-negative", "32", "--window-size", "16", "--window-stride", "4"]

#: README command -> "ci" (.ci/run runs it or its superset), "test:<file>::<name>", or "here:<key>"
COVERED = {
    "pip install -e .": "ci",
    "pip install -e . && bash scripts/demo.sh": "here:demo",
    'pip install -e ".[test]" && python -m pytest -q tests': "ci",
    'python -m pytest -q -m "not slow" tests': "ci",
    "python main_pretrain.py --model MoCov2 --data-dir DATA --output-dir OUT/mocov2": "here:chain",
    "python -m contrast.launch --nproc_per_node=8 main_pretrain.py --model PIC --data-dir DATA --zip "
    "--output-dir OUT/pic --auto-resume": "here:chain",
    "DATA_DIR=/data/ImageNet-Zip NPROC=8 bash scripts/PIC.sh 400":
        "test:tests/test_cli_pretrain.py::test_reproduction_script_runs",
    "python tools/make_zip_dataset.py --src DATA --dst DATA-Zip": "here:chain",
    "python main_linear.py --pretrained-model OUT/pic/current.pth --data-dir DATA --output-dir OUT/pic/linear":
        "here:chain",
    "python main_knn.py --pretrained-model OUT/pic/current.pth --data-dir DATA --knn-k 20 200 --linear-cached":
        "here:chain",
    "OUT=output/bench_fmnist bash scripts/bench_fashion_mnist.sh":
        "test:tests/test_bench_script.py::test_bench_script_writes_both_tables_and_curves",
    "bash scripts/fmnist_60k.sh": "test:tests/test_bench_script.py::test_fmnist_60k_script_baselines_run_table_and_curve",
    "bash scripts/compare_fashion_mnist.sh": "test:tests/test_bench_script.py::test_compare_script_tune_split_and_vit_rows",
    "bash benchmarks/gpu_check.sh":
        "test:tests/test_gpu_check.py::test_tiny_mode_runs_the_entry_scripts_for_representative_methods",
}


def readme_commands():
    """Lines of the README's ``bash`` blocks and inline code spans that start like a command."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        found += [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", re.sub(r"\n", " ", prose)):
        span = re.sub(r"\s+", " ", span).strip()
        if re.fullmatch(r"python -m [\w.]+", span):   # names a module (the launcher), runs nothing
            continue
        if re.match(r"(\w+=\S+ )*(python|bash|pip|torchrun) ", span) and not span.endswith(".py"):
            found.append(span)
    return found


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 8, commands
    missing = [c for c in commands if c not in COVERED]
    assert not missing, f"README commands that nothing runs: {missing}"
    stale = [c for c in COVERED if c not in commands]
    assert not stale, f"COVERED lists commands the README no longer shows: {stale}"


def test_ci_runs_the_readme_install_and_test_commands():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"python3 -m venv \S+", ci), "CI builds a fresh virtual environment every run"
    assert 'pip install -qq -e ".[test]"' in ci and "python -m pytest -q tests" in ci


def test_named_tests_exist():
    for how in COVERED.values():
        if how.startswith("test:"):
            path, name = how[5:].split("::")
            assert re.search(rf"^def {name}\(", open(os.path.join(ROOT, path)).read(), re.M), how


def run(argv, env=None, timeout=300):
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})})
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def readme_argv(command, **subst):
    """The README's command as argv, its placeholders replaced (``DATA`` -> a folder, ...)."""
    words = command.split()
    words = [subst.get(w, w) for w in words]
    for placeholder, value in subst.items():
        words = [w.replace(placeholder + "/", value + "/") for w in words]
    return [sys.executable if w == "python" else w for w in words]


@pytest.mark.slow
def test_chain_of_readme_commands_in_reduced_form(tmp_path):
    """Folder data -> zip (the README's converter), MoCo v2 on the folder, PIC under contrast.launch
    on the zip (2 processes instead of 8), then linear evaluation and kNN of PIC's checkpoint."""
    data = make_image_folder(str(tmp_path / "data"), num_classes=2, per_class=8, size=(36, 36))
    zipped, out = str(tmp_path / "data-zip"), str(tmp_path / "out")
    sub = {"DATA": data, "DATA-Zip": zipped, "OUT": out}
    cmds = {c: readme_argv(c, **sub) for c, how in COVERED.items() if how == "here:chain"}
    convert, mocov2, launch, linear, knn = (next(v for c, v in cmds.items() if key in c) for key in
                                            ("make_zip_dataset", "--model MoCov2", "contrast.launch",
                                             "main_linear", "main_knn"))
    run(convert)
    assert os.path.isfile(os.path.join(zipped, "train.zip")) and os.path.isfile(os.path.join(zipped, "val_map.txt"))
    run(mocov2 + TINY)
    assert os.path.isfile(os.path.join(out, "mocov2", "current.pth"))
    launch = [w.replace("--nproc_per_node=8", "--nproc_per_node=2") for w in launch]
    launch = [w if w != data else zipped for w in launch]
    launch[3:3] = [f"--master_port={free_port()}"]
    run(launch + TINY)
    assert os.path.isfile(os.path.join(out, "pic", "current.pth"))
    run(linear + ["--epochs", "1", "--total-batch-size", "8", "--num-workers", "0", "--no-tensorboard"])
    assert os.path.isfile(os.path.join(out, "pic", "linear", "current.pth"))
    result = run(knn + ["--num-workers", "0", "--linear-epochs", "2", "--batch-size", "8"])
    assert "[knn] k=20" in result.stdout and "[linear-cached]" in result.stdout


@pytest.mark.slow
def test_demo_in_reduced_form(tmp_path):
    """``bash scripts/demo.sh`` with 2 epochs, 8 images per class, 1 linear epoch and the cheap ``imagenet``
    stem: every stage runs and it prints where the results are."""
    proc = run(["bash", "scripts/demo.sh"], env={"DEMO_DIR": str(tmp_path / "demo"), "EPOCHS": "2",
                                                  "PER_CLASS": "8", "LINEAR_EPOCHS": "1", "STEM": "imagenet",
                                                  "PYTHON": sys.executable})
    for piece in ("PIC", "random init", "linear evaluation"):
        assert piece in proc.stdout + proc.stderr, piece
    assert os.path.isfile(tmp_path / "demo" / "PIC" / "current.pth")
