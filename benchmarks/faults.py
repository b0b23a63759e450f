"""How long d3arrow takes to get past a fault, and what a hostile peer can make it hold.

    python -m benchmarks.faults

Each figure is one run on a fresh cluster of real processes on 127.0.0.1 (the clusters use
a 0.2 s heartbeat and a 1.5 s heartbeat timeout, peers give up after 1.5 s of silence,
stalled connections are closed after 3 s, so that a run takes a minute; the defaults are
1 s, 10 s, 10 s and 30 s). docs/reliability.md quotes the output.
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import msgpack
import numpy as np
import psutil

from d3arrow import KilledWorkerError, LocalCluster, NotACenterError, Pool
from d3arrow.comm import STALL_ENV
from d3arrow.core import PEER_TIMEOUT_ENV
from d3arrow.protocol import MAX_HEADER_BYTES, PREFIX, SERIALIZED_EXT

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


def _kills_on_seven(i):
    if i == 7:
        os._exit(1)
    return i


def killer_call():
    with LocalCluster(n_workers=4, ncores=1, **FAST) as cluster, \
            Pool(cluster.center_address) as pool:
        start = time.perf_counter()
        try:
            pool.map(_kills_on_seven, range(40))
        except KilledWorkerError:
            pass
        seconds = time.perf_counter() - start
        time.sleep(0.5)
        alive = sum(p.poll() is None for p in cluster.worker_processes)
    return f"map of 40 calls, one calls os._exit, 4 workers: KilledWorkerError after " \
           f"{seconds:.2f} s, {alive} of 4 workers alive"


def frozen_worker():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.5,
                      heartbeat_timeout=60) as cluster, \
            Pool(cluster.center_address, timeout=2) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(np.ones, [50_000], workers=[a])
        cluster.worker_processes[0].send_signal(signal.SIGSTOP)
        try:
            start = time.perf_counter()
            assert pool.apply(len, [x], workers=[b]).get() == 50_000
            seconds = time.perf_counter() - start
        finally:
            cluster.worker_processes[0].send_signal(signal.SIGCONT)
    return f"apply on B whose input is on SIGSTOPped A (center still lists A): " \
           f"{seconds:.2f} s (input made again on B)"


def frozen_center():
    with LocalCluster(n_workers=2, ncores=1, **FAST) as cluster, \
            Pool(cluster.center_address) as pool:
        cluster.center_process.send_signal(signal.SIGSTOP)
        time.sleep(3)
        cluster.center_process.send_signal(signal.SIGCONT)
        time.sleep(1)
        registered = len(pool.client.sync_ncores())
    return f"center SIGSTOPped 3 s (twice its heartbeat timeout): {registered} of 2 workers " \
           f"still registered"


def silent_center():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    start = time.perf_counter()
    try:
        Pool(f"127.0.0.1:{listener.getsockname()[1]}", timeout=3)
    except NotACenterError:
        pass
    finally:
        listener.close()
    return f"Pool(silent socket, timeout=3): NotACenterError after " \
           f"{time.perf_counter() - start:.2f} s"


def vanished_client():
    with LocalCluster(n_workers=2, ncores=1, **FAST) as cluster, \
            Pool(cluster.center_address) as watcher:
        script = textwrap.dedent(f"""
            import os, signal
            from d3arrow import Pool
            pool = Pool({cluster.center_address!r}, auth_token={cluster.auth_token!r})
            results = pool.map(lambda i: bytes(100_000), range(20))
            print(" ".join(r.key for r in results), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """)
        keys = subprocess.run([sys.executable, "-c", script], capture_output=True,
                              text=True, timeout=60).stdout.split()
        start = time.perf_counter()
        while any(watcher.client.who_has(keys).values()):
            time.sleep(0.05)
    return f"client killed with 20 values on the workers: freed {time.perf_counter() - start:.2f}" \
           f" s after its death (heartbeat timeout 1.5 s)"


def stalled_frames():
    with LocalCluster(n_workers=1, ncores=1, auth_token=False) as cluster, \
            Pool(cluster.center_address) as pool:
        (worker,) = cluster.worker_addresses
        center = psutil.Process(cluster.center_process.pid)
        before = center.memory_info().rss
        reserved_before = pool.store_info()[worker]["reserved"]
        conns = [_connect(cluster.center_address, PREFIX.pack(MAX_HEADER_BYTES, 0))
                 for _ in range(16)]
        value = msgpack.ExtType(SERIALIZED_EXT, msgpack.packb([{"kind": "tensor"}, 0, 1]))
        head = msgpack.packb({"op": "update_data", "data": {"x": value}})
        conns += [_connect(worker, PREFIX.pack(len(head), 1) + struct.pack("<Q", 2**30) + head)
                  for _ in range(2)]
        time.sleep(1)
        growth = center.memory_info().rss - before
        held = pool.store_info()[worker]["reserved"] - reserved_before
        start = time.perf_counter()
        for conn in conns:
            conn.settimeout(30)
            conn.recv(1)  # the server hangs up on the stalled connection
        closed = time.perf_counter() - start + 1
        while pool.store_info()[worker]["reserved"] > reserved_before + 64 * 2**20:
            time.sleep(0.05)
        given_back = time.perf_counter() - start + 1
        for conn in conns:
            conn.close()
    return (f"16 connections announcing 64 MiB headers, stalled: center RSS +"
            f"{growth / 2**20:.1f} MiB; 2 announcing 1 GiB tensors: store reserved +"
            f"{held / 2**30:.2f} GiB, connections closed {closed:.1f} s after they stalled, "
            f"memory given back after {given_back:.1f} s")


def _connect(address, frame):
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(frame)
    return conn


def main():
    os.environ[PEER_TIMEOUT_ENV] = "1.5"
    os.environ[STALL_ENV] = "3"
    for measure in (killer_call, frozen_worker, frozen_center, silent_center, vanished_client,
                    stalled_frames):
        print(f"{measure.__name__}: {measure()}", flush=True)


if __name__ == "__main__":
    main()
