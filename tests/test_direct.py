"""Pool.apply from the caller's thread, straight to the worker and back (d3arrow.direct):
the same outcomes as through the client's loop, also when the worker dies, freezes, or
takes too long, and from many threads at once."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

from d3arrow import LocalCluster, Pool
from d3arrow.direct import DirectCallFailed, DirectLink
from d3arrow.errors import KilledWorkerError
from d3arrow.eventloop import StayAwake, current_cpu
from d3arrow.security import NO_SECURITY
from d3arrow.store import host_id

from conftest import freeze, gen_cluster, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def pid_after(seconds, mark=None):
    if mark is not None:  # tells the test where it runs
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def exits_on(code):
    if code:
        os._exit(code)
    return code


def test_applies_from_many_threads_at_once_spread_over_the_workers():
    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        pids = {}

        def caller(i):
            pids[i] = pool.apply(pid_after, [0.3]).get()

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(pids) == 4
        # each thread waited on its own call; they did not all queue on one worker
        assert set(pids.values()) == {p.pid for p in cluster.worker_processes}
        assert pool.apply(abs, [-2]).get() == 2  # and the links are reused after


def test_an_apply_that_kills_its_worker_counts_each_death_once():
    with LocalCluster(n_workers=3, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=2) as cluster, \
            Pool(cluster.center_address, allowed_failures=1) as pool:
        with pytest.raises(KilledWorkerError, match=r"exits_on.*killed 2 workers"):
            pool.apply(exits_on, [3])
        alive = lambda: sorted(p.poll() is None for p in cluster.worker_processes)  # noqa: E731
        assert wait_until(lambda: alive() == [False, False, True])
        time.sleep(0.5)
        assert alive() == [False, False, True]  # allowed_failures + 1 deaths, no more
        assert pool.apply(exits_on, [0]).get() == 0


def test_an_apply_past_its_timeout_raises_and_its_result_is_dropped():
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        (worker,) = cluster.worker_addresses
        with pytest.raises(TimeoutError, match="apply not done within 0.3 s"):
            pool.apply(pid_after, [1.5], timeout=0.3)
        time.sleep(1.5)  # the call finishes on the worker; nobody is there to take it
        assert wait_until(lambda: pool.client.has_what()[worker] == [])
        assert pool.apply(abs, [-1]).get() == 1


def test_an_apply_on_a_frozen_worker_moves_once_the_center_drops_it(tmp_path):
    mark = tmp_path / "running"
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster, Pool(cluster.center_address) as pool:
        result = {}

        def caller():
            result["pid"] = pool.apply(pid_after, [1.0, str(mark)]).get()

        thread = threading.Thread(target=caller)
        thread.start()
        assert wait_until(lambda: mark.exists() and mark.read_text())
        (frozen,) = [p for p in cluster.worker_processes if p.pid == int(mark.read_text())]
        freeze(frozen.pid)
        try:
            thread.join(timeout=30)
            assert not thread.is_alive()
            # given up once the center dropped it, and run again where it could finish
            assert result["pid"] in {p.pid for p in cluster.worker_processes} - {frozen.pid}
        finally:
            frozen.send_signal(signal.SIGCONT)


def test_waiting_awake_is_bounded_for_the_caller_and_the_worker():
    """Caller and worker poll for a moment instead of sleeping (SPIN_SECONDS), never for
    the length of a slow call, nor on after the answer."""
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        (worker,) = [p for p in psutil.Process().children(recursive=True)
                     if "d3arrow.cli.worker" in " ".join(p.cmdline())]
        pool.apply(pid_after, [0]).get()  # quick: the next call is polled for
        used = time.thread_time()
        assert pool.apply(pid_after, [0.5]).get() == worker.pid
        assert time.thread_time() - used < 0.1  # the caller slept through the slow call
        worker_cpu = sum(worker.cpu_times()[:2])
        time.sleep(1.0)  # nothing asked of the worker meanwhile
        assert sum(worker.cpu_times()[:2]) - worker_cpu < 0.1


def test_a_worker_does_not_poll_for_a_caller_on_its_own_core():
    """Polling on the core the caller waits on would keep the caller off it until the
    worker's time slice ends (a round trip of 0.7 ms instead of 0.08); on another core,
    or where the caller's core is unknown, the worker polls."""
    pinned = os.sched_getaffinity(0)
    core = min(pinned)
    os.sched_setaffinity(0, {core})  # this thread stays where current_cpu() says it is
    try:
        async def pokes():
            awake = StayAwake(seconds=0.05)
            awake.poke(current_cpu())  # the caller is on our core
            shared = awake.polling
            awake.poke(-1)  # unknown
            unknown = awake.polling
            other = StayAwake(seconds=0.05)
            other.poke(core + 1)  # another core
            return shared, unknown, other.polling

        assert asyncio.run(pokes()) == (False, True, True)
        assert current_cpu() == core
    finally:
        os.sched_setaffinity(0, pinned)


