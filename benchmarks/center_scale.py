"""The center at scale: many simulated workers speaking the real protocol, then real ones,
against a d3arrow center and against Redis as the center (Debian's redis-server).

    python -m benchmarks.center_scale [--quick] [--backends center,redis] [--json PATH]

A real center process (``LocalCluster(n_workers=0)``) and a few driver processes, each
holding the connections of many simulated workers: they register (1 core each, an address
nobody listens on) and heartbeat at the center's interval with a worker's metrics, through
``d3arrow.core.ConnectionPool`` as real workers do. For 10, 100 and 1,000 of them:

- the center's CPU per heartbeat (its CPU time over a quiet window, over the heartbeats it
  answered in it) and its memory per worker;
- with 1,000 workers: ``add_keys`` of 1,000,000 keys (1,000 per worker) in batches of 1,000,
  then ``who_has`` and ``remove_keys`` in batches of 1,000, keys/s, while heartbeats keep
  arriving; the center's memory per key;
- ``Pool.sync_center()`` and the Pool's placement per call (choosing a worker for a call
  whose input one worker holds, and for calls nothing ties) at 10, 100 and 1,000 workers.

Then a real run: 48 worker processes (1 core each, a 64 MiB store each) run the seed's Pool
session and a 10,000-task map, every result checked. docs/benchmarks.md quotes the output.
"""

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import psutil

MiB = 2**20
FULL = {"workers": [10, 100, 1000], "keys_per_worker": 1000, "drivers": 4, "window": 5.0,
        "batches": 200, "real_workers": 48, "real_tasks": 10_000}
QUICK = {"workers": [10, 50], "keys_per_worker": 100, "drivers": 2, "window": 2.0,
         "batches": 20, "real_workers": 4, "real_tasks": 500}
BATCH = 1000
OWNERS = [f"{i:016x}" for i in range(1, 11)]  # ten clients' worth of keys
METRICS = {  # the shape of a worker's heartbeat (d3arrow.worker.Worker.metrics)
    "counters": {name: 12345 for name in (
        "tasks", "tasks_failed", "compute_seconds", "fetches", "values_sent_tcp",
        "bytes_sent_tcp", "values_sent_shm", "bytes_sent_shm", "values_received_tcp",
        "bytes_received_tcp", "values_received_shm", "bytes_received_shm")},
    "gauges": {name: 1 for name in (
        "keys", "calls_running", "memory_bytes", "memory_limit_bytes", "spilled_bytes",
        "paused", "store_used_bytes", "store_capacity_bytes", "loop_lag_seconds",
        "connections")}}


def fake_address(i):
    return f"127.0.0.1:{20000 + i}"  # registered, never listened on: the center never calls


def drive(center, token, addresses, ready, stop, beats_done):
    """A driver process: register ``addresses`` and heartbeat for each until ``stop``."""
    from d3arrow.core import ConnectionPool
    from d3arrow.eventloop import run
    from d3arrow.metadata import center_rpc
    from d3arrow.security import Security

    async def main():
        pool = ConnectionPool(security=Security.from_options(token),
                              max_idle_per_address=64)
        rpc = center_rpc(pool, center, timeout=30)  # a center's ops, or Redis
        interval = (await rpc.register(address=addresses[0], ncores=1))["heartbeat_interval"]
        for start in range(1, len(addresses), 50):
            await asyncio.gather(*(rpc.register(address=a, ncores=1)
                                   for a in addresses[start:start + 50]))
        ready.set()

        async def beat(address):
            await asyncio.sleep(random.uniform(0, interval))
            while not stop.is_set():
                reply = await rpc.heartbeat(address=address, metrics=METRICS)
                with beats_done.get_lock():
                    beats_done.value += 1
                if reply.get("status") == "unknown-worker":
                    await rpc.register(address=address, ncores=1)
                await asyncio.sleep(reply.get("heartbeat_interval", interval))

        beats = [asyncio.ensure_future(beat(a)) for a in addresses]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for b in beats:
            b.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        pool.close()

    run(main())


class SimulatedWorkers:
    """``n`` simulated workers spread over ``drivers`` processes, registered and beating."""

    def __init__(self, center, token, n, drivers, first=0):
        context = multiprocessing.get_context("spawn")
        self.addresses = [fake_address(first + i) for i in range(n)]
        self.stop = context.Event()
        self.beats = context.Value("q", 0)
        self.processes = []
        readies = []
        for d in range(min(drivers, n)):
            ready = context.Event()
            process = context.Process(target=drive, daemon=True, args=(
                center, token, self.addresses[d::drivers], ready, self.stop, self.beats))
            process.start()
            self.processes.append(process)
            readies.append(ready)
        for ready in readies:
            if not ready.wait(120):
                self.close()
                raise TimeoutError("simulated workers did not register within 120 s")

    def close(self):
        self.stop.set()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def center_cpu_and_rss(pid):
    """(CPU seconds of every thread, in nanoseconds' resolution; resident bytes)."""
    ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            ns += int(f.read().split()[0])
    return ns / 1e9, psutil.Process(pid).memory_info().rss


