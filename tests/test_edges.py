"""Promises kept at the edges: user code that ends its process, frozen peers and centers,
errors a worker reports, vanished clients, names two clients share.

Each test runs its own cluster of real processes, since it breaks it.
"""

import collections
import gc
import http.server
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import msgpack
import numpy as np
import psutil
import pytest

from conftest import freeze, wait_until
from d3arrow import (KilledWorkerError, LocalCluster, MissingDataError, NotACenterError, Pool,
                     ProtocolError, RemoteError, __version__)
from d3arrow.comm import STALL_ENV
from d3arrow.core import PEER_TIMEOUT_ENV, ConnectionPool
from d3arrow.eventloop import run
from d3arrow.protocol import MAX_HEADER_BYTES, PREFIX, SERIALIZED_EXT
from d3arrow.security import Security
from d3arrow.store import SharedStore

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def _big(seed):
    """An array large enough to stay on its worker (not inlined into replies)."""
    return np.random.default_rng(seed).random(50_000)


def _alive(cluster):
    return [p.poll() is None for p in cluster.worker_processes]


# -- user code that ends its process ----------------------------------------------------------

def test_sys_exit_and_keyboard_interrupt_in_user_code_are_errors_of_that_call():
    def exits_on_seven(i):
        if i == 7:
            sys.exit(2)
        return i

    def interrupted():
        raise KeyboardInterrupt("from user code")

    with LocalCluster(n_workers=4, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        with pytest.raises(SystemExit) as info:
            pool.map(exits_on_seven, range(40))
        assert info.value.code == 2
        assert "exits_on_seven" in str(info.value.__cause__)  # the remote traceback
        with pytest.raises(KeyboardInterrupt, match="from user code"):
            pool.apply(interrupted)
        assert _alive(cluster) == [True] * 4
        assert len(pool.client.sync_ncores()) == 4
        assert pool.gather(pool.map(abs, range(-8, 0))) == list(range(8, 0, -1))


def test_a_call_that_kills_its_worker_is_given_up_after_allowed_failures():
    def kills_on_seven(i):
        if i == 7:
            os._exit(1)
        return i * 10

    with LocalCluster(n_workers=4, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=2) as cluster, Pool(cluster.center_address) as pool:
        with pytest.raises(KilledWorkerError, match=r"kills_on_seven.*killed 3 workers"):
            pool.map(kills_on_seven, range(40))
        assert wait_until(lambda: sorted(_alive(cluster)) == [False, False, False, True])
        time.sleep(0.5)
        assert sorted(_alive(cluster)) == [False, False, False, True]  # N+1 = 3, no more
        survivor = cluster.worker_addresses[_alive(cluster).index(True)]
        assert pool.apply(abs, [-5]).get() == 5
        assert wait_until(lambda: list(pool.client.sync_ncores()) == [survivor])
        assert pool.gather(pool.map(kills_on_seven, range(7))) == [i * 10 for i in range(7)]


def test_a_lineage_recomputation_that_kills_its_worker_is_given_up(tmp_path):
    flag = str(tmp_path / "kill")

    def made_then_kills(seed):
        if os.path.exists(flag):
            os._exit(1)
        return _big(seed)

    with LocalCluster(n_workers=3, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=2) as cluster, \
            Pool(cluster.center_address, allowed_failures=1) as pool:
        x = pool.apply(made_then_kills, [1], workers=[cluster.worker_addresses[0]])
        cluster.worker_processes[0].kill()
        cluster.worker_processes[0].wait(timeout=10)
        open(flag, "w").close()
        with pytest.raises(KilledWorkerError, match="killed 2 workers"):
            x.get(timeout=60)  # remade from lineage: each try kills a worker
        assert wait_until(lambda: _alive(cluster) == [False, False, False])


# -- an error a worker reports is not the worker dying ----------------------------------------

def test_a_worker_that_cannot_reach_the_center_is_not_blamed_for_it():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_timeout=60) as cluster, \
            Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        (x,) = pool.scatter([_big(1)], workers=[a])
        for process in (cluster.worker_processes[0], cluster.center_process):
            process.kill()
            process.wait(timeout=10)
        # b finds a gone and asks the center, which is gone too: b reports that
        with pytest.raises(RemoteError, match="cannot connect to"):
            pool.apply(len, [x], workers=[b])
        assert b not in pool.client.placement.unreachable.recent()  # b did nothing wrong
        assert pool.apply(abs, [-3], workers=[b]).get() == 3


