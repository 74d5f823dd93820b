"""DataLoader worker processes (contrast/data/workers.py): errors keep their type and message, workers
ignore stop signals while their loader is open and end when it is shut down or the process exits."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import Dataset

from contrast.data import DatasetError
from contrast.data.workers import Loader, live_iterators, shutdown_workers, stop_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Failing(Dataset):
    """Item 3 raises ``error``; the others are their index."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 3:
            raise self.error
        return torch.tensor(i)


def _first_error(loader):
    with pytest.raises(BaseException) as info:
        for _ in loader:
            pass
    return info.value


@pytest.mark.parametrize("workers", [0, 1])
def test_a_worker_error_keeps_its_type_and_message(workers):
    message = "/data/train/a/x.png: cannot read or decode image (UnidentifiedImageError: cannot identify image file)"
    loader = Loader(Failing(DatasetError(message)), batch_size=2, num_workers=workers)
    error = _first_error(loader)
    assert type(error) is DatasetError and str(error) == message   # not torch's "Caught DatasetError ..." block
    if workers:
        notes = "\n".join(getattr(error, "__notes__", []))
        assert "raised in DataLoader worker process 0" in notes and "raise self.error" in notes
    loader.close()
    shutdown_workers()
    assert not live_iterators()


def test_a_type_that_cannot_be_rebuilt_from_its_message_becomes_a_runtime_error():
    loader = Loader(Failing(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")), batch_size=2,
                    num_workers=1)
    error = _first_error(loader)
    assert type(error) is RuntimeError
    assert str(error) == "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    shutdown_workers()


def _mark_ready(folder, worker_id):
    """A ``worker_init_fn``: runs after the Loader's own init, so the stop-signal handlers are set."""
    open(os.path.join(folder, str(worker_id)), "w").close()


def test_workers_ignore_stop_signals_while_open_and_end_on_shutdown(tmp_path):
    loader = Loader(Failing(ValueError("x")), batch_size=1, num_workers=2, persistent_workers=True,
                    worker_init_fn=functools.partial(_mark_ready, str(tmp_path)))
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    deadline = time.monotonic() + 30
    while len(os.listdir(tmp_path)) < len(workers):   # each worker's init has run (handlers inherited
        assert time.monotonic() < deadline           # from the parent do not count)
        time.sleep(0.05)
    for w in workers:   # a scheduler's SIGTERM to every process of the job: the workers keep serving
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert int(next(iterator)) == 1
    started = time.monotonic()
    stop_iterator(iterator)
    assert not any(w.is_alive() for w in workers) and time.monotonic() - started < 10
    assert iterator not in live_iterators()


SCRIPT = textwrap.dedent("""
    import sys
    from torch.utils.data import Dataset
    from contrast.data.workers import Loader

    class D(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if i == 3:
                raise ValueError("bad item 3")
            return i

    loader = Loader(D(), batch_size=2, num_workers=2, persistent_workers=True)

    def main():
        for _ in loader:
            pass

    try:
        main()
    except ValueError as e:   # the iterator stays referenced by the traceback; nothing shuts it down
        print(e, file=sys.stderr)
        sys.exit(1)
""")


def test_a_process_that_exits_on_a_worker_error_does_not_hang():
    """The hang of issue 23: workers that ignore SIGTERM, an error, sys.exit without shutting the
    iterator down. The exit handler ends the workers; the process exits at once."""
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1 and run.stderr.strip() == "bad item 3", run.stderr
    assert time.monotonic() - started < 30


def test_a_forked_child_ignores_the_parents_stop_handlers_until_it_installs_its_own():
    """Between fork and ``init_worker`` a stop signal must not run the main process's handler in a worker."""
    script = textwrap.dedent("""
        import os, signal, sys
        import contrast.data.workers
        signal.signal(signal.SIGTERM, lambda *a: print("parent handler ran in", os.getpid(), flush=True))
        intr_before = signal.getsignal(signal.SIGINT)   # Python's default (or inherited SIG_IGN): left alone
        pid = os.fork()
        if pid == 0:
            term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if term is signal.SIG_IGN and intr is intr_before else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "parent handler ran" not in r.stdout, (r.returncode, r.stdout, r.stderr)
