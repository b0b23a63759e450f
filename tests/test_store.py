"""The shared store: library use between processes, lifetime, read-only views."""

import gc
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyarrow as pa
import pytest

from conftest import freeze, wait_until
from d3arrow import store as store_module
from d3arrow.arena import ArenaFull
from d3arrow.serialize import Serialized
from d3arrow.store import SharedDataGone, SharedStore


@pytest.fixture
def store():
    store = SharedStore(64 * 2**20)
    yield store
    store.close()


def memfd_mapping_of(address, pid="self"):
    """The /proc/PID/maps line of the mapping holding ``address``."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            span, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return line
    return None


def test_reader_gets_a_read_only_view_inside_the_mapped_segment(store):
    array = np.arange(1_000_000, dtype="f8")
    ref = store.put(array)
    view = store_module.get(pickle.loads(pickle.dumps(ref)))
    np.testing.assert_array_equal(view, array)
    mapping = memfd_mapping_of(view.ctypes.data)
    assert "/memfd:d3arrow-store" in mapping and mapping.split()[1].startswith("r--")
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0


def test_arrow_tables_are_shared_too(store):
    table = pa.table({"x": np.arange(100_000), "y": np.random.default_rng(0).random(100_000)})
    view = store_module.get(store.put(table))
    assert view.equals(table)
    column = view.column("x").chunks[0].buffers()[1]
    assert "/memfd:d3arrow-store" in memfd_mapping_of(column.address)


def test_delete_while_reading_keeps_the_readers_data(store):
    ref = store.put(np.full(1_000_000, 7.0))
    view = store_module.get(ref)
    store.delete(ref)
    gc.collect()
    refills = [store.put(np.full(1_000_000, -1.0)) for _ in range(5)]  # would reuse the space
    assert (view == 7.0).all()
    with pytest.raises(SharedDataGone):  # a new reader can no longer pin it
        store_module.get(ref)
    del view, refills


def test_pins_are_released_when_views_are_collected(store):
    ref = store.put(np.ones(100_000))
    views = [store_module.get(ref) for _ in range(3)]
    assert store.info()["pins"] == 3
    del views
    gc.collect()
    assert wait_until(lambda: store.info()["pins"] == 0, timeout=2)


def test_full_store_refuses_put_and_small_values_are_not_shared(store):
    with pytest.raises(ArenaFull):
        store.put(np.ones(100 * 2**20 // 8))
    assert store.put_value(np.ones(10)) is None  # too small to be worth sharing
    assert store.put_value(np.ones(10**6)) is not None
    with pytest.raises(TypeError, match="cannot share a dict"):
        store.put({"a": 1})


READER = textwrap.dedent("""
    import json, pickle, sys
    from d3arrow import store
    array = store.get(pickle.loads(sys.stdin.buffer.read()))
    with open("/proc/self/maps") as f:
        spans = [line.split() for line in f]
    mapping = next(" ".join(s[5:]) for s in spans if int(s[0].split("-")[0], 16)
                   <= array.ctypes.data < int(s[0].split("-")[1], 16))
    print(json.dumps({"sum": float(array.sum()), "dtype": str(array.dtype),
                      "shape": array.shape, "writeable": array.flags.writeable,
                      "mapping": mapping}))
