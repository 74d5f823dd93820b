"""The sharded kNN (training and query features kept per rank, candidates merged) against a slow
reference: exact ranking with ties broken by the lower global index, equal accuracy in 2 gloo
processes and in one, memory independent of N beyond the shard, and the CPU gather for rank 0."""
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from contrast import distributed as cd
from contrast.eval.knn import _decode, _encode, knn_evaluate, knn_neighbours, knn_scores
from tests.dist_utils import run_distributed


def reference_neighbours(train, labels, queries, k):
    """Plain loops: cosine similarity in float64, sorted by (similarity desc, index asc), first k."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    train_u = [unit(row) for row in train.tolist()]
    out = []
    for q in queries.tolist():
        qu = unit(q)
        sims = sorted(((-sum(a * b for a, b in zip(qu, t)), i) for i, t in enumerate(train_u)))[:k]
        out.append(([-s for s, _ in sims], [int(labels[i]) for _, i in sims], [i for _, i in sims]))
    return out


def reference_accuracy(train, labels, queries, query_labels, k, temperature, num_classes):
    hits1 = hits5 = 0
    for (sims, nbr, _), y in zip(reference_neighbours(train, labels, queries, k), query_labels.tolist()):
        scores = [0.0] * num_classes
        for s, c in zip(sims, nbr):
            scores[c] += math.exp((s - sims[0]) / temperature)
        order = sorted(range(num_classes), key=lambda c: -scores[c])
        hits1 += order[0] == y
        hits5 += y in order[:5]
    return 100.0 * hits1 / len(query_labels), 100.0 * hits5 / len(query_labels)


def tied_features(n, d, seed):
    """Rows with four entries +-1 (norm 2): every cosine is a multiple of 1/4, exact in fp32; many ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d)
    for row in x:
        cols = torch.randperm(d, generator=g)[:4]
        row[cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


def _normed(x):
    return torch.nn.functional.normalize(x, dim=1)


def _check_exact(got, ref):
    sim, lab, idx = got
    assert idx.tolist() == [r[2] for r in ref]
    assert lab.tolist() == [r[1] for r in ref]
    assert sim.double().tolist() == [r[0] for r in ref]


def test_keys_order_by_similarity_then_lower_index():
    g = torch.Generator().manual_seed(0)
    sim = torch.cat([torch.randn(1, 40, generator=g), torch.tensor([[0.5, 0.5, -0.0, 0.0, -0.5, -0.5, 1.0, -1.0]])], 1)
    keys = _encode(sim.clone(), torch.arange(100, 148))
    back, index = _decode(keys)
    assert torch.equal(back, sim.clone() + 0.0) and torch.equal(index[0], torch.arange(100, 148))
    order = keys[0].argsort(descending=True).tolist()
    expected = sorted(range(48), key=lambda i: (-float(sim[0, i]), i))
    assert order == expected


@pytest.mark.parametrize("k,chunk,bank_chunk", [(1, 1024, 8192), (5, 4, 3), (40, 7, 16), (200, 3, 5)])
def test_single_process_ranking_is_exact_with_ties(k, chunk, bank_chunk):
    train, queries = tied_features(37, 8, 1), tied_features(11, 8, 2)
    labels = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(3))
    got = knn_neighbours(_normed(train), labels, _normed(queries), k, chunk, bank_chunk)
    _check_exact(got, reference_neighbours(train, labels, queries, min(k, 37)))


