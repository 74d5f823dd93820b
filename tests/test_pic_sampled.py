"""Sampled PIC classifier: motion log, correction engine, loss/gradients vs dense references, storage, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from contrast.models.pic import DenseInstanceClassifier
from contrast.models.pic_sampled import MotionLog, SampledInstanceClassifier, init_rows


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up from base/100, then cosine to 0 (the schedule shape the trainer uses)."""
    if step < warmup:
        return base / 100 + (base - base / 100) * step / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


# ----------------------------------------------------------------------------- motion log
def test_motion_log_products_match_step_by_step_matrices():
    m, wd = 0.9, 1e-3
    etas = torch.rand(777, dtype=torch.float64)
    log = MotionLog(m, wd)
    for e in etas.tolist():
        log.append(e)
    starts = torch.tensor([0, 1, 2, 3, 255, 256, 300, 511, 700, 776, 777])
    got = log.products(starts)
    for q, s in enumerate(starts.tolist()):
        ref = torch.eye(2, dtype=torch.float64)
        for t in range(s, 777):
            a = torch.tensor([[1 - etas[t] * wd, -etas[t] * m], [wd, m]], dtype=torch.float64)
            ref = a @ ref
        torch.testing.assert_close(got[q], ref, rtol=1e-12, atol=1e-15)
    rebuilt = MotionLog(m, wd)
    rebuilt.load_state_dict(log.state_dict())
    torch.testing.assert_close(rebuilt.products(starts), got, rtol=1e-12, atol=1e-15)
    rebuilt.append(0.5)
    log.append(0.5)
    torch.testing.assert_close(rebuilt.products(starts), log.products(starts), rtol=1e-12, atol=1e-15)


def test_motion_log_long_gap_is_finite_and_cheap():
    log = MotionLog(0.9, 1e-4)
    log.load_state_dict({"etas": torch.full((2_000_000,), 0.03, dtype=torch.float64)})
    p = log.products(torch.tensor([0, 1, 12345]))
    assert torch.isfinite(p).all()
    a = torch.tensor([[1 - 0.03 * 1e-4, -0.03 * 0.9], [1e-4, 0.9]], dtype=torch.float64)
    for q, gap in enumerate([2_000_000, 1_999_999, 2_000_000 - 12345]):
        torch.testing.assert_close(p[q], torch.linalg.matrix_power(a, gap), rtol=1e-9, atol=1e-300)
    assert len(log._levels) == 20          # log2(2e6) levels: memory ~ 2T matrices, not T^2


def test_init_rows_is_a_deterministic_normal():
    ids = torch.arange(5000)
    w = init_rows(ids, 64)
    assert abs(w.mean().item()) < 2e-4 and abs(w.std().item() - 0.01) < 2e-4
    torch.testing.assert_close(init_rows(ids[1234:1300], 64), w[1234:1300], rtol=0, atol=0)
    assert not torch.equal(init_rows(ids[:10], 64, seed=1), w[:10])
    # columns are not copies of each other
    assert w[:, 0].sub(w[:, 1]).abs().mean() > 0.005


# ----------------------------------------------------------------------------- correction engine
def _engine_run(correction: bool, steps: int = 2000):
    """Random subsets of rows get fixed random gradients; returns (dense W, dense u, sampled w, sampled u)."""
    n, d, m, wd = 64, 8, 0.9, 5e-3
    g = torch.Generator().manual_seed(1)
    w_dense = torch.nn.Parameter(init_rows(torch.arange(n), d))
    opt = torch.optim.SGD([w_dense], lr=0.1, momentum=m, weight_decay=wd)
    clf = SampledInstanceClassifier(n, d, 0.2, num_negative=8, momentum=m, weight_decay=wd,
                                    weight_correction=correction, dtype=torch.float64)
    prob = torch.full((n,), 0.1)
    prob[-4:] = 0.002     # rows with very long gaps
    prob[:3] = 0.0        # rows never touched
    for step in range(steps):
        lr = cosine_lr(step, steps, 0.5, warmup=200)
        touched = (torch.rand(n, generator=g) < prob).nonzero().squeeze(1)
        grad_rows = torch.randn(touched.shape[0], d, generator=g, dtype=torch.float64) * 0.01
        w_dense.grad = torch.zeros_like(w_dense)
        w_dense.grad[touched] = grad_rows
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        clf.sgd_step(touched, grad_rows, lr)
    _, w, u = clf.local_state()
    return w_dense.detach(), opt.state[w_dense]["momentum_buffer"], w, u


