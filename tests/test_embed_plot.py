"""tools/embed_plot.py: a t-SNE map of a checkpoint's backbone features, one colour per class."""
import sys

import pytest

from contrast.models import build_backbone
from tests.synthetic import make_image_folder

from tools import embed_plot


def test_embed_plot_tsne(tmp_path, pretrained_checkpoint):
    import sklearn  # noqa: F401  (a test dependency: setup.py [test])
    data = make_image_folder(str(tmp_path / "data"), num_classes=3, per_class=4, size=(36, 36))
    backbone, _ = build_backbone("resnet18", stem="imagenet")
    backbone.eval()
    ckpt = pretrained_checkpoint(tmp_path / "ckpt.pth", backbone, {"arch": "resnet18", "image_size": 32, "model": "X"})
    out = tmp_path / "map.png"
    res = embed_plot.main(["--pretrained-model", ckpt, "--data-dir", data, "--max-points", "10", "--num-workers", "0",
                           "--batch-size", "4", "--device", "cpu", "--output", str(out)])
    assert res["points"] == 10 and res["coords"].shape == (10, 2) and set(res["labels"]) <= {0, 1, 2}
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_embed_plot_umap_missing_is_one_line(monkeypatch):
    import numpy as np
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="pip install umap-learn"):
        embed_plot.reduce_2d(np.zeros((4, 3)), "umap", 0)