def test_a_caller_whose_core_another_process_takes_waits_asleep():
    """Polling, each sched_yield gives a busy process on our core its whole time slice
    (a round trip took 4 ms instead of 0.08): a poll that overran counts as one that saw
    nothing, and the next calls wait asleep, woken as soon as their answer comes."""
    pinned = os.sched_getaffinity(0)
    core = min(pinned)
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        (address,) = cluster.worker_addresses
        for _ in range(10):  # quick calls: the link polls for their answers
            pool.apply(pid_after, [0]).get()
        link = pool.client.direct.link(address)
        assert link._missed == 0
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(hog.pid, {core})
            os.sched_setaffinity(0, {core})
            pids = {pool.apply(pid_after, [0]).get() for _ in range(5)}
            assert pids == {cluster.worker_processes[0].pid}
            assert link._missed > 0
        finally:
            os.sched_setaffinity(0, pinned)
            hog.kill()
            hog.wait()


def test_a_caller_on_the_workers_host_talks_over_its_unix_socket():
    """Same host, no TLS: the link moves to the worker's Unix socket (cheaper messages),
    after the token's handshake there too; a worker killed meanwhile is noticed as over
    TCP, and the calls go to the other."""
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=2) as cluster, Pool(cluster.center_address) as pool:
        assert cluster.security.token is not None
        by_address = {w: pool.apply(pid_after, [0], workers=[w]).get()
                      for w in cluster.worker_addresses}
        assert set(by_address.values()) == {p.pid for p in cluster.worker_processes}
        links = pool.client.direct._local.links
        assert {links[w]._sock.family for w in by_address} == {socket.AF_UNIX}
        victim = cluster.worker_processes[0]
        victim.kill()
        victim.wait()
        survivor = {pid: w for w, pid in by_address.items()}[cluster.worker_processes[1].pid]
        assert {pool.apply(pid_after, [0]).get() for _ in range(4)} == {by_address[survivor]}


@gen_cluster(n_workers=1)
async def test_a_unix_socket_another_process_listens_on_is_not_used(center, workers, pool):
    """An abstract socket name is anyone's to take: a link checks that the process
    listening there is the worker that named it, or stays on TCP."""
    (worker,) = workers
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER], stdout=subprocess.PIPE,
                                text=True)
    try:
        name = squatter.stdout.readline().strip()
        worker.listener.local_name = name  # the worker names a socket it does not hold
        link = await asyncio.to_thread(DirectLink, worker.address, NO_SECURITY, 5.0,
                                       host_id())
        try:
            assert link._sock.family == socket.AF_INET
            reply = await asyncio.to_thread(link.request, {"op": "keys"})
            assert reply["keys"] == []  # and it works over TCP
        finally:
            link.close()
    finally:
        squatter.kill()
        squatter.wait()
        squatter.stdout.close()


SQUATTER = """
import socket, time, uuid
s = socket.socket(socket.AF_UNIX)
name = "d3arrow-squatter-" + uuid.uuid4().hex
s.bind("\\0" + name)
s.listen()
print(name, flush=True)
time.sleep(60)
"""


def test_a_link_to_a_frozen_worker_fails_in_time_and_the_apply_moves():
    """Opening a link asks the worker where its Unix socket is: a frozen worker (no token:
    no handshake to time out first) fails the link within its connect timeout, and the
    call runs on the other worker once the center drops the frozen one."""
    with LocalCluster(n_workers=2, ncores=1, auth_token=False, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster:
        frozen, alive = cluster.worker_processes  # (in the order of worker_addresses)
        freeze(frozen.pid)
        try:
            started = time.monotonic()
            with pytest.raises(DirectCallFailed) as failed:
                DirectLink(cluster.worker_addresses[0], NO_SECURITY, 1.0, host_id())
            assert not failed.value.sent
            assert time.monotonic() - started < 5
            with Pool(cluster.center_address, auth_token=False) as pool:
                assert {pool.apply(pid_after, [0]).get() for _ in range(3)} == {alive.pid}
        finally:
            frozen.send_signal(signal.SIGCONT)
