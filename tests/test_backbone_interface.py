"""The backbone interface (contrast/models/backbone_base.py): both families implement it, and no
method, evaluation, tool or benchmark branches on the family of a backbone."""
import glob
import os
import re

import pytest
import torch

from contrast.config import BackboneConfig
from contrast.models import BACKBONE_ARCHS, FEATURE_KINDS, make_backbone, recipe_for
from contrast.models.backbone_base import Backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The modules that may know the families: the interface, the families and their dispatch.
BACKBONE_MODULES = {"contrast/models/backbone_base.py", "contrast/models/backbones.py", "contrast/models/vit.py",
                    "contrast/models/backbone_factory.py"}
#: Ways of asking "is it a ResNet / a ViT?".
FAMILY_BRANCHES = [
    r"""startswith\(\s*["'](resnet|wide_resnet|vit)""",
    r"""["'](resnet|vit)[\w]*["']\s+(not\s+)?in\s+[\w.\[\]"']*arch""",
    r"""isinstance\([^)]*\b(ResNet\w*|VisionTransformer|ViTBackbone)\b""",
    r"""\.family\s*[!=]=""",
    r"""family_of\(""",
    r"""\barch\s*[!=]=\s*["'](resnet|vit)""",
]


def _sources():
    files = glob.glob(os.path.join(ROOT, "contrast", "**", "*.py"), recursive=True)
    files += glob.glob(os.path.join(ROOT, "main_*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    files += glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
    return sorted(f for f in files if os.path.relpath(f, ROOT) not in BACKBONE_MODULES)


def test_no_code_branches_on_the_backbone_family():
    offending = []
    for path in _sources():
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if any(re.search(p, line) for p in FAMILY_BRANCHES):
                    offending.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offending, "branching on the backbone family outside the backbone modules:\n" + "\n".join(offending)


def test_the_grep_finds_the_branches_it_is_meant_to_find():
    for line in ['if arch.startswith("resnet"):', 'if "vit" in args.arch:', "isinstance(net, ResNet)",
                 "if backbone.family == 'vit':", "x = family_of(arch)", 'if cfg.arch == "vit_small":']:
        assert any(re.search(p, line) for p in FAMILY_BRANCHES), line


@pytest.mark.parametrize("arch", ["resnet18", "resnet18_d", "vit_pico"])
def test_both_families_implement_the_interface(arch):
    torch.manual_seed(0)
    net = make_backbone(BackboneConfig(arch, image_size=32, patch_size=4)).eval()
    assert isinstance(net, Backbone) and arch in BACKBONE_ARCHS
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (2, net.feat_dim)
        for kind in net.feature_kinds:
            assert kind in FEATURE_KINDS and net.features(x, kind).shape == (2, net.feature_dim(kind))
    assert net.eval_feature in net.feature_kinds
    names = dict(net.named_parameters())
    assert net.no_weight_decay() <= names.keys()
    assert {n for n, p in names.items() if p.ndim < 2} <= net.no_weight_decay()
    layers = {n: net.layer_id(n) for n in names}   # layer-wise lr decay: every parameter in 0..L+1
    assert net.num_layers >= 1 and all(0 <= i <= net.num_layers + 1 for i in layers.values())
    assert min(layers.values()) == 0 and max(layers.values()) >= net.num_layers
    if arch == "resnet18_d":
        with pytest.raises(ValueError, match="ResNet-D, not a torchvision"):
            net.reference_model()
        return
    ref = net.reference_model().eval()
    ref.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), net(x))


def test_recipe_follows_the_family():
    from contrast.models import METHODS
    cls = METHODS["MoCo"]
    assert recipe_for(cls, "resnet50") is cls.recipe and recipe_for(cls, "vit_base") is cls.vit_recipe