""")


def test_two_processes_share_an_array_without_copies(store):
    array = np.arange(3_000_000, dtype="i8").reshape(1000, 3000)
    ref = store.put(array)
    reader = subprocess.run([sys.executable, "-c", READER], input=pickle.dumps(ref),
                            capture_output=True, timeout=60)
    assert reader.returncode == 0, reader.stderr.decode()
    seen = json.loads(reader.stdout)
    assert seen["sum"] == float(array.sum()) and seen["dtype"] == "int64"
    assert seen["shape"] == [1000, 3000] and seen["writeable"] is False
    assert seen["mapping"].startswith("/memfd:d3arrow-store")


def test_readers_pins_go_when_the_reader_dies(store):
    ref = store.put(np.ones(1_000_000))
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import pickle, sys, time
        from d3arrow import store
        view = store.get(pickle.loads(sys.stdin.buffer.readline() and bytes.fromhex(
            sys.stdin.buffer.readline().decode())))
        print("viewing", flush=True)
        time.sleep(600)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        reader.stdin.write(b"\n" + pickle.dumps(ref).hex().encode() + b"\n")
        reader.stdin.flush()
        assert reader.stdout.readline() == b"viewing\n"
        assert store.info()["pins"] == 1
        reader.kill()
        reader.wait()
        assert wait_until(lambda: store.info()["pins"] == 0, timeout=5)
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()
        reader.stdin.close()
        reader.stdout.close()


def test_the_store_never_appears_in_dev_shm(store):
    store.put(np.ones(10**6))
    assert not [name for name in os.listdir("/dev/shm") if "d3arrow" in name]


def test_a_session_hands_out_a_descriptor_that_cannot_write(store):
    """Whoever opens a session can view the memory, never change a worker's values."""
    import mmap
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect("\0" + store.socket_name)
        _, fds, _, _ = socket.recv_fds(sock, 8, 1)
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fds[0], 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.write(fds[0], b"x")
        mmap.mmap(fds[0], 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ).close()
    finally:
        os.close(fds[0])


def test_a_session_dropped_when_its_owner_stops_answering_closes_its_socket(monkeypatch):
    """A frozen owner makes a pin time out: the reader gets SharedDataGone and drops the
    session; its socket is closed once no view needs it (an unclosed one is a
    ResourceWarning, an error here)."""
    monkeypatch.setattr(store_module, "SESSION_TIMEOUT", 0.5)
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import pickle, sys, time
        import numpy as np
        from d3arrow.store import SharedStore
        store = SharedStore(16 * 2**20)
        print(pickle.dumps(store.put(np.ones(100_000))).hex(), flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE)
    try:
        ref = pickle.loads(bytes.fromhex(owner.stdout.readline().decode()))
        assert store_module.get(ref).sum() == 100_000  # the session is open
        freeze(owner.pid)
        with pytest.raises(SharedDataGone, match="cannot be reached"):
            store_module.get(ref)
        gc.collect()
        assert not store_module.has_session(ref.meta["socket"])
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


def test_a_pin_that_times_out_drops_the_session_but_not_the_pins_of_its_views(store):
    """A late answer would be read as the next pin's, so the session is used no more; but
    closing its socket would make the owner drop the pins of views still in use."""
    ref = store.put(np.ones(100_000))
    view = store_module.get(ref)  # opens the session, one pin
    with store._lock:  # the owner cannot answer a pin meanwhile
        with pytest.raises(SharedDataGone, match="cannot be reached"):
            store_module.load(Serialized(ref.meta, []), timeout=0.2)
        assert not store_module.has_session(ref.meta["socket"])
    assert wait_until(lambda: store.info()["pins"] == 2)  # the late pin too
    store.delete(ref)
    store.put(np.full(100_000, 7.0))  # would take the space of a value nobody pins
    assert (view == 1.0).all()
    del view
    gc.collect()  # the old session goes with its last view, its socket and pins with it
    assert wait_until(lambda: store.info()["pins"] == 0, timeout=5)
    np.testing.assert_array_equal(store_module.get(store.put(np.arange(100_000))),
                                  np.arange(100_000))  # a new session


def test_a_frozen_owner_holds_up_no_view_of_another_store(store):
    """Opening a session waits on the owner: not under the lock every view takes."""
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import pickle, sys, time
        import numpy as np
        from d3arrow.store import SharedStore
        store = SharedStore(16 * 2**20)
        print(pickle.dumps(store.put(np.ones(100_000))).hex(), flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE)
    waiting = None
    try:
        frozen_ref = pickle.loads(bytes.fromhex(owner.stdout.readline().decode()))
        freeze(owner.pid)
        waiting = threading.Thread(target=lambda: pytest.raises(
            SharedDataGone, store_module.load, Serialized(frozen_ref.meta, []), timeout=20))
        waiting.start()
        assert wait_until(lambda: waiting.is_alive(), timeout=5)
        local = store.put(np.arange(100_000))
        np.testing.assert_array_equal(store_module.get(local), np.arange(100_000))
        assert waiting.is_alive()  # still waiting on the frozen owner
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
        if waiting is not None:
            waiting.join(timeout=30)
