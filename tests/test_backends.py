"""The same Pool suite against both places the metadata can live: a d3arrow center, and a
real Redis server (Debian's redis-server, started here on a free port) with no center."""

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pytest

from conftest import wait_until
from d3arrow import LocalCluster, Pool
from d3arrow.errors import CommClosedError

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1, no persistence; stopped by :meth:`stop`."""

    def __init__(self, port=None, password=None):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server; "
                        ".ci/run does it)")
        self.port = port or _free_port()
        self.password = password
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no"] + (["--requirepass", password] if password else [])
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # until it answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def url(self, db=0, password=None):
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def flush(self):
        import redis
        with redis.Redis.from_url(self.url()) as server:
            server.flushall()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["center", "redis"])
def metadata(request, redis_server):
    """LocalCluster keywords for each backend (an empty Redis database for each test)."""
    if request.param == "center":
        return {}
    redis_server.flush()
    return {"metadata": redis_server.url()}


def _big(seed):
    return np.random.default_rng(seed).random(50_000)


def test_the_seeds_session(metadata):
    with LocalCluster(n_workers=2, ncores=1, **metadata) as cluster, \
            Pool(cluster.center_address) as pool:
        pool.sync_center()
        assert sorted(pool.available_cores.values()) == [1, 1]
        a = pool.map(lambda x: x**2, range(10))
        b = pool.map(lambda x: -x, a)
        total = pool.apply(sum, [b])
        assert total.get() == -285
        assert pool.gather(a) == [x**2 for x in range(10)]


def test_calls_run_where_their_inputs_live(metadata):
    with LocalCluster(n_workers=2, ncores=1, **metadata) as cluster, \
            Pool(cluster.center_address) as pool:
        arrays = pool.map(_big, range(6))
        holders = [pool.client.where(r.key) for r in arrays]
        assert set().union(*holders) == set(cluster.worker_addresses)  # spread over both
        sums = pool.map(lambda v: float(v.sum()), arrays)
        assert [pool.client.where(s.key) for s in sums] == holders
        who_has = pool.client.who_has([r.key for r in arrays])  # the metadata agrees
        assert [set(who_has[r.key]) for r in arrays] == holders
        assert pool.gather(sums) == pytest.approx([_big(i).sum() for i in range(6)])


def test_a_dropped_value_goes_from_the_peers_that_copied_it_too(metadata):
    with LocalCluster(n_workers=2, ncores=1, **metadata) as cluster, \
            Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(_big, [2], workers=[a])
        assert pool.apply(len, [x], workers=[b]).get() == 50_000  # b fetched a copy
        key = x.key
        assert wait_until(lambda: set(pool.client.who_has([key])[key]) == {a, b})
        del x
        gc.collect()
        assert wait_until(lambda: not pool.client.who_has([key])[key])
        for address in (a, b):  # gone from the workers, not only from the metadata
            assert key not in pool.client.sync(pool.client._rpc(address).keys)["keys"]


def test_freeing_asks_the_metadata_only_of_copies_it_knows(metadata):
    """A client freeing the results it placed asks which of them lie elsewhere too: the
    copies peers made come back, not the results the workers have not told of yet
    (they do so in batches): a client freeing a stream of them gets a short answer."""
    with LocalCluster(n_workers=2, ncores=1, **metadata) as cluster, \
            Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(_big, [1], workers=[a])
        assert pool.apply(len, [x], workers=[b]).get() == 50_000  # b fetched a copy
        assert wait_until(lambda: set(pool.client.who_has([x.key])[x.key]) == {a, b})
        fresh = pool.apply(_big, [2], workers=[a])  # not told yet
        async def ask():
            return await pool.client._rpc(pool.client.center).who_has(
                keys=[], believed={a: [x.key, fresh.key]})

        reply = pool.client.sync(ask)
        assert reply["who_has"] == {x.key: [a, b]} or reply["who_has"] == {x.key: [b, a]}


def test_a_result_lost_with_its_worker_is_made_again(metadata):
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2, heartbeat_timeout=1.5,
                      **metadata) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        x = pool.apply(_big, [1], workers=[a])
        y = pool.apply(lambda v: v * 2, [x], workers=[a])
        victim = cluster.worker_processes[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        np.testing.assert_array_equal(y.get(timeout=60), _big(1) * 2)
        assert pool.client.where(y.key) == {b}
        assert wait_until(lambda: list(pool.client.sync_ncores()) == [b], timeout=20)


def test_many_clients_share_the_cluster_and_a_closed_ones_values_go(metadata):
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2, heartbeat_timeout=1.5,
                      **metadata) as cluster:
        pools = [Pool(cluster.center_address) for _ in range(3)]
        try:
            results = [p.map(lambda x, k=k: x * k, range(20)) for k, p in enumerate(pools)]
            for k, (p, r) in enumerate(zip(pools, results)):
                assert p.gather(r) == [x * k for x in range(20)]
            pools[0].publish("shared", results[0][3])
            assert pools[1].published("shared").get() == 0
            gone = pools[2]
            keys = [r.key for r in results[2]]
            gone.client.close(free=False)  # went without freeing: the metadata frees them
            assert wait_until(lambda: not any(pools[0].client.who_has(keys).values()),
                              timeout=30)
            pools[0].close()  # the published value outlives its client
            assert pools[1].published("shared").get() == 0
        finally:
            for p in pools:
                p.close()


def test_the_cluster_is_seen_through_either(metadata):
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2, **metadata) as cluster, \
            Pool(cluster.center_address) as pool:
        pool.gather(pool.map(abs, range(-50, 0)))
        assert wait_until(lambda: pool.status()["totals"]["tasks"] >= 50, timeout=20)
        status = pool.status()
        assert sorted(w["address"] for w in status["workers"]) == sorted(
            cluster.worker_addresses)
        shown = subprocess.run([sys.executable, "-m", "d3arrow.cli.main", "status",
                                cluster.center_address], capture_output=True, text=True,
                               timeout=60, env=dict(os.environ,
                                                    D3ARROW_AUTH_TOKEN=cluster.auth_token))
        assert shown.returncode == 0, shown.stderr
        assert all(a in shown.stdout for a in cluster.worker_addresses)


# -- Redis only ------------------------------------------------------------------------------

def test_redis_down_is_a_clear_error():
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nobody listens there
    with pytest.raises(CommClosedError, match="cannot reach Redis at redis://127.0.0.1"):
        Pool(url)


def test_redis_password_is_checked(tmp_path):
    server = RedisServer(password="s3cret")
    try:
        with pytest.raises(CommClosedError, match="refused") as refused:
            Pool(server.url(password="wrong"))
        assert "wrong" not in str(refused.value)  # no password in messages
        with LocalCluster(n_workers=1, ncores=1, metadata=server.url()) as cluster, \
                Pool(cluster.center_address) as pool:
            assert pool.apply(abs, [-3]).get() == 3
            assert "s3cret" not in repr(pool.client) and "***@" in repr(pool.client)
    finally:
        server.stop()


def test_the_cluster_carries_on_once_redis_returns():
    server = RedisServer()
    try:
        with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2, heartbeat_timeout=3,
                          metadata=server.url()) as cluster, \
                Pool(cluster.center_address) as pool:
            before = pool.map(_big, range(4))
            server.stop()  # everything it knew is gone with it
            with pytest.raises(CommClosedError, match="cannot reach Redis"):
                pool.client.who_has([before[0].key])
            server = RedisServer(port=server.port)
            # the workers tell the new server of themselves and their values
            assert wait_until(lambda: len(pool.client.sync_ncores()) == 2, timeout=30)
            assert wait_until(
                lambda: all(pool.client.who_has([r.key for r in before]).values()), timeout=30)
            sums = pool.map(lambda v: float(v.sum()), before)
            assert pool.gather(sums) == pytest.approx([_big(i).sum() for i in range(4)])
    finally:
        server.stop()


def test_a_worker_joins_a_redis_cluster_from_the_command_line(redis_server):
    redis_server.flush()
    url = redis_server.url()
    env = dict(os.environ, D3ARROW_AUTH_TOKEN="tok3n")
    worker = subprocess.Popen([sys.executable, "-m", "d3arrow.cli.worker", url, "--port", "0",
                               "--ncores", "1"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "Start worker at" in worker.stdout.readline()
        with Pool(url, auth_token="tok3n") as pool:
            assert wait_until(lambda: len(pool.client.sync_ncores()) == 1, timeout=20)
            assert pool.apply(lambda: 41 + 1).get() == 42
    finally:
        worker.terminate()
        worker.wait(timeout=10)
        worker.stdout.close()


def test_a_value_told_after_its_client_closed_is_freed_too(metadata):
    """Workers tell the metadata of results in batches, a few ms late: one frozen in
    between tells of its result only once it runs again, after its client closed (which
    waited for it only briefly). That value is freed as the client's others were."""
    with LocalCluster(n_workers=1, ncores=1, heartbeat_interval=1, **metadata) as cluster, \
            Pool(cluster.center_address) as watcher:
        (worker,) = cluster.worker_addresses
        frozen = cluster.worker_processes[0]
        pool = Pool(cluster.center_address)
        try:
            told = pool.apply(_big, [1])
            assert wait_until(lambda: watcher.client.who_has([told.key])[told.key] == [worker])
            late = pool.apply(_big, [2])
            frozen.send_signal(signal.SIGSTOP)  # (most likely) before it tells of ``late``
            keys = [told.key, late.key]
            pool.close()
        finally:
            frozen.send_signal(signal.SIGCONT)
            pool.close()

        def held():
            return watcher.client.sync(watcher.client._rpc(worker).keys)["keys"]

        assert wait_until(lambda: not set(keys) & set(held())
                          and not any(watcher.client.who_has(keys).values()), timeout=40), (
            held(), watcher.client.who_has(keys))
