"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Figures that are not times (throughput against the limit, peak memory) go in
``benchmark.extra_info``; ``python -m benchmarks.compare`` prints them side by side with
dask.distributed and Ray.
"""

import numpy as np
import pytest

from . import limits
from .measure import GiB, MiB, _concat, _inc, fetch, forget, make_on, peak_rss_growth
from d3arrow.serialize import Serialized, deserialize, serialize

SIZES = [MiB, 64 * MiB, 256 * MiB, GiB]


@pytest.fixture(scope="module")
def socket_limit():
    return limits.socket_throughput(256 * MiB, 3)


def _median(benchmark):
    """The median seconds of the rounds; nan under --benchmark-disable (one plain call)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else float("nan")


def transfer(benchmark, pair, nbytes, rounds):
    local, pool = pair
    source, target = local.worker_addresses
    remote = make_on(pool, source, nbytes)

    def setup():
        forget(pool, target, remote)  # the target must fetch it again
        return (pool, target, remote, source), {}

    benchmark.pedantic(fetch, setup=setup, rounds=rounds)
    pool.delete([remote])
    benchmark.extra_info.update(bytes=nbytes, workers=2,
                                gbps=nbytes / _median(benchmark) / 1e9)


@pytest.mark.parametrize("nbytes", SIZES, ids=lambda n: f"{n // MiB}MiB")
def test_transfer_tcp(benchmark, tcp, nbytes, socket_limit):
    transfer(benchmark, tcp, nbytes, rounds=3 if nbytes >= GiB else 5)
    benchmark.extra_info["socket_limit_gbps"] = socket_limit


@pytest.mark.parametrize("nbytes", SIZES, ids=lambda n: f"{n // MiB}MiB")
def test_transfer_colocated(benchmark, shm, nbytes):
    transfer(benchmark, shm, nbytes, rounds=10)


def test_scatter_256MiB(benchmark, tcp, socket_limit):
    local, pool = tcp
    array = np.random.default_rng(0).random(256 * MiB // 8)
    remotes = []

    def setup():  # free the previous round's copy, as a pipeline would
        pool.delete(remotes)
        remotes.clear()
        return (), {}

    benchmark.pedantic(lambda: remotes.extend(pool.scatter([array], workers=[
        local.worker_addresses[0]])), setup=setup, rounds=5)
    pool.delete(remotes)
    benchmark.extra_info.update(bytes=array.nbytes, socket_limit_gbps=socket_limit,
                                gbps=array.nbytes / _median(benchmark) / 1e9)


@pytest.mark.parametrize("mode", ["tcp", "shm"])
def test_gather_256MiB(benchmark, request, mode):
    local, pool = request.getfixturevalue(mode)
    remote = make_on(pool, local.worker_addresses[0], 256 * MiB)
    benchmark.pedantic(remote.get, rounds=5)
    benchmark.extra_info.update(bytes=256 * MiB,
                                gbps=256 * MiB / _median(benchmark) / 1e9)


def test_map_10000_tiny_tasks(benchmark, tcp):
    _, pool = tcp
    pool.map(_inc, range(1000))
    benchmark.pedantic(pool.map, args=(_inc, range(10_000)), rounds=3)
    benchmark.extra_info.update(tasks=10_000, workers=2,
                                tasks_per_second=10_000 / _median(benchmark))


def test_apply_round_trip(benchmark, tcp):
    _, pool = tcp
    benchmark.pedantic(pool.apply, args=(_inc, [1]), rounds=200, warmup_rounds=20)


def test_receiving_worker_peak_memory_256MiB(benchmark):
    from .measure import cluster

    with cluster(shm=False) as (local, pool):  # a fresh receiver
        source, target = local.worker_addresses
        ratios = []
        benchmark.pedantic(lambda: ratios.append(
            peak_rss_growth(local, pool, source, target, 256 * MiB)), rounds=1)
    benchmark.extra_info.update(bytes=256 * MiB, peak_rss_growth_over_payload=ratios[0])


@pytest.mark.parametrize("method", ["arrow_ipc", "pickle5_inband", "pickle5_out_of_band"])
def test_serialize_256MiB_round_trip(benchmark, method):
    import pickle

    array = np.random.default_rng(1).random(256 * MiB // 8)
    if method == "arrow_ipc":
        received = _concat(serialize(array).payloads[0])  # what a receiver's buffer holds

        def round_trip():
            serialize(array)  # Arrow IPC tensor metadata + a view of the array
            return deserialize(Serialized({"kind": "tensor"}, [received]))
    elif method == "pickle5_inband":
        def round_trip():
            return pickle.loads(pickle.dumps(array, protocol=5))
    else:
        def round_trip():
            buffers = []
            data = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
            return pickle.loads(data, buffers=buffers)
    benchmark.pedantic(round_trip, rounds=5)
    benchmark.extra_info.update(bytes=array.nbytes)