def test_an_os_error_raised_by_user_code_is_that_calls_error_not_a_dead_worker():
    def database(i):
        if i == 3:
            raise ConnectionRefusedError("the database refused us")
        return i

    with LocalCluster(n_workers=2, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        with pytest.raises(ConnectionRefusedError, match="the database refused us"):
            pool.map(database, range(8))
        assert pool.client.placement.unreachable.recent() == []  # nobody blamed
        assert pool.gather(pool.map(database, [0, 1, 2])) == [0, 1, 2]


# -- frozen peers and a frozen center ---------------------------------------------------------

@pytest.fixture
def frozen_friendly_cluster(monkeypatch):
    """Two workers; the center would take a minute to drop one, peers give up after 1.5 s."""
    monkeypatch.setenv(PEER_TIMEOUT_ENV, "1.5")
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.5,
                      heartbeat_timeout=60) as cluster:
        yield cluster


def test_a_task_whose_input_lives_on_a_frozen_worker_finishes_without_it(frozen_friendly_cluster):
    cluster = frozen_friendly_cluster
    a, b = cluster.worker_addresses
    frozen = cluster.worker_processes[0]
    with Pool(cluster.center_address, timeout=2) as pool, \
            Pool(cluster.center_address, timeout=2) as earlier:
        x = pool.apply(_big, [1], workers=[a])
        freeze(frozen.pid)
        try:
            with pytest.raises(TimeoutError, match="gather not done within 0.5 s"):
                x.get(timeout=0.5)  # a timeout= shorter than the silence bound is kept
            n = pool.apply(len, [x], workers=[b])  # b gives up on a, x is made again on b
            assert n.get(timeout=30) == 50_000
            assert pool.client.where(x.key) == {b}
            scattered = earlier.scatter([_big(i) for i in range(4)], timeout=30)
            assert {w for r in scattered for w in earlier.client.where(r.key)} == {b}
            np.testing.assert_array_equal(scattered[0].get(), _big(0))
        finally:
            frozen.send_signal(signal.SIGCONT)


def test_who_has_right_after_a_compute_is_not_held_up_by_a_frozen_worker():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_timeout=60) as cluster, \
            Pool(cluster.center_address, timeout=120) as pool:
        a, b = cluster.worker_addresses
        pool.apply(abs, [-1], workers=[a])  # a gave us a result: asked to confirm it
        live_result = pool.apply(abs, [-2], workers=[b])
        freeze(cluster.worker_processes[0].pid)
        try:
            answer = {}
            asking = threading.Thread(target=lambda: answer.update(pool.client.who_has()))
            asking.start()
            asking.join(timeout=15)  # not the pool's 120 s of patience for a silent peer
            assert not asking.is_alive()
            assert answer[live_result.key] == [b]
        finally:
            cluster.worker_processes[0].send_signal(signal.SIGCONT)


def test_a_center_that_was_frozen_does_not_drop_its_live_workers():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster, Pool(cluster.center_address) as pool:
        results = {}
        mapping = threading.Thread(target=lambda: results.update(values=pool.gather(
            pool.map(lambda i: time.sleep(0.1) or i * 2, range(30)))))
        mapping.start()
        freeze(cluster.center_process.pid)
        time.sleep(3)  # twice the heartbeat timeout
        cluster.center_process.send_signal(signal.SIGCONT)
        mapping.join(timeout=60)
        assert results["values"] == [i * 2 for i in range(30)]
        time.sleep(1)  # a center that dropped them would have done so by now
        assert sorted(pool.client.sync_ncores()) == sorted(cluster.worker_addresses)
        assert pool.client.placement.unreachable.recent() == []


# -- the client itself -----------------------------------------------------------------------