def measure_heartbeats(fleet, pid, window):
    """(center CPU seconds per heartbeat, heartbeats per second, center CPU share)."""
    before = fleet.beats.value
    cpu0, _ = center_cpu_and_rss(pid)
    start = time.perf_counter()
    time.sleep(window)
    cpu1, _ = center_cpu_and_rss(pid)
    elapsed = time.perf_counter() - start
    beats = fleet.beats.value - before
    cpu = cpu1 - cpu0
    return cpu / max(beats, 1), beats / elapsed, cpu / elapsed


def key_of(worker_index, j, per_worker):
    return f"{OWNERS[worker_index % len(OWNERS)]}-{worker_index * per_worker + j}"


def keys_of(worker_index, per_worker):
    return [key_of(worker_index, j, per_worker) for j in range(per_worker)]


def key_figures(client, addresses, per_worker, batches, pid):
    """add_keys / who_has / remove_keys keys per second and memory per key."""
    _, rss_before = center_cpu_and_rss(pid)
    rpc = lambda: client._rpc(client.center)  # noqa: E731 (made on the client's loop)

    adding = [(address, batch, {key: 8_000_000 for key in batch})
              for i, address in enumerate(addresses)
              for keys in [keys_of(i, per_worker)]
              for batch in (keys[k:k + BATCH] for k in range(0, len(keys), BATCH))]

    async def add_all():
        start = time.perf_counter()
        for address, batch, nbytes in adding:
            await rpc().add_keys(address=address, keys=batch, nbytes=nbytes)
        return time.perf_counter() - start

    add_seconds = client.sync(add_all)
    adding.clear()  # the memory per key is the center's, not ours
    total = len(addresses) * per_worker
    time.sleep(1.0)  # let the allocator settle before reading the RSS
    _, rss_after = center_cpu_and_rss(pid)
    rng = random.Random(0)

    asked = [[key_of(rng.randrange(len(addresses)), rng.randrange(per_worker), per_worker)
              for _ in range(BATCH)] for _ in range(batches)]

    async def ask():
        start = time.perf_counter()
        for wanted in asked:
            reply = await rpc().who_has(keys=wanted)
            assert all(reply["who_has"][k] for k in wanted)
        return time.perf_counter() - start

    who_has_seconds = client.sync(ask)

    removing = [(addresses[i % len(addresses)], keys_of(i % len(addresses), per_worker)[:BATCH])
                for i in range(batches)]

    async def remove_some():
        start = time.perf_counter()
        for address, keys in removing:
            await rpc().remove_keys(address=address, keys=keys)
        return time.perf_counter() - start

    removed = batches * min(BATCH, per_worker)
    remove_seconds = client.sync(remove_some)
    return {"keys": total, "add_keys_per_s": total / add_seconds,
            "who_has_keys_per_s": batches * BATCH / who_has_seconds,
            "remove_keys_per_s": removed / remove_seconds,
            "center_bytes_per_key": (rss_after - rss_before) / total}


def placement_figures(pool, n_calls=10_000):
    """Microseconds per call of the Pool's placement: one input held by one worker, and
    calls nothing ties (cut in runs per worker)."""
    from d3arrow.calls import Call
    from d3arrow.references import RemoteData
    from d3arrow.scheduling import split_in_runs

    client = pool.client
    workers = list(client.ncores)
    queues = {a: collections.deque() for a in workers}
    rng = random.Random(1)
    inputs = []
    for i in range(n_calls):
        key = client.keys.new()
        client.placement.placed(key, workers[rng.randrange(len(workers))], 1000)
        inputs.append(RemoteData(key, client))
    calls = [Call.of(client.keys.new(), (ref,)) for ref in inputs]
    start = time.perf_counter()
    for call in calls:
        queues[pool._place(call, queues)].append(call)
    tied = (time.perf_counter() - start) / n_calls
    start = time.perf_counter()
    split_in_runs(list(range(n_calls)), workers, client.ncores, {})
    loose = (time.perf_counter() - start) / n_calls
    client.placement.drop_all([r.key for r in inputs])
    return {"place_tied_us": tied * 1e6, "place_loose_us": loose * 1e6}


@contextlib.contextmanager
def metadata_server(backend):
    """``(LocalCluster keywords, pid of the process holding the metadata)``."""
    from d3arrow import LocalCluster

    if backend == "center":
        with LocalCluster(n_workers=0, dashboard=False) as local:
            yield local, local.center_process.pid
        return
    server = start_redis()
    try:
        with LocalCluster(n_workers=0, metadata=server.url) as local:
            yield local, server.process.pid
    finally:
        server.stop()


