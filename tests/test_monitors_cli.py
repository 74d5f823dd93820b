"""The monitors in real pretraining runs (main_pretrain.py, tiny data): the online probe leaves the
pretraining unchanged, resumes exactly and runs on 2 processes; the collapse warning fires on a
collapsing run and not on a healthy one; --wandb logs offline."""
import os
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
from torch import nn

import main_pretrain
from contrast.checkpoint import read_checkpoint
from contrast.models import register
from contrast.models.base import BaseMethod
from contrast.models.recipe import Recipe
from contrast.models.registry import unregister
from contrast.models.views import Views
from contrast.models.backbone_base import Backbone
from tests.dist_utils import free_port
from tests.synthetic import make_image_folder
from tests.test_cli_pretrain import METHOD_FLAGS, ROOT, tiny_args

SIMCLR = METHOD_FLAGS["SimCLR"]
WARNING = "looks collapsed"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), num_classes=2, per_class=4, size=(36, 36))


def log_text(out) -> str:
    with open(os.path.join(out, "log.txt")) as f:
        return f.read()


def same_states(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_online_probe_leaves_pretraining_unchanged(data_dir, tmp_path):
    """Same seed with and without the monitors: identical weights and buffers; the monitors' scalars
    reach log.txt and TensorBoard, the probe is in the checkpoint."""
    on, off = tmp_path / "on", tmp_path / "off"
    args_on = tiny_args(data_dir, on, *SIMCLR, "--online-probe", "--monitor-collapse-freq", "1", epochs=2)
    args_on.remove("--no-tensorboard")
    main_pretrain.main(args_on)
    main_pretrain.main(tiny_args(data_dir, off, *SIMCLR, "--no-online-probe", "--no-monitor-collapse", epochs=2))
    a, b = read_checkpoint(str(on / "current.pth")), read_checkpoint(str(off / "current.pth"))
    assert same_states(a.model, b.model)
    assert set(a.extra["monitors"]["probe"]) == {"weight", "bias", "optimizer"} and "monitors" not in b.extra
    text = log_text(on)
    assert "probe/acc" in text and "collapse/rank" in text and "collapse/align" in text and WARNING not in text
    assert "probe/acc" not in log_text(off)
    from tools.plot_curves import load_run, main as plot_curves_main
    series = load_run(str(on))
    assert {"train/probe/acc", "train/collapse/std", "train/collapse/rank"} <= set(series)
    drawn = plot_curves_main(["--runs", str(on), "--output", str(tmp_path / "curves.png")])
    assert drawn["probe"] == 1 and drawn["rank"] == 1 and drawn["collapse"] == 3   # std_rel, align, uniform


@pytest.mark.slow
def test_online_probe_resumes_exactly(data_dir, tmp_path):
    """Resuming from the epoch-1 checkpoint ends with the probe (and the model) of the uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main_pretrain.main(tiny_args(data_dir, full, *SIMCLR, "--save-freq", "1", epochs=2))
    main_pretrain.main(tiny_args(data_dir, resumed, *SIMCLR, "--resume", str(full / "ckpt_epoch_1.pth"), epochs=2))
    a, b = read_checkpoint(str(full / "current.pth")), read_checkpoint(str(resumed / "current.pth"))
    assert same_states(a.model, b.model)
    pa, pb = a.extra["monitors"]["probe"], b.extra["monitors"]["probe"]
    first = read_checkpoint(str(full / "ckpt_epoch_1.pth")).extra["monitors"]["probe"]
    assert not torch.equal(first["weight"], pa["weight"])   # the second epoch trained it
    assert torch.equal(pa["weight"], pb["weight"]) and torch.equal(pa["bias"], pb["bias"])
    assert torch.equal(pa["optimizer"]["state"][0]["momentum_buffer"], pb["optimizer"]["state"][0]["momentum_buffer"])


class GatedFeatures(nn.Module, Backbone):
    """``b + a * BN(linear(pooled image))``: batch-normalised features scaled by one parameter ``a``
    (with the backbone interface)."""

    family = "gated"

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.feat_dim = dim
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, dim),
                                 nn.BatchNorm1d(dim, affine=False))
        self.a = nn.Parameter(torch.ones(()))
        self.register_buffer("b", torch.full((dim,), 0.1))

    def forward(self, x):
        return self.b + self.a * self.net(x)


class Collapser(BaseMethod):
    """A method whose loss rewards a constant embedding: the batch variance of its features (8 a^2:
    ``a`` decays to 0 and every feature to ``b``)."""

    name = "Collapser"
    views = Views(count=1)
    recipe = Recipe(aug="InstDisc")

    @classmethod
    def from_config(cls, cfg, num_instances):
        return cls(GatedFeatures(8), 8)

    def training_loss(self, views, index):
        z = self.backbone(views[0]).float()
        return {"loss": (z - z.mean(dim=0)).pow(2).sum(dim=1).mean()}


@pytest.fixture
def collapser():
    register(Collapser)
    yield
    unregister("Collapser")


@pytest.mark.slow
def test_collapse_warning_fires_on_collapsing_run(collapser, data_dir, tmp_path):
    out = tmp_path / "collapse"
    main_pretrain.main(tiny_args(data_dir, out, "--model", "Collapser", "--base-learning-rate", "3.2",
                                 "--weight-decay", "0", "--momentum", "0", "--lr-scheduler", "step",
                                 "--monitor-collapse-freq", "1", epochs=4))
    text = log_text(out)
    assert WARNING in text and "std of the normalised embeddings" in text
    first = [line for line in text.splitlines() if "collapse/std_rel" in line][0]
    assert float(first.split("collapse/std_rel ")[1].split()[0]) > 0.05   # healthy at the start


@pytest.mark.slow
def test_monitors_two_processes(data_dir, tmp_path):
    """torchrun, 2 gloo processes x batch 2: the probe trains (one all-reduce per step) and is saved."""
    out = tmp_path / "ddp"
    argv = tiny_args(data_dir, out, *SIMCLR, "--monitor-collapse-freq", "1")
    argv[argv.index("--batch-size") + 1] = "2"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "main_pretrain.py", *argv],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = read_checkpoint(str(out / "current.pth"))
    assert ckpt.world_size == 2 and ckpt.extra["monitors"]["probe"]["weight"].abs().sum() > 0
    assert "probe/acc" in log_text(out) and "collapse/rank" in log_text(out)


class FakeWandbRun:
    def __init__(self, calls: List) -> None:
        self.calls = calls

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, values):
        self.calls.append(("log", dict(values)))

    def finish(self):
        self.calls.append(("finish",))


class FakeWandb:
    def __init__(self) -> None:
        self.calls: List = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return FakeWandbRun(self.calls)


def test_wandb_sink_logs_config_and_tensorboard_scalars(tmp_path):
    from contrast.logger import TensorBoard
    from contrast.wandb_logger import WandbSink
    fake = FakeWandb()
    tb = TensorBoard(str(tmp_path), enabled=False)
    tb.add_sink(WandbSink.start("proj", "run1", {"data": {"batch_size": 4}}, str(tmp_path), module=fake))
    tb.scalars({"loss": 1.5, "probe/acc": 50.0}, 7, prefix="train/")
    tb.scalars({"loss": 1.25}, 1, prefix="epoch/")
    tb.close()
    assert fake.calls[0] == ("init", {"project": "proj", "name": "run1", "config": {"data": {"batch_size": 4}},
                                      "dir": str(tmp_path)})
    logs = [c[1] for c in fake.calls if c[0] == "log"]
    assert logs == [{"train_step": 7, "train/loss": 1.5, "train/probe/acc": 50.0},
                    {"epoch_step": 1, "epoch/loss": 1.25}]
    assert ("define_metric", "train/*", "train_step") in fake.calls and fake.calls[-1] == ("finish",)


def test_wandb_missing_is_one_line(monkeypatch, tmp_path):
    from contrast.wandb_logger import WandbSink
    monkeypatch.setitem(sys.modules, "wandb", None)   # import fails
    with pytest.raises(ImportError, match=r"pip install 'contrast\[wandb\]'"):
        WandbSink.start("p", "n", {}, str(tmp_path))


@pytest.mark.slow
def test_wandb_offline_run(data_dir, tmp_path, monkeypatch):
    import wandb  # noqa: F401  (a test dependency: setup.py [test])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    main_pretrain.main(tiny_args(data_dir, out, *SIMCLR, "--wandb", "--wandb-project", "test"))
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    records = [f for f in os.listdir(out / "wandb" / runs[0]) if f.endswith(".wandb")]
    data = (out / "wandb" / runs[0] / records[0]).read_bytes()
    assert b"train/probe/acc" in data and b"collapse/rank" in data and b"wandb_project" in data   # scalars, config
