"""--compile is skipped, with a warning, where SyncBatchNorm runs on several ranks (pytorch#107372)."""
import logging

import pytest
import torch
from torch import nn

from contrast import distributed as cd
from contrast import engine


class Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.compiled = False
        self.backbone.compile = lambda: setattr(self, "compiled", True)


@pytest.mark.parametrize("world, sync_bn, compiled", [(2, True, False), (2, False, True), (1, True, True)])
def test_compile_with_sync_batchnorm(world, sync_bn, compiled, monkeypatch):
    monkeypatch.setattr(cd, "get_world_size", lambda: world)
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logging.getLogger("contrast").addHandler(handler)
    try:
        model = engine.prepare_model(Method(), torch.device("cpu"), sync_batchnorm=sync_bn,
                                     compile_backbone=True)
    finally:
        logging.getLogger("contrast").removeHandler(handler)
    assert model.compiled is compiled
    warned = [r for r in records if "--compile skipped" in r.getMessage()]
    assert bool(warned) is not compiled
    if warned:
        assert warned[0].levelno == logging.WARNING and "pytorch#107372" in warned[0].getMessage()
    if world == 2 and sync_bn:
        assert isinstance(model.backbone[1], cd.GlobalBatchNorm)
