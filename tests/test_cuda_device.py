"""Device choice and NCCL settings of contrast.distributed with a stand-in for torch.cuda (issue 29)."""
import os

import pytest
import torch
import torch.distributed as dist

from contrast import distributed as cd


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: n visible CUDA devices; returns the list of devices set current."""
    chosen = []

    def install(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
        return chosen
    return install


def test_one_gpu_per_task_uses_device_0_whatever_the_local_rank(gpus):
    chosen = gpus(1)                                  # srun --gpus-per-task=1: LOCAL_RANK 3 sees one GPU
    assert cd.resolve_device("auto", local_rank=3) == torch.device("cuda", 0)
    assert cd.resolve_device("cuda", local_rank=3) == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 0)] * 2


def test_all_gpus_visible_uses_the_local_rank(gpus):
    gpus(8)                                           # torchrun: every process sees the node's GPUs
    assert cd.resolve_device("auto", local_rank=5) == torch.device("cuda", 5)
    assert cd.resolve_device("cuda:2", local_rank=5) == torch.device("cuda", 2)
    with pytest.raises(RuntimeError, match="--device cuda:9: this process sees 8 GPU"):
        cd.resolve_device("cuda:9", local_rank=0)


def test_nccl_gets_asynchronous_error_handling(gpus, monkeypatch):
    gpus(1)
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cd, "is_dist", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")   # restored after the test
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    env = cd.init_distributed("auto")
    assert env.device == torch.device("cuda", 0) and env.backend == "nccl"
    assert calls[0]["backend"] == "nccl" and calls[0]["timeout"].total_seconds() == 30 * 60
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
