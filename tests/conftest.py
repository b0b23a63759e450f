"""Fixtures: an in-process cluster for protocol and logic, LocalClusters of real processes.

Every test is bounded: ``gen_cluster`` wraps its body in an asyncio timeout, pytest-timeout
is the backstop, and ``no_leftover_processes`` fails a test that leaves a child behind.
"""

import asyncio
import os
import signal
import time

import psutil
import pytest

from d3arrow import LocalCluster, Pool
from d3arrow.center import Center
from d3arrow.core import ConnectionPool
from d3arrow.eventloop import run
from d3arrow.worker import Worker


def gen_cluster(n_workers=2, ncores=1, timeout=30, **center_kwargs):
    """Run ``async def test(center, workers, pool)`` with real servers in one loop.

    The center and workers listen on 127.0.0.1 port 0; ``pool`` is a ConnectionPool for
    the test to talk to them. Everything is closed afterwards, also on failure.
    """
    def decorator(test):
        def wrapper():
            async def main():
                center = Center(**center_kwargs)
                await center.start("127.0.0.1", 0)
                workers = []
                pool = ConnectionPool()
                try:
                    for i in range(n_workers):
                        worker = Worker(center.address, ncores=ncores, name=f"w{i}")
                        workers.append(worker)
                        await worker.start("127.0.0.1", 0)
                    async with asyncio.timeout(timeout):
                        await test(center, workers, pool)
                finally:
                    pool.close()
                    for worker in workers:
                        await worker.close()
                    await center.close()
            run(main())
        wrapper.__name__ = test.__name__
        wrapper.__doc__ = test.__doc__
        wrapper.__module__ = test.__module__
        return wrapper
    return decorator


def freeze(pid):
    """SIGSTOP ``pid`` and wait until it is stopped: the signal is only posted when kill()
    returns, and a thread running on another CPU goes on for a moment (longer on a VM)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped():
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    assert wait_until(stopped, timeout=5), f"process {pid} did not stop"


def wait_until(predicate, timeout=10.0, interval=0.01):
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value.

    For what happens in another process or thread soon but not at once (a heartbeat
    timeout, a background report, a release after garbage collection).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Fail a test that leaves child processes running (and kill them)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in me.children(recursive=True)
                if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:
        p.kill()
    assert not left, f"processes left running: {[' '.join(p.cmdline()) for p in left]}"


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two 2-core worker processes shared by a module's tests."""
    with LocalCluster(n_workers=2, ncores=2) as cluster:
        yield cluster


@pytest.fixture
def pool(cluster):
    with Pool(cluster.center_address) as pool:
        yield pool
