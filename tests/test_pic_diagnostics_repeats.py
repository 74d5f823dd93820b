"""PIC diagnostics keep the last embedding of an id that repeats in a batch, on any device (issue 29).

An index write with repeated indices has no defined order on CUDA (the CPU happens to keep the last).
The stand-in scheduler below applies repeated writes first-occurrence-wins, which CUDA may also
do; the diagnostics must still match a Python loop that assigns the rows in batch order.
"""
import torch

from contrast.models import pic_diagnostics as D
from contrast.models.pic_diagnostics import PICDiagnostics, last_occurrence_rows


def first_wins_setitem(monkeypatch):
    """``t[index] = values`` with a 1-d integer ``index`` applies the rows in reverse batch order."""
    setitem = torch.Tensor.__setitem__

    def reversed_writes(self, key, value):
        if torch.is_tensor(key) and key.dim() == 1 and not key.dtype.is_floating_point and key.dtype != torch.bool \
                and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == key.shape[0]:
            return setitem(self, key.flip(0), value.flip(0))
        return setitem(self, key, value)
    monkeypatch.setattr(torch.Tensor, "__setitem__", reversed_writes)


def test_repeated_ids_keep_their_last_embedding(monkeypatch):
    n, d = 6, 3
    diag = PICDiagnostics(n, window_steps=2, every=1000, num_tracked=4, seed=1)
    batches = [torch.tensor([0, 2, 0, 5, 2, 0]), torch.tensor([1, 1, 3, 4, 4, 5])]
    expected = {}
    g = torch.Generator().manual_seed(0)
    first_wins_setitem(monkeypatch)
    for index in batches:
        z = torch.nn.functional.normalize(torch.randn(len(index), d, generator=g), dim=1)
        diag.observe(z, index, torch.randn(n, d))
        for i, row in zip(index.tolist(), z):          # the reference: rows assigned in batch order
            expected[i] = row
    for i in diag.tracked.tolist():
        if i in expected:
            torch.testing.assert_close(diag.last_feat[int(diag.slot[i])], expected[i], rtol=0, atol=0)


def test_last_occurrence_rows():
    rows = last_occurrence_rows(torch.tensor([2, -1, 2, 0, 0, -1, 1]), scratch=3)
    assert rows.tolist() == [3, 3, 2, 3, 0, 3, 1]
    assert D.last_occurrence_rows(torch.zeros(0, dtype=torch.long), 3).numel() == 0