def test_weight_correction_matches_dense_momentum_sgd():
    w_ref, u_ref, w, u = _engine_run(correction=True)
    torch.testing.assert_close(w, w_ref, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(u, u_ref, rtol=1e-9, atol=1e-13)


def test_without_correction_rows_miss_their_motion():
    w_ref, _, w, _ = _engine_run(correction=False, steps=1000)
    rel = (w - w_ref).norm(dim=1) / w_ref.norm(dim=1)
    assert rel[:3].min() > 0.5      # never-touched rows: decay over 1000 steps missed entirely
    assert rel.median() > 1e-2


# ----------------------------------------------------------------------------- loss and gradients
def test_all_rows_in_play_equals_dense_head_with_torch_sgd():
    n, d, b, tau = 24, 16, 6, 0.2
    g = torch.Generator().manual_seed(2)
    dense = DenseInstanceClassifier(n, d, tau)
    dense.weight.data.copy_(init_rows(torch.arange(n), d))
    opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sampled = SampledInstanceClassifier(n, d, tau, num_negative=n)
    for step in range(8):
        lr = 0.05 * (step + 1)
        z, zs = unit(b, d, generator=g), [unit(b, d, generator=g) for _ in range(2)]
        index = torch.randint(0, n, (b,), generator=g)
        loss_dense = dense(z, index, zs)
        opt.zero_grad()
        loss_dense.backward()
        loss = sampled(z, index, zs)
        loss.backward()
        candidates, rows = sampled.in_play
        assert torch.equal(candidates, torch.arange(n))
        torch.testing.assert_close(loss, loss_dense, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rows.grad, dense.weight.grad, rtol=1e-5, atol=1e-8)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        sampled.on_train_step_end(step, lr)
        _, w, u = sampled.local_state()
        torch.testing.assert_close(w.float(), dense.weight.detach(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(u.float(), opt.state[dense.weight]["momentum_buffer"], rtol=1e-5, atol=1e-8)
    stats = sampled.stats()
    assert stats["num_candidates"].item() == n
    assert stats["w_norm_min"] <= stats["w_norm_mean"] <= stats["w_norm_max"]


def _reference_recent_run(k: int, correction: bool, storage: str = "memory", storage_dir=None, steps: int = 40):
    """Sampled head vs an independent dense reference whose softmax uses the recent ids only."""
    n, d, b, tau, wd = 50, 8, 4, 0.2, 1e-2
    g = torch.Generator().manual_seed(3)
    w_ref = torch.nn.Parameter(init_rows(torch.arange(n), d).float())
    opt = torch.optim.SGD([w_ref], lr=0.1, momentum=0.9, weight_decay=wd)
    sampled = SampledInstanceClassifier(n, d, tau, num_negative=k, weight_decay=wd, weight_correction=correction,
                                        storage=storage, storage_dir=storage_dir)
    recent = []
    losses = []
    for step in range(steps):
        lr = cosine_lr(step, steps, 0.8, warmup=5)
        index = torch.randint(0, n // 2 if step < steps // 2 else n, (b,), generator=g)
        z, zs = unit(b, d, generator=g), [unit(b, d, generator=g)]
        cands = sorted(set(index.tolist()) | set(recent[-k:]))
        pos = torch.tensor([cands.index(i) for i in index.tolist()])
        w = F.normalize(w_ref[torch.tensor(cands)], dim=1)
        ref_loss = (F.cross_entropy(z @ w.t() / tau, pos) + F.cross_entropy(zs[0] @ w.detach().t() / tau, pos)) / 2
        opt.zero_grad()
        ref_loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        recent.extend(sorted(set(index.tolist())))

        loss = sampled(z, index, zs)
        loss.backward()
        assert sampled.stats()["num_candidates"].item() == len(cands)
        sampled.on_train_step_end(step, lr)
        losses.append((loss.item(), ref_loss.item()))
    _, w, u = sampled.local_state()
    return w_ref.detach(), opt.state[w_ref]["momentum_buffer"], w.float(), u.float(), losses, sampled


def test_recent_negatives_with_correction_match_dense_reference():
    w_ref, u_ref, w, u, losses, _ = _reference_recent_run(k=12, correction=True)
    for loss, ref in losses:
        assert loss == pytest.approx(ref, rel=1e-5)
    # fp32 training: rounding differences of ~1e-7 relative to the largest entries
    torch.testing.assert_close(w, w_ref, rtol=1e-4, atol=1e-6 * w_ref.abs().max().item())
    torch.testing.assert_close(u, u_ref, rtol=1e-4, atol=1e-6 * u_ref.abs().max().item())


def test_recent_negatives_without_correction_differ():
    w_ref, _, w, _, _, _ = _reference_recent_run(k=12, correction=False)
    assert ((w - w_ref).norm(dim=1) / w_ref.norm(dim=1)).max() > 0.05


def test_disk_storage_gives_the_same_table(tmp_path):
    _, _, w_mem, u_mem, _, _ = _reference_recent_run(k=12, correction=True, steps=15)
    _, _, w_disk, u_disk, _, clf = _reference_recent_run(k=12, correction=True, storage="disk",
                                                         storage_dir=str(tmp_path), steps=15)
    assert torch.equal(w_mem, w_disk) and torch.equal(u_mem, u_disk)
    assert (tmp_path / "pic_rank0_table.bin").exists()
    assert clf.state_dict() == {} or all("weight" not in key for key in clf.state_dict())


# ----------------------------------------------------------------------------- checkpoints and errors
def _steps(clf, g, steps, n, d, start):
    for step in range(start, start + steps):
        index = torch.randint(0, n, (4,), generator=g)
        clf(unit(4, d, generator=g), index, []).backward()
        clf.on_train_step_end(step, 0.1 + 0.01 * step)


def test_checkpoint_round_trip_continues_identically():
    n, d = 30, 8
    a = SampledInstanceClassifier(n, d, 0.2, num_negative=6)
    _steps(a, torch.Generator().manual_seed(4), 10, n, d, 0)
    assert len(a.state_dict()) == 0          # the table never goes to rank 0's model state_dict
    shard = a.rank_state_dict()
    b = SampledInstanceClassifier(n, d, 0.2, num_negative=6)
    b.load_rank_state_dicts([shard])
    for clf in (a, b):
        _steps(clf, torch.Generator().manual_seed(5), 6, n, d, 10)
    _, wa, ua = a.local_state()
    _, wb, ub = b.local_state()
    assert torch.equal(wa, wb) and torch.equal(ua, ub)
    assert torch.equal(a.queue, b.queue)


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="pic-num-negative"):
        SampledInstanceClassifier(10, 4, 0.2, num_negative=0)
    with pytest.raises(ValueError, match="pic-storage"):
        SampledInstanceClassifier(10, 4, 0.2, num_negative=4, storage="gpu")
    with pytest.raises(ValueError, match="storage_dir"):
        SampledInstanceClassifier(10, 4, 0.2, num_negative=4, storage="disk")
    clf = SampledInstanceClassifier(10, 4, 0.2, num_negative=4)
    with pytest.raises(ValueError, match="out of range"):
        clf(unit(2, 4, generator=torch.Generator()), torch.tensor([1, 10]), [])
    other = SampledInstanceClassifier(12, 4, 0.2, num_negative=4)
    with pytest.raises(ValueError, match="12 x 4"):
        other.load_rank_state_dicts([clf.rank_state_dict()])


def test_grad_scale_unscales_the_rows_gradient():
    """Under an AMP GradScaler the loss is multiplied by the scale; passing the scale to
    on_train_step_end must give the table an unscaled gradient (same update as scale 1)."""
    tables = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        head = SampledInstanceClassifier(20, 8, 0.2, num_negative=8, momentum=0.9, weight_decay=1e-4)
        for step in range(3):
            z = F.normalize(torch.randn(4, 8), dim=1)
            index = torch.randint(0, 20, (4,))
            (head(z, index) * scale).backward()
            head.on_train_step_end(step, 0.5, grad_scale=scale)
        tables.append(head.local_state())
    for a, b in zip(tables[0], tables[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
