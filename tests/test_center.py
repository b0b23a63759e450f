"""The center's metadata ops and liveness, against a real in-process center and workers."""

import asyncio

from conftest import gen_cluster


@gen_cluster(n_workers=2)
async def test_workers_register_with_their_cores(center, workers, pool):
    rpc = pool.rpc(center.address)
    ncores = (await rpc.ncores())["ncores"]
    assert ncores == {w.address: 1 for w in workers}
    info = (await rpc.workers())["workers"]
    assert {i["name"] for i in info.values()} == {"w0", "w1"}


@gen_cluster(n_workers=2)
async def test_add_remove_who_has_has_what(center, workers, pool):
    a, b = (w.address for w in workers)
    rpc = pool.rpc(center.address)
    await rpc.add_keys(address=a, keys=["x", "y"], nbytes={"x": 8, "y": 16})
    await rpc.add_keys(address=b, keys=["x"])
    who_has = (await rpc.who_has(keys=["x", "y", "z"]))["who_has"]
    assert sorted(who_has["x"]) == sorted([a, b]) and who_has["y"] == [a] and who_has["z"] == []
    assert sorted((await rpc.has_what(workers=[a]))["has_what"][a]) == ["x", "y"]
    assert (await rpc.nbytes(keys=["x", "y"]))["nbytes"] == {"x": 8, "y": 16}
    await rpc.remove_keys(address=a, keys=["x", "y"])
    who_has = (await rpc.who_has(keys=["x", "y"]))["who_has"]
    assert who_has == {"x": [b], "y": []}
    assert (await rpc.nbytes(keys=["y"]))["nbytes"] == {}
    assert (await rpc.who_has())["who_has"] == {"x": [b]}  # the whole table, as lists
    assert (await rpc.has_what())["has_what"] == {a: [], b: ["x"]}
    await rpc.add_keys(address=a, keys=["x"], nbytes={"x": 8})  # held twice again
    assert (await rpc.nbytes())["nbytes"] == {"x": 8}
    await rpc.remove_keys(address=b, keys=["x"])
    await rpc.remove_keys(address=a, keys=["x"])
    assert (await rpc.who_has())["who_has"] == {} and (await rpc.nbytes())["nbytes"] == {}


@gen_cluster(n_workers=1)
async def test_unknown_worker_is_told_so(center, workers, pool):
    rpc = pool.rpc(center.address)
    assert (await rpc.heartbeat(address="127.0.0.1:1"))["status"] == "unknown-worker"
    assert (await rpc.add_keys(address="127.0.0.1:1", keys=["k"]))["status"] == "unknown-worker"
    assert (await rpc.who_has(keys=["k"]))["who_has"] == {"k": []}


@gen_cluster(n_workers=2, heartbeat_interval=0.05, heartbeat_timeout=0.3)
async def test_silent_worker_is_dropped_with_its_keys(center, workers, pool):
    silent, alive = workers
    rpc = pool.rpc(center.address)
    await rpc.add_keys(address=silent.address, keys=["only-here"])
    silent.link.heartbeats.cancel()  # the worker stops heartbeating, as if hung or dead
    for _ in range(100):
        await asyncio.sleep(0.05)
        if silent.address not in (await rpc.ncores())["ncores"]:
            break
    assert list((await rpc.ncores())["ncores"]) == [alive.address]
    assert (await rpc.who_has(keys=["only-here"]))["who_has"] == {"only-here": []}


@gen_cluster(n_workers=1, heartbeat_interval=0.05, heartbeat_timeout=5)
async def test_forgotten_worker_registers_again_with_its_keys(center, workers, pool):
    (worker,) = workers
    rpc = pool.rpc(center.address)
    await pool.rpc(worker.address).update_data(data={})  # nothing: just a live request
    worker.values.put("kept", 1)
    await rpc.unregister(address=worker.address)  # as after a center restart
    for _ in range(100):
        await asyncio.sleep(0.05)
        if (await rpc.who_has(keys=["kept"]))["who_has"]["kept"]:
            break
    assert (await rpc.who_has(keys=["kept"]))["who_has"] == {"kept": [worker.address]}


@gen_cluster(n_workers=2, heartbeat_interval=0.05, heartbeat_timeout=0.3,
             heartbeats_per_second=4)
async def test_heartbeats_slow_down_as_the_cluster_grows(center, workers, pool):
    # 2 workers, at most 4 heartbeats a second: each beats every 0.5 s, and is dropped
    # after 3 s of silence (the configured 6 intervals), not after 0.3 s
    assert center.worker_interval == 0.5 and abs(center.worker_timeout - 3.0) < 1e-9
    await asyncio.sleep(0.6)  # every worker heard the new interval with a heartbeat
    assert [w.link.heartbeat_interval for w in workers] == [0.5, 0.5]
    before = center.requests["heartbeat"]
    await asyncio.sleep(2.0)
    assert 4 <= center.requests["heartbeat"] - before <= 10  # ~8, not ~80
    ncores = (await pool.rpc(center.address).ncores())["ncores"]
    assert sorted(ncores) == sorted(w.address for w in workers)  # none dropped


@gen_cluster(n_workers=1, heartbeat_interval=0.05)
async def test_a_gone_clients_values_are_freed_whatever_they_were_told_among(
        center, workers, pool):
    # a worker's batch mixes owners (results of two clients, a named value, a key written
    # by hand): the center counts each owner's keys, and frees those of the one that left
    from d3arrow.keys import KeyMaker, new_owner

    (worker,) = workers
    rpc = pool.rpc(center.address)
    a, b = KeyMaker(new_owner()), KeyMaker(new_owner())
    for maker in (a, b):
        await rpc.register_client(client=maker.owner)
    a_keys = [a.new(), a.new(), a.named("kept-by-name"), a.new()]
    b_keys = [b.new(), b.new()]
    mixed = [a_keys[0], b_keys[0], a_keys[1], "by-hand", a_keys[2], b_keys[1], a_keys[3]]
    for key in mixed:
        worker.values.put(key, 1)
    await rpc.add_keys(address=worker.address, keys=mixed)
    await rpc.unregister_client(client=a.owner)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not any((await rpc.who_has(keys=a_keys))["who_has"].values()):
            break
    who_has = (await rpc.who_has(keys=mixed))["who_has"]
    assert {key for key, holders in who_has.items() if holders} == {*b_keys, "by-hand"}
    assert sorted(worker.values) == sorted([*b_keys, "by-hand"])
    assert center._owned == {b.owner: 2}  # the counts that decide what is freed later
    await rpc.remove_keys(address=worker.address, keys=b_keys)
    assert center._owned == {}
