"""Memory limits: workers spill to disk, pause, and lose nothing (real processes)."""

import concurrent.futures
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import pyarrow as pa
import pytest
from conftest import wait_until

import d3arrow
from benchmarks.sampling import PeakMemory
from d3arrow import LocalCluster, Pool, SpillError
from d3arrow.memory import MemoryManager, parse_memory_limit, system_memory
from d3arrow.spill import SpillDirectory, open_spilled
from d3arrow.values import Values

pytestmark = pytest.mark.timeout(180)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests

MiB = 2**20


def make(i):
    return np.full(2 * MiB, i, dtype="f8")  # 16 MiB


def is_made(a, i):
    return bool((a == i).all())


def test_memory_limits_parse_like_dasks():
    assert parse_memory_limit("256MiB") == 256 * MiB
    assert parse_memory_limit("4GB") == 4 * 2**30
    assert parse_memory_limit(10**9) == 10**9
    assert parse_memory_limit("0") is None and parse_memory_limit(None) is None
    assert parse_memory_limit("auto", workers_on_host=4) == system_memory() // 4
    assert parse_memory_limit("50%", workers_on_host=2) == int(system_memory() // 2 * 0.5)
    for bad in ("lots", "150%", "-1", -5):
        with pytest.raises(ValueError, match="memory limit"):
            parse_memory_limit(bad)


def test_a_worker_limited_to_256_mib_holds_2_gib_and_every_value_comes_back(tmp_path):
    limit = 256 * MiB
    with LocalCluster(n_workers=1, ncores=1, memory_limit=limit,
                      local_directory=tmp_path) as cluster, Pool(cluster.center_address) as pool:
        with PeakMemory([cluster.worker_processes[0].pid], interval=0.003) as rss:
            arrays = pool.map(make, range(128))  # 2 GiB in 16 MiB values
            checked = pool.gather(pool.map(is_made, arrays, range(128)))  # read back by tasks
        assert all(checked)
        (info,) = pool.memory_info().values()
        assert info["limit"] == limit and info["spilled_count"] >= 100
        assert info["spilled_bytes"] >= 100 * 16 * MiB
        assert info["memory"] <= limit
        assert rss.peak <= 1.1 * limit + 16 * MiB, f"peak RSS {rss.peak / MiB:.0f} MiB"
        # the client on this host reads spilled values in place, as views of their files
        first, last = pool.gather([arrays[0], arrays[-1]])
        assert float(first[0]) == 0 and float(last[-1]) == 127 and not first.flags.writeable
        assert os.listdir(tmp_path) == []  # spill files have no names


def test_kill_9_of_a_spilling_worker_leaves_no_file_and_no_shared_memory(tmp_path):
    shm_before = set(os.listdir("/dev/shm"))
    with LocalCluster(n_workers=1, ncores=1, memory_limit=128 * MiB,
                      local_directory=tmp_path) as cluster, Pool(cluster.center_address) as pool:
        worker = cluster.worker_processes[0]
        arrays = pool.map(make, range(24))
        assert wait_until(lambda: pool.memory_info()[cluster.worker_addresses[0]][
            "spilled_count"] > 10)
        spill_files = [link for link in os.listdir(f"/proc/{worker.pid}/fd")
                       if str(tmp_path) in os.readlink(f"/proc/{worker.pid}/fd/{link}")]
        assert len(spill_files) > 10  # open, under no name
        assert os.listdir(tmp_path) == []
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        del arrays
    assert os.listdir(tmp_path) == []
    assert set(os.listdir("/dev/shm")) <= shm_before


@contextlib.contextmanager
def small_filesystem(path, size):
    """A tmpfs of ``size`` bytes mounted at ``path`` (needs root, as CI runs)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_local_directory_gives_a_clear_error_and_loses_nothing(tmp_path):
    with small_filesystem(tmp_path / "small", 48 * MiB) as directory, \
            LocalCluster(n_workers=1, ncores=1, memory_limit=128 * MiB,
                         local_directory=directory, heartbeat_interval=0.2,
                         heartbeat_timeout=1) as cluster, \
            Pool(cluster.center_address) as pool:
        (address,) = cluster.worker_addresses
        held = pool.map(make, range(4))  # 64 MiB: fits in memory and on disk
        more = [pool.submit(make, i) for i in range(4, 24)]  # 320 MiB more: does not
        errors = []
        for future in more:
            try:
                future.result(timeout=60)
            except SpillError as e:
                errors.append(e)
        assert errors, "no operation failed although the disk is full"
        assert "No space left on device" in str(errors[0])
        assert str(directory) in str(errors[0])
        # nothing held was lost: every value made is still there, right
        assert [is_made(v, i) for v, i in zip(pool.gather(held), range(4))] == [True] * 4
        with pytest.raises(SpillError, match="No space left on device"):  # no room to run
            pool.map(is_made, held, range(4))
        made = [(f, i) for f, i in zip(more, range(4, 24)) if f.exception() is None]
        assert all(is_made(f.get(), i) for f, i in made)
        # paused, it still serves its values and heartbeats: the center keeps it
        info = pool.memory_info()[address]
        assert info["paused"] and "No space left on device" in info["error"]
        time.sleep(2.5)  # over two heartbeat timeouts
        assert pool.client.sync_ncores() == {address: 1}
        assert float(held[2].get()[0]) == 2.0
        with pytest.raises(SpillError, match="cannot spill"):  # a scatter needs room too
            pool.scatter([np.ones(MiB)], timeout=30)


def test_a_paused_worker_s_calls_run_elsewhere(tmp_path):
    with small_filesystem(tmp_path / "small", 40 * MiB) as directory, \
            LocalCluster(n_workers=1, ncores=1, memory_limit=96 * MiB,
                         local_directory=directory) as small, \
            Pool(small.center_address) as pool:
        (stuck,) = small.worker_addresses
        made = [pool.submit(make, i) for i in range(8)]  # 128 MiB for 96 MiB and 40 MiB
        d3arrow.wait(made)  # of disk: stuck, some fail with SpillError
        kept = [(f, i) for f, i in zip(made, range(8)) if f.exception() is None]
        assert len(kept) >= 3 and pool.memory_info()[stuck]["paused"]
        # a second worker joins the same center: work goes there while the first is stuck
        helper = subprocess.Popen([sys.executable, "-m", "d3arrow.cli.worker",
                                   small.center_address, "--ncores", "1", "--exit-on-stdin-eof"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  env={**os.environ, "D3ARROW_AUTH_TOKEN": small.auth_token})
        try:
            assert wait_until(lambda: len(pool.client.sync_ncores()) == 2, timeout=30)
            firsts = pool.gather(pool.map(lambda a: float(a[0]), [f for f, _ in kept]))
            assert firsts == [float(i) for _, i in kept]
            new = pool.map(lambda i: i * 2, range(20))
            assert pool.gather(new) == [i * 2 for i in range(20)]
            holders = pool.client.who_has([r.key for r in new])
            assert all(stuck not in addresses for addresses in holders.values())
        finally:
            helper.stdin.close()
            helper.wait(timeout=30)


def test_spilled_files_hold_arrays_tables_and_objects_as_views(tmp_path):
    directory = SpillDirectory(tmp_path)
    values = [np.arange(10**6, dtype="f8").reshape(1000, 1000),
              pa.table({"x": np.arange(1000), "y": [str(i) for i in range(1000)]}),
              {"nested": [np.ones(5000), "text"]}, b"", np.zeros(0)]
    for value in values:
        spilled = directory.write(value)
        try:
            for view in (spilled.load(), open_spilled(spilled.ref_meta())):  # in place
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(view, value)
                elif isinstance(value, pa.Table):
                    assert view.equals(value)
                elif isinstance(value, dict):
                    np.testing.assert_array_equal(view["nested"][0], value["nested"][0])
                else:
                    assert view == value
        finally:
            spilled.close()
    assert os.listdir(tmp_path) == []
    gone = directory.write(np.ones(10))
    ref = gone.ref_meta()
    gone.close()
    with pytest.raises(SpillError, match="gone"):
        open_spilled(ref)


def test_a_value_larger_than_the_limit_is_spilled_not_refused(tmp_path):
    with LocalCluster(n_workers=1, ncores=1, memory_limit=96 * MiB,
                      local_directory=tmp_path) as cluster, Pool(cluster.center_address) as pool:
        big = pool.apply(np.arange, [24 * MiB], {"dtype": "f8"})  # 192 MiB, made there
        (scattered,) = pool.scatter([np.ones(16 * MiB)])  # 128 MiB, sent there
        assert pool.apply(lambda a: float(a[-1]), [big]).get() == 24 * MiB - 1
        assert float(scattered.get().sum()) == 16 * MiB
        (info,) = pool.memory_info().values()
        assert info["spilled_count"] == 2 and info["memory"] <= 96 * MiB


def test_a_value_spilled_from_several_threads_is_written_once_and_stays_itself(tmp_path):
    # the loop's spiller, a co-located reader's share and a full store's overflow may pick
    # the same value at once; before, the one that came second wrote the first one's file
    # handle as the value, and readers mapped whatever file had that number in their process
    values = Values()
    memory = MemoryManager(values, 64 * MiB, store_used=lambda: 0, spillable=lambda k: True,
                           directory=tmp_path)
    for i in range(8):
        values.put(f"x{i}", make(i))
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        freed = list(threads.map(memory.spill, [f"x{i}" for i in range(8) for _ in range(4)]))
    assert sorted(freed, reverse=True)[:8] == [16 * MiB] * 8 and sum(freed) == 8 * 16 * MiB
    assert values.spilled_count == 8 and memory.spill("x0") == 0
    for i in range(8):
        assert is_made(values[f"x{i}"], i)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(values.raw("x0"))
    assert values.spilled_bytes == 8 * 16 * MiB
    dropped = values.raw("x1")
    values.discard("x1")
    assert values.spilled_count == 7 and values.spilled_bytes == 7 * 16 * MiB
    values.put("x2", make(2))  # in memory again
    assert values.spilled_count == 6 and values.spilled_bytes == 6 * 16 * MiB
    with pytest.raises(SpillError, match="dropped"):
        dropped.load()
    dropped.close()  # closing twice closes nothing of anyone else's
    values.close()
    assert os.listdir(tmp_path) == []


def _written(pid):
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def test_a_co_located_reader_holds_the_spilled_file_itself_without_writing_it_again(tmp_path):
    with LocalCluster(n_workers=2, ncores=1, memory_limit=96 * MiB,
                      local_directory=tmp_path) as cluster, Pool(cluster.center_address) as pool:
        a, b = cluster.worker_addresses
        writer, reader = cluster.worker_processes
        big = pool.apply(np.arange, [16 * MiB], {"dtype": "f8"}, workers=[a])  # 128 MiB
        assert wait_until(lambda: pool.memory_info()[a]["spilled_count"] == 1)
        before = _written(reader.pid)
        assert pool.apply(lambda x: float(x[-1]), [big], workers=[b]).get() == 16 * MiB - 1
        pool.apply(np.sum, [big], workers=[b]).get()  # held there now: not fetched again
        pressure = pool.map(make, range(6), workers=[b])  # 96 MiB more: b spills its own
        assert wait_until(lambda: pool.memory_info()[b]["memory"] <= 96 * 0.8 * MiB)
        # before: the reader held a view of the file as its own value, and wrote it again
        # (128 MiB); now at most its own six values, and its messages (wchar counts sockets)
        assert _written(reader.pid) - before < 6 * 16 * MiB + MiB
        assert pool.memory_info()[b]["spilled_count"] >= 1  # the file, held as spilled
        del pressure
        # the file lives while either holds it: the writer's death loses nothing
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert float(big.get()[-1]) == 16 * MiB - 1
    assert os.listdir(tmp_path) == []
