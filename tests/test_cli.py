"""The command-line servers as separate processes: output, crashes, hostile bytes, shutdown."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from d3arrow import Pool
from d3arrow.addressing import parse_address
from d3arrow.cluster import _read_address
from d3arrow.protocol import PREFIX


def start(role, *args):
    process = subprocess.Popen([sys.executable, "-m", f"d3arrow.cli.{role}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout_buffer = b""
    return process


@pytest.fixture
def processes():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


def start_center(processes, *args):
    center = start("center", "--port", "0", *args)
    processes.append(center)
    return center, _read_address(center, "Started center at ", time.monotonic() + 30)


def start_worker(processes, center_address, *args):
    worker = start("worker", center_address, "--port", "0", *args)
    processes.append(worker)
    deadline = time.monotonic() + 30
    address = _read_address(worker, "Start worker at ", deadline)
    assert _read_address(worker, "Register with center at ", deadline) == center_address
    return worker, address


def test_seed_shell_session(processes):
    center, center_address = start_center(processes)
    assert center_address.startswith("127.0.0.1:")
    workers = [start_worker(processes, center_address, "--ncores", "3") for _ in range(2)]
    with Pool(center_address) as pool:
        pool.sync_center()
        assert pool.available_cores == {parse_address(a): 3 for _, a in workers}
        A = pool.map(lambda x: x**2, range(10))
        B = pool.map(lambda x: -x, A)
        assert pool.apply(sum, [B]).get() == -285
        assert pool.gather(A) == [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=10) for p in processes] == [0, 0, 0]


def test_killed_worker_is_dropped_with_its_keys(processes):
    _, center_address = start_center(processes, "--heartbeat-interval", "0.1",
                                     "--heartbeat-timeout", "1")
    victim, victim_address = start_worker(processes, center_address)
    _, survivor_address = start_worker(processes, center_address)
    with Pool(center_address) as pool:
        (x,) = pool.scatter([123], workers=[victim_address])
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_until(lambda: victim_address not in pool.client.sync_ncores(), 5, interval=0.1)
        assert list(pool.client.sync_ncores()) == [survivor_address]
        assert pool.client.who_has([x.key]) == {x.key: []}
        assert pool.apply(lambda: "still working").get() == "still working"


def test_garbage_bytes_do_not_bring_servers_down(processes):
    _, center_address = start_center(processes)
    _, worker_address = start_worker(processes, center_address)
    for address in (center_address, worker_address):
        host, port = parse_address(address)
        for garbage in (os.urandom(4096), b"\xff" * 16,
                        PREFIX.pack(5, 0) + b"\xc1" * 5,  # framed, undecodable header
                        PREFIX.pack(3, 1) + b"\x00" * 8):  # truncated, then closed
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                while sock.recv(65536):  # an error reply or nothing; then the server closes
                    pass
    with Pool(center_address) as pool:
        assert list(pool.available_cores) == [parse_address(worker_address)]
        assert pool.apply(lambda: 42).get() == 42


def test_sigterm_unregisters_the_worker(processes):
    _, center_address = start_center(processes)
    worker, worker_address = start_worker(processes, center_address)
    _, other = start_worker(processes, center_address)
    with Pool(center_address) as pool:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
        assert list(pool.client.sync_ncores()) == [other]  # at once: no heartbeat timeout


def test_worker_without_a_center_says_so(processes):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    worker = start("worker", f"127.0.0.1:{port}", "--port", "0")
    processes.append(worker)
    assert worker.wait(timeout=30) == 1
    assert f"Cannot register with center at 127.0.0.1:{port}" in worker.stderr.read().decode()


def test_bad_center_address_is_a_usage_error(processes):
    worker = start("worker", "not-an-address")
    processes.append(worker)
    assert worker.wait(timeout=30) == 2
    assert "cannot parse address 'not-an-address'" in worker.stderr.read().decode()


def test_demo_runs_the_seed_example(processes):
    demo = subprocess.Popen([sys.executable, "-m", "d3arrow.cli.main", "demo", "--megabytes",
                             "8", "--repeat", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    processes.append(demo)
    out, err = demo.communicate(timeout=120)
    text = out.decode()
    assert demo.returncode == 0, err.decode()
    assert ">>> total.get()\n-285\n" in text
    assert ">>> pool.gather(A)\n[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n" in text
    assert "Peer-to-peer, same host, shared memory: median" in text
    assert "Peer-to-peer, over TCP (--no-shm):" in text and "GB/s" in text


def test_a_workers_full_collections_skip_what_starting_it_made(processes):
    """What starting a worker made lives as long as it does: a full collection, which
    holds up its loop and any call on it, does not walk it again (17-40 ms before)."""
    def walked_and_frozen():
        import gc
        return len(gc.get_objects(generation=2)), gc.get_freeze_count()

    _, center_address = start_center(processes)
    start_worker(processes, center_address)
    with Pool(center_address) as pool:
        walked, frozen = pool.apply(walked_and_frozen).get()
    assert frozen > 10 * walked