class _CollectingCounter(collections.Counter):
    """Reference counts that force a garbage collection whenever one is counted."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        gc.collect()


def test_garbage_collections_while_references_are_counted_never_deadlock_the_client():
    """RemoteData in reference cycles are freed by the cyclic collector, which may run in
    any thread at any allocation: here, at the very moment the client counts a reference."""
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        pool.client.refs._counts = _CollectingCounter(pool.client.refs._counts)
        outcome = {}

        def churn():
            for _ in range(10):
                values = pool.scatter(list(range(20)))
                for value in values[::2]:  # half of them in cycles, for the collector
                    cycle = [value]
                    cycle.append(cycle)
                del values, value, cycle
            outcome["done"] = True

        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        thread.join(timeout=60)
        assert outcome.get("done"), "the client deadlocked"
        gc.collect()
        assert wait_until(lambda: not any(pool.client.has_what().values()))  # all freed


# -- a Pool pointed at something else ---------------------------------------------------------

@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_socket():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes connections nobody ever reads
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_pool_pointed_at_a_web_server_names_it(http_server):
    # an HTTP server waits for a line end our framing never sends: it is silent to us
    with pytest.raises(NotACenterError, match=f"{http_server} .*not a d3arrow center"):
        Pool(http_server, timeout=2)


def test_a_pool_pointed_at_a_server_that_answers_garbage_names_what_it_said():
    def answer_garbage(listener):
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        time.sleep(1)
        conn.close()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        threading.Thread(target=answer_garbage, args=(listener,), daemon=True).start()
        with pytest.raises(NotACenterError, match=f"{address} is not a d3arrow center.*SSH-2.0"):
            Pool(address, timeout=3)


def test_a_pool_pointed_at_a_silent_socket_gives_up_at_its_timeout(silent_socket):
    start = time.monotonic()
    with pytest.raises(NotACenterError, match=f"{silent_socket} accepted a connection but did "
                                              f"not answer within 1.5 s"):
        Pool(silent_socket, timeout=1.5)
    assert time.monotonic() - start < 10  # not the 30 s default


def test_a_pool_pointed_at_a_worker_says_it_is_a_worker():
    with LocalCluster(n_workers=1, ncores=1) as cluster:
        (worker,) = cluster.worker_addresses
        with pytest.raises(NotACenterError, match=f"{worker} is a d3arrow worker, not a center"):
            Pool(worker, timeout=3)


# -- hostile peers ------------------------------------------------------------------------------

def test_a_flood_of_store_sessions_at_the_fd_limit_is_survived():
    with LocalCluster(n_workers=1, ncores=1) as cluster, Pool(cluster.center_address) as pool:
        (worker,) = cluster.worker_addresses
        psutil.Process(cluster.worker_processes[0].pid).rlimit(psutil.RLIMIT_NOFILE, (256, 256))
        socket_name = pool.store_info()[worker]["socket"]
        flood = []
        try:
            for _ in range(400):  # more than the worker has descriptors for
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                flood.append(conn)
                conn.settimeout(5)
                try:
                    conn.connect("\0" + socket_name)
                except OSError:  # the backlog is full: the flood did its work
                    break
            time.sleep(0.5)  # the worker meets EMFILE in accept
        finally:
            for conn in flood:
                conn.close()
        x = pool.apply(_big, [7])
        np.testing.assert_array_equal(x.get(timeout=30), _big(7))
        # read through a session of its store (not as bytes), the flood's sessions gone
        assert wait_until(lambda: pool.store_info()[worker]["readers"] == 1)


# -- large plain values, and values a receiver refuses ----------------------------------------

def test_bytes_and_str_over_the_header_limit_travel_like_arrays(pool):
    data = os.urandom(2**20) * 80  # 80 MiB: over the 64 MiB control header limit
    text = "d3arrow ✓ " * (9 * 2**20)  # 90 M characters
    remote_bytes, remote_text = pool.scatter([data, text])
    assert pool.gather([remote_bytes, remote_text]) == [data, text]
    assert pool.apply(len, [remote_text]).get() == len(text)
    assert pool.client.placement.unreachable.recent() == []


def test_a_value_over_the_receivers_limit_is_refused_by_name_and_nobody_is_blamed(monkeypatch):
    monkeypatch.setenv("D3ARROW_MAX_MESSAGE_BYTES", str(32 * 2**20))  # workers' and ours
    with LocalCluster(n_workers=1, ncores=1, shm=False) as cluster, \
            Pool(cluster.center_address, shm=False) as pool:
        too_big = np.zeros(40 * 2**20 // 8)
        with pytest.raises(ProtocolError, match=r"41943\d+ payload bytes announced \(limit "
                                                r"33554432\)"):
            pool.scatter([too_big])
        made_there = pool.apply(np.zeros, [40 * 2**20 // 8])
        with pytest.raises(ProtocolError, match=r"refused what .* sent: .*\(limit 33554432\)"):
            made_there.get()
        assert pool.client.placement.unreachable.recent() == []  # the worker is not taken for dead
        assert pool.gather(pool.scatter([1, 2])) == [1, 2]
        assert pool.apply(len, [made_there]).get() == 40 * 2**20 // 8


# -- errors a user reads ----------------------------------------------------------------------

def test_misuse_gets_errors_that_say_what_is_wrong(pool):
    with pytest.raises(ValueError, match=r"workers=\[\]: give a list of worker addresses"):
        pool.map(abs, [1], workers=[])
    (x,) = pool.scatter([np.arange(10)])
    with pytest.raises(TypeError, match="not as a dict key"):
        pool.apply(len, [{x: 1}])
    a, b = pool.scatter([1, 2])
    assert repr(a) != repr(b) and a.key in repr(a)
    pool.delete([a])
    with pytest.raises(MissingDataError, match=f"{a.key}.* deleted"):
        a.get()
    with pytest.raises(TypeError, match="gather takes a list"):
        pool.client.gather(b.key)
    assert pool.gather(b.key) == 2  # one key, one value: not its characters
    with pytest.raises(TypeError, match=r"non-native byte order \(>i8\).*astype\('<i8'\)"):
        SharedStore(2**20).put(np.arange(10, dtype=">i8"))


@pytest.mark.parametrize("args, message", [
    (["--shm-size", "0"], "a store needs a positive size"),
    (["--shm-size", "-1"], "a store needs a positive size"),
    (["--log-level", "verbose"], "'verbose' is not a log level"),
    (["--memory-limit", "lots"], "memory limit 'lots' is not a size"),
    (["--memory-limit", "150%"], "a percentage must be in (0, 100]"),
    (["--memory-target", "0.9", "--memory-pause", "0.8"], "--memory-target (0.9) is above"),
    (["--memory-pause", "2"], "give a fraction in (0, 1]"),
])
def test_bad_worker_options_are_refused_by_name(args, message):
    done = subprocess.run([sys.executable, "-m", "d3arrow.cli.worker", "127.0.0.1:1", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_local_directory_is_refused_at_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "d3arrow.cli.worker", "127.0.0.1:1",
                           "--memory-limit", "1GiB", "--local-directory",
                           str(tmp_path / "nowhere")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_clis_tell_their_version_and_plain_help():
    for module in ("main", "center", "worker"):
        base = [sys.executable, "-m", f"d3arrow.cli.{module}"]
        version = subprocess.run([*base, "--version"], capture_output=True, text=True,
                                 timeout=60)
        assert version.returncode == 0 and __version__ in version.stdout
        helped = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0 and "``" not in helped.stdout


def test_log_level_info_tells_start_registration_and_leaving():
    center = subprocess.Popen([sys.executable, "-m", "d3arrow.cli.center", "--port", "0",
                               "--log-level", "info"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        address = center.stdout.readline().split()[-1]
        worker = subprocess.run([sys.executable, "-m", "d3arrow.cli.worker", address,
                                 "--log-level", "INFO", "--exit-on-stdin-eof"],
                                input="", capture_output=True, text=True, timeout=60)
        assert "registered with center" in worker.stderr
    finally:
        center.terminate()
        _, log = center.communicate(timeout=30)
    assert "warning: no auth token: any user of this machine" in log
    assert "center listening at" in log
    assert "registered worker" in log and "left with its 0 keys" in log


# -- names, and values of clients that are gone ------------------------------------------------

def _keys_on(cluster, address):
    """The keys a worker holds, asked directly (the center may be down)."""
    async def ask():
        pool = ConnectionPool(security=Security.from_options(cluster.auth_token))
        try:
            return (await pool.rpc(address, timeout=5).keys())["keys"]
        finally:
            pool.close()
    return run(ask())


def test_two_clients_naming_a_value_alike_each_keep_their_own():
    with LocalCluster(n_workers=2, ncores=1) as cluster, \
            Pool(cluster.center_address) as a, Pool(cluster.center_address) as b:
        ours = a.scatter({"x": np.arange(10)})
        assert list(ours) == ["x"]  # Pool.scatter(dict) sends the values, keyed by name
        theirs = b.scatter({"x": np.ones(10)})  # held: a value nobody names is freed
        np.testing.assert_array_equal(a.gather("x"), np.arange(10))
        np.testing.assert_array_equal(b.gather("x"), np.ones(10))
        b.close()
        del theirs
        np.testing.assert_array_equal(ours["x"].get(), np.arange(10))  # not lost with b
        assert a.apply(lambda v: int(v.sum()), [ours["x"]]).get() == 45


@pytest.mark.parametrize("ending", ["returns without close", "is killed"])
def test_the_values_of_a_client_that_is_gone_are_freed_but_published_ones(ending):
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=1.5) as cluster, \
            Pool(cluster.center_address) as watcher:
        end = "os.kill(os.getpid(), signal.SIGKILL)" if ending == "is killed" else ""
        script = textwrap.dedent(f"""
            import os, signal, sys
            import numpy as np
            from d3arrow import Pool
            pool = Pool({cluster.center_address!r}, auth_token={cluster.auth_token!r})
            results = pool.map(lambda i: np.full(1000, i), range(10))
            named = pool.scatter({{"x": np.arange(5)}})
            survivor = pool.scatter(["kept for later"])[0]
            pool.publish("survivor", survivor)
            print(" ".join(r.key for r in [*results, *named.values()]), flush=True)
            {end}
            """)
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=60)
        keys = child.stdout.split()
        assert len(keys) == 11, child.stderr
        assert wait_until(lambda: not any(watcher.client.who_has(keys).values()), timeout=20)
        assert all(_keys_on(cluster, a) == [published_key(watcher)]
                   for a in cluster.worker_addresses if _keys_on(cluster, a))
        assert watcher.published("survivor").get() == "kept for later"
        key = published_key(watcher)
        watcher.unpublish("survivor")
        assert wait_until(lambda: not watcher.client.who_has([key])[key], timeout=20)


def published_key(pool):
    return pool.published("survivor").key


def test_close_while_the_center_is_down_still_frees_the_values():
    with LocalCluster(n_workers=2, ncores=1) as cluster:
        pool = Pool(cluster.center_address)
        scattered = pool.scatter([np.arange(1000) + i for i in range(10)])
        results = pool.map(lambda i: np.full(1000, i), range(10))
        assert sum(len(_keys_on(cluster, a)) for a in cluster.worker_addresses) == 20
        cluster.center_process.kill()
        cluster.center_process.wait(timeout=10)
        pool.close()
        assert [_keys_on(cluster, a) for a in cluster.worker_addresses] == [[], []]
        del scattered, results


def _stalled(address, frame):
    """A connection that sends the start of a message, then nothing."""
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(frame)
    return conn


def _closed_by_peer(conn):
    try:
        return conn.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_stalled_frames_hold_no_memory_and_are_closed(monkeypatch):
    monkeypatch.setenv(STALL_ENV, "3")  # the servers' (and ours)
    with LocalCluster(n_workers=1, ncores=1, auth_token=False) as cluster, \
            Pool(cluster.center_address) as pool:
        (worker,) = cluster.worker_addresses
        center = psutil.Process(cluster.center_process.pid)
        rss_before = center.memory_info().rss
        huge_header = PREFIX.pack(MAX_HEADER_BYTES, 0)  # 64 MiB announced, never sent
        headers = [_stalled(cluster.center_address, huge_header) for _ in range(16)]
        # a 1 GiB tensor announced to the worker's store, twice, never sent either
        value = msgpack.ExtType(SERIALIZED_EXT, msgpack.packb([{"kind": "tensor"}, 0, 1]))
        head = msgpack.packb({"op": "update_data", "data": {"x": value}})
        tensor = PREFIX.pack(len(head), 1) + struct.pack("<Q", 2**30) + head
        reserved_before = pool.store_info()[worker]["reserved"]
        tensors = [_stalled(worker, tensor) for _ in range(2)]
        try:
            assert wait_until(lambda: pool.store_info()[worker]["reserved"]
                              >= 2 * 2**30)  # the store took the space (its head start too)
            assert center.memory_info().rss - rss_before < 16 * 2**20  # taken as bytes come
            assert pool.center == cluster.center_address and pool.gather(pool.map(abs, [-1]))
            for conn in headers + tensors:  # closed by the servers once stalled for 3 s
                conn.settimeout(15)
                assert _closed_by_peer(conn)
            assert wait_until(lambda: pool.store_info()[worker]["reserved"]
                              <= reserved_before + 64 * 2**20, timeout=10)  # given back
            assert pool.store_info()[worker]["used"] == 0
        finally:
            for conn in headers + tensors:
                conn.close()


class _Bomb:
    """Kills the process that pickles it: its holder, when a client asks for it."""

    def __reduce__(self):
        os._exit(1)


def test_a_value_that_kills_its_holder_when_sent_is_given_up():
    with LocalCluster(n_workers=3, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=2) as cluster, \
            Pool(cluster.center_address, allowed_failures=1) as pool:
        bomb = pool.apply(_Bomb)
        fine = pool.apply(_big, [3])
        with pytest.raises(KilledWorkerError, match=f"{bomb.key} .*killed 2 workers"):
            bomb.get(timeout=60)  # made again from its lineage once, then given up
        assert wait_until(lambda: sorted(_alive(cluster)) == [False, False, True])
        np.testing.assert_array_equal(fine.get(timeout=60), _big(3))


def test_a_map_whose_stolen_calls_need_a_frozen_workers_values_finishes(monkeypatch):
    monkeypatch.setenv(PEER_TIMEOUT_ENV, "1.5")
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2,
                      heartbeat_timeout=3) as cluster, Pool(cluster.center_address) as pool:
        a, _ = cluster.worker_addresses
        inputs = pool.map(_big, range(8), workers=[a])
        frozen = cluster.worker_processes[0]
        freeze(frozen.pid)
        try:  # the calls queue on a; b steals some and fetches from a, which says nothing
            lengths = pool.map(lambda v: len(v) + int(v[0] * 0), inputs, timeout=60)
            assert pool.gather(lengths, timeout=60) == [50_000] * 8
        finally:
            frozen.send_signal(signal.SIGCONT)


def test_a_client_does_not_abandon_a_busy_worker_a_restarted_center_forgot():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=1.0) as cluster, \
            Pool(cluster.center_address) as pool:
        a, _ = cluster.worker_addresses
        pending = pool.apply_async(lambda: time.sleep(8) or 7, workers=[a])
        time.sleep(0.5)  # the call runs on a
        port = cluster.center_address.rsplit(":", 1)[1]
        cluster.center_process.kill()
        cluster.center_process.wait(timeout=10)
        time.sleep(2.5)  # the workers' heartbeats fail and back off
        restarted = subprocess.Popen(  # knows no worker until they register again
            [sys.executable, "-m", "d3arrow.cli.center", "--port", port],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "D3ARROW_AUTH_TOKEN": cluster.auth_token})
        try:
            assert pending.get(timeout=60).get() == 7  # waited on a, which answered
            assert a not in pool.client.placement.unreachable.recent()
        finally:
            restarted.terminate()
            restarted.wait(timeout=10)


def test_an_embedded_cluster_is_private_by_default():
    with LocalCluster(n_workers=1, ncores=1) as cluster:
        assert cluster.auth_token  # made up for this cluster
        with Pool(cluster.center_address) as pool:  # this process knows it
            assert pool.apply(abs, [-2]).get() == 2
        script = f"from d3arrow import Pool; Pool({cluster.center_address!r})"
        stranger = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                  text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items()
                                       if k != "D3ARROW_AUTH_TOKEN"})
        assert stranger.returncode != 0 and "AuthenticationError" in stranger.stderr
