"""LocalCluster owns its processes: they stop with it, on error, and when its owner dies."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from d3arrow import LocalCluster, Pool


def test_processes_stop_when_the_block_exits_with_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with LocalCluster(n_workers=2, ncores=1) as cluster:
            processes = list(cluster.processes)
            assert len(processes) == 3 and all(p.poll() is None for p in processes)
            raise RuntimeError("boom")
    assert all(p.poll() is not None for p in processes)


def test_start_worker_adds_a_worker():
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        address = cluster.start_worker(ncores=2)
        pool.sync_center()
        assert pool.client.ncores[address] == 2 and len(pool.available_cores) == 2


def test_children_exit_when_the_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from d3arrow import LocalCluster
        cluster = LocalCluster(n_workers=2, ncores=1)
        print(" ".join(str(p.pid) for p in cluster.processes), flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE)
    try:
        pids = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(pids) == 3
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 15
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                  for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert alive == []
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait()
        owner.stdout.close()