def test_fp16_storage_accumulates_in_fp32():
    """An fp16 bank gives exactly the neighbours of the fp32 bank holding the same (rounded) values."""
    g = torch.Generator().manual_seed(4)
    bank16, queries = _normed(torch.randn(60, 16, generator=g)).half(), _normed(torch.randn(9, 16, generator=g))
    labels = torch.arange(60) % 3
    got = knn_neighbours(bank16, labels, queries, 7, 4, 8)
    ref = knn_neighbours(bank16.float(), labels, queries, 7, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_working_memory_is_independent_of_the_bank_size():
    """No tensor of the kNN grows with N: the largest is a (queries per round) x (bank block + k) block."""
    chunk, bank_chunk, k = 16, 64, 10
    for n in (1000, 4000):
        bank, labels, queries = _normed(torch.randn(n, 2)), torch.zeros(n, dtype=torch.long), torch.randn(50, 2)
        with _Sizes() as sizes:
            knn_neighbours(bank, labels, _normed(queries), k, chunk, bank_chunk)
        assert sizes.max_numel <= chunk * (bank_chunk + k), (n, sizes.max_numel)


# ------------------------------------------------------------------------- two gloo processes
def _shard(x):
    start, stop = cd.shard_range(x.shape[0])
    return x[start:stop]


CASES = {   # name: (train rows, queries, k, chunk_size, bank_chunk)
    "uneven": (37, 23, 5, 6, 4),
    "k_beyond_shard": (37, 9, 30, 1024, 8192),
    "one_training_row": (1, 5, 3, 4, 2),     # rank 1's bank is empty
    "one_query": (20, 1, 4, 2, 3),           # rank 1 has no query
}


def _run_cases(world):
    out = {}
    for name, (n, m, k, chunk, bank_chunk) in CASES.items():
        train, queries = tied_features(n, 8, 10 + n), tied_features(m, 8, 20 + m)
        labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
        sharded = world > 1
        sim, lab, idx = knn_neighbours(_normed(_shard(train)), _shard(labels), _normed(_shard(queries)), k,
                                       chunk, bank_chunk, sharded=sharded)
        out[name] = [cd.all_gather_variable(t) for t in (sim, lab, idx)]
    g = torch.Generator().manual_seed(7)
    train, queries = torch.randn(53, 6, generator=g), torch.randn(19, 6, generator=g)
    labels, query_labels = torch.randint(0, 7, (53,), generator=g), torch.randint(0, 7, (19,), generator=g)
    args = (_shard(train), _shard(labels), _shard(queries), _shard(query_labels), [1, 5, 20], 0.1, 7)
    out["accuracy"] = knn_evaluate(*args, chunk_size=4, bank_chunk=8, sharded=world > 1)
    scores = knn_scores(*args[:3], [1, 5, 20], 0.1, 7, chunk_size=4, sharded=world > 1, bank_chunk=8)
    out["scores"] = {k: cd.all_gather_variable(s) for k, s in scores.items()}
    out["gather"] = cd.gather_rows_to_cpu(torch.arange(3 * (cd.get_rank() + 1) - 3, dtype=torch.float32)[:, None]
                                          .repeat(1, 2) + cd.get_rank(), chunk_rows=2)
    return out


def _worker(rank, world, out_dir):
    torch.save(_run_cases(world), os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one_and_the_reference():
    one = _run_cases(1)
    two = run_distributed(_worker, world_size=2)
    for name, (n, m, k, _, _) in CASES.items():
        train, queries = tied_features(n, 8, 10 + n), tied_features(m, 8, 20 + m)
        labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
        ref = reference_neighbours(train, labels, queries, min(k, n))
        _check_exact(one[name], ref)
        for rank in range(2):
            _check_exact(two[rank][name], ref)
    g = torch.Generator().manual_seed(7)
    train, queries = torch.randn(53, 6, generator=g), torch.randn(19, 6, generator=g)
    labels, query_labels = torch.randint(0, 7, (53,), generator=g), torch.randint(0, 7, (19,), generator=g)
    for k in (1, 5, 20):
        top1, top5 = reference_accuracy(train, labels, queries, query_labels, k, 0.1, 7)
        assert one["accuracy"][k]["top1"] == pytest.approx(top1) and one["accuracy"][k]["top5"] == pytest.approx(top5)
        for rank in range(2):
            assert two[rank]["accuracy"][k] == one["accuracy"][k]
            torch.testing.assert_close(two[rank]["scores"][k], one["scores"][k], rtol=1e-6, atol=1e-7)
    # rank 0 holds no row, rank 1 three: [1, 1], [2, 2], [3, 3] on rank 0's CPU only
    assert two[0]["gather"].tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]] and two[1]["gather"] is None
