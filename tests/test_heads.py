"""Projection heads: the release's MLP (hidden width 2048 for every backbone) and linear head."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrast.models.heads import build_head


@pytest.mark.parametrize("in_dim", [512, 2048])
def test_mlp_head_is_the_releases_fc1_relu_fc2(in_dim):
    head = build_head(in_dim, 128, mlp=True)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    # the release's encoder.fc1.* / encoder.fc2.*: hidden width 2048 whatever the backbone width
    assert shapes == {"0.weight": (2048, in_dim), "0.bias": (2048,), "2.weight": (128, 2048), "2.bias": (128,)}
    # a release head's tensors load under our names and compute fc2(relu(fc1(x)))
    g = torch.Generator().manual_seed(0)
    release = {"fc1.weight": torch.randn(2048, in_dim, generator=g), "fc1.bias": torch.randn(2048, generator=g),
               "fc2.weight": torch.randn(128, 2048, generator=g), "fc2.bias": torch.randn(128, generator=g)}
    head.load_state_dict({k.replace("fc1.", "0.").replace("fc2.", "2."): v for k, v in release.items()}, strict=True)
    x = torch.randn(3, in_dim, generator=g)
    expected = F.linear(F.relu(F.linear(x, release["fc1.weight"], release["fc1.bias"])),
                        release["fc2.weight"], release["fc2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-4)


def test_hidden_width_is_configurable_and_linear_head_has_bias():
    head = build_head(8, 3, mlp=True, hidden_dim=16)
    assert (head[0].in_features, head[0].out_features, head[2].in_features, head[2].out_features) == (8, 16, 16, 3)
    linear = build_head(8, 3)
    assert isinstance(linear, nn.Linear) and linear.bias is not None and linear.weight.shape == (3, 8)
    assert isinstance(build_head(8, 3, hidden_dim=16), nn.Linear)   # hidden width only matters for the MLP


def test_bad_dimensions_are_rejected():
    with pytest.raises(ValueError, match="--feature-dim"):
        build_head(8, 0)
    with pytest.raises(ValueError, match="hidden width"):
        build_head(8, 3, mlp=True, hidden_dim=0)
