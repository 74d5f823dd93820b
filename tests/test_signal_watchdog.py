"""Stop signals reach a rank whose main thread is blocked in C code (issue 29, finding 9).

On NCCL a surviving rank waits inside a CUDA synchronisation for a collective whose peer died;
Python runs no signal handler there. The stand-in here is ``torch.futures.Future().wait()``, a
C++ wait that never returns: without the watchdog neither the second signal nor anything else
ends the process (the first test shows it), with it the second signal exits at once and an
unanswered first one exits after the grace period.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from contrast.engine import StopSignals
from contrast.watchdog import SignalWatchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = textwrap.dedent("""
    import sys, torch
    from contrast.engine import StopSignals
    signals = StopSignals().install()
    signals.arm("out/current.pth")
    signals.watchdog.grace_s = float(sys.argv[1]) if sys.argv[1] != "none" else None
    if sys.argv[2] == "off":
        signals.watchdog.stop()
    print("ready", flush=True)
    torch.futures.Future().wait()   # blocked in C++, as in a CUDA synchronisation
""")


_started = []


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    while _started:   # a failed assertion must not leave a blocked process behind
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def blocked_process(grace: str, watchdog: str = "on") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED, grace, watchdog], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    _started.append(proc)
    assert proc.stdout.readline().strip() == "ready"
    # "ready" comes just before the blocking wait: a signal sent before the child is in it would be handled on
    # its main thread (as in an unblocked rank), which a loaded machine made happen once
    time.sleep(1.0)
    return proc


def wait(proc: subprocess.Popen, seconds: float):
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.slow
def test_without_the_watchdog_a_blocked_rank_ignores_two_signals():
    proc = blocked_process("none", watchdog="off")
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
    assert wait(proc, 3) is None
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_second_signal_exits_a_blocked_rank_at_once():
    proc = blocked_process("none")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)    # within DUPLICATE_S: the same request forwarded by a launcher
    time.sleep(StopSignals.DUPLICATE_S)
    assert proc.poll() is None          # the first one waits for the main thread (it asks for a checkpoint)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert wait(proc, 10) == 128 + signal.SIGTERM and time.monotonic() - start < 5
    err = proc.stderr.read()
    assert err.count("\n") == 1 and "second SIGTERM: exiting at once without saving (last checkpoint: " \
        "out/current.pth)" in err


@pytest.mark.slow
def test_an_unanswered_first_signal_exits_after_the_grace_period():
    proc = blocked_process("1.0")
    proc.send_signal(signal.SIGUSR1)
    assert wait(proc, 10) == 128 + signal.SIGUSR1
    assert "SIGUSR1: the main thread did not respond within 1 s" in proc.stderr.read()


def test_a_handled_signal_is_not_cut_short():
    """When the main thread runs the handler (acknowledge), the grace timer does not fire."""
    exits = []
    dog = SignalWatchdog({signal.SIGTERM}, grace_s=0.2, exit=exits.append)
    dog._on_signal(signal.SIGTERM)
    dog.acknowledge()
    time.sleep(0.5)
    assert exits == [] and dog.received == 1
    dog._on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


FORKED = textwrap.dedent("""
    import os, signal, time, torch
    from torch.utils.data import Dataset
    from contrast.data.workers import Loader, stop_iterator
    from contrast.engine import StopSignals

    class D(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.tensor(i)

    signals = StopSignals().install()
    signals.arm("out/current.pth")
    loader = Loader(D(), batch_size=1, num_workers=2, persistent_workers=True)
    it = iter(loader)
    for _ in range(4):
        next(it)
    time.sleep(0.5)
    for w in it._workers:
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(1.0)
    print(signals.watchdog.received, signals.requested, flush=True)
    stop_iterator(it)
""")


@pytest.mark.slow
def test_a_signal_to_a_dataloader_worker_is_not_the_main_processs():
    """A forked DataLoader worker inherits the wakeup fd: without dropping it, a SIGTERM to the
    workers reached the parent's watchdog as the parent's own (a first signal its main thread never
    handled: exit 143 without saving after the grace period)."""
    out = subprocess.run([sys.executable, "-c", FORKED], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "None"]