class start_redis:
    """Debian's redis-server on a free port of 127.0.0.1, no persistence."""

    def __init__(self):
        import socket

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def simulated(config, backend):
    from d3arrow import Pool

    out = {}
    for n in config["workers"]:
        print(f"{n} simulated workers, {backend} ...", file=sys.stderr, flush=True)
        with metadata_server(backend) as (local, pid):
            _, rss_empty = center_cpu_and_rss(pid)
            fleet = SimulatedWorkers(local.center_address, local.auth_token, n,
                                     config["drivers"])
            try:
                with Pool(local.center_address) as pool:
                    figures = {}
                    time.sleep(2.0)  # every worker has started beating
                    figures["heartbeat_cpu_us"], figures["heartbeats_per_s"], figures[
                        "center_cpu_share"] = measure_heartbeats(fleet, pid, config["window"])
                    figures["heartbeat_cpu_us"] *= 1e6
                    _, rss = center_cpu_and_rss(pid)
                    figures["center_bytes_per_worker"] = (rss - rss_empty) / n
                    syncs = []
                    for _ in range(20):
                        start = time.perf_counter()
                        pool.sync_center()
                        syncs.append(time.perf_counter() - start)
                    assert len(pool.available_cores) == n
                    figures["sync_center_ms"] = statistics.median(syncs) * 1e3
                    figures.update(placement_figures(pool))
                    if n == max(config["workers"]):
                        figures.update(key_figures(pool.client, fleet.addresses,
                                                   config["keys_per_worker"],
                                                   config["batches"], pid))
                        figures["heartbeat_cpu_us_with_keys"], _, figures[
                            "center_cpu_share_with_keys"] = measure_heartbeats(
                            fleet, pid, config["window"])
                        figures["heartbeat_cpu_us_with_keys"] *= 1e6
            finally:
                fleet.close()
        out[n] = figures
    return out


def real_run(config, backend):
    """The seed's session and a big map on real worker processes on this machine."""
    from d3arrow import LocalCluster, Pool

    n = config["real_workers"]
    print(f"{n} real workers, {backend} ...", file=sys.stderr, flush=True)
    server = start_redis() if backend == "redis" else None
    start = time.perf_counter()
    with LocalCluster(n_workers=n, ncores=1, shm_size=64 * MiB, dashboard=False,
                      metadata=server and server.url) as local:
        started = time.perf_counter() - start
        with Pool(local.center_address) as pool:
            pool.sync_center()
            assert len(pool.available_cores) == n
            session_start = time.perf_counter()
            a = pool.map(lambda x: x**2, range(10))
            b = pool.map(lambda x: -x, a)
            total = pool.apply(sum, [b])
            assert total.get() == -285 and pool.gather(a) == [x**2 for x in range(10)]
            session = time.perf_counter() - session_start
            tasks = config["real_tasks"]
            map_start = time.perf_counter()
            results = pool.map(lambda x: x * 3 + 1, range(tasks))
            mapped = time.perf_counter() - map_start
            values = pool.gather(results)
            assert values == [x * 3 + 1 for x in range(tasks)]
            used = {holder for r in results for holder in pool.client.where(r.key)}
    if server is not None:
        server.stop()
    return {"workers": n, "start_s": started, "seed_session_s": session, "map_s": mapped,
            "map_tasks_per_s": tasks / mapped, "workers_used": len(used)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    parser.add_argument("--backends", default="center,redis",
                        help="where the metadata lives: center, redis (default both)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    results = {"config": config}
    for backend in args.backends.split(","):
        results[backend] = {"simulated": simulated(config, backend),
                            "real": real_run(config, backend)}
        print(f"\n== metadata in: {backend} ==")
        print_figures(results[backend], config)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def print_figures(results, config):
    sim = results["simulated"]
    print("simulated workers | heartbeats/s | center CPU | CPU per heartbeat | bytes per "
          "worker | sync_center | placement, input held | placement, loose")
    for n, f in sim.items():
        print(f"{n:>17} | {f['heartbeats_per_s']:>12.0f} | {f['center_cpu_share']:>9.1%} | "
              f"{f['heartbeat_cpu_us']:>14.0f} us | {f['center_bytes_per_worker']:>16,.0f} | "
              f"{f['sync_center_ms']:>8.2f} ms | {f['place_tied_us']:>18.2f} us | "
              f"{f['place_loose_us']:>13.2f} us")
    big = sim[max(sim)]
    print(f"\nwith {max(sim)} workers and {big['keys']:,} keys (batches of {BATCH}, heartbeats "
          f"arriving): add_keys {big['add_keys_per_s']:,.0f} keys/s, who_has "
          f"{big['who_has_keys_per_s']:,.0f} keys/s, remove_keys "
          f"{big['remove_keys_per_s']:,.0f} keys/s; center memory "
          f"{big['center_bytes_per_key']:.0f} bytes per key; CPU per heartbeat with the keys "
          f"{big['heartbeat_cpu_us_with_keys']:.0f} us "
          f"({big['center_cpu_share_with_keys']:.1%} of a core)")
    real = results["real"]
    print(f"\n{real['workers']} real workers: started in {real['start_s']:.1f} s; the seed's "
          f"session {real['seed_session_s'] * 1e3:.0f} ms; map of {config['real_tasks']:,} "
          f"tasks {real['map_s']:.2f} s ({real['map_tasks_per_s']:,.0f} tasks/s) on "
          f"{real['workers_used']} workers, every result checked")


if __name__ == "__main__":
    sys.exit(main())
