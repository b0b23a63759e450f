"""Pool.get as a dask scheduler: the same results as dask's threaded scheduler."""

import operator
import sys

import cloudpickle
import numpy as np
import pytest
from conftest import wait_until

dask = pytest.importorskip("dask")  # the test extra installs it
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def test_an_array_pipeline_equals_the_threaded_schedulers(pool):
    x = da.random.default_rng(1).random((1200, 1200), chunks=300)
    y = (x + x.T).sum(axis=0)
    z = (x @ x.T)[::7, 3:50].mean(axis=1)
    ours = dask.compute(y, z, scheduler=pool.get)
    theirs = dask.compute(y, z, scheduler="threads")
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(x.sum().compute(scheduler=pool.get), x.sum().compute())


def test_delayed_chains_and_fan_in(pool):
    inc = dask.delayed(operator.add, pure=False)
    value = 0
    for _ in range(200):  # each on the previous
        value = inc(value, 1)
    fan = dask.delayed(sum)([inc(i, 1) for i in range(50)])
    assert dask.compute(value, fan, scheduler=pool.get) == (200, sum(range(1, 51)))


def test_bags_and_the_config_setting(pool):
    bag = db.from_sequence(range(100), npartitions=7).map(lambda v: v * 3).filter(
        lambda v: v % 2 == 0)
    with dask.config.set(scheduler=pool.get):
        assert bag.sum().compute() == sum(v * 3 for v in range(100) if v * 3 % 2 == 0)
        assert sorted(bag.compute()) == sorted(bag.compute(scheduler="sync"))


def test_a_failing_task_raises_its_error_with_the_remote_traceback(pool):
    def boom(v):
        raise ZeroDivisionError(f"no chunk {v}")

    bad = dask.delayed(boom)(3)
    with pytest.raises(ZeroDivisionError, match="no chunk 3") as info:
        dask.compute(dask.delayed(sum)([bad, 1]), scheduler=pool.get)
    assert "boom" in str(info.value.__cause__)


def test_intermediate_results_do_not_stay_on_the_workers(pool):
    x = da.ones((800, 800), chunks=200)
    assert float((x * 2 + 1).sum().compute(scheduler=pool.get)) == 800 * 800 * 3.0
    assert wait_until(lambda: not any(pool.client.has_what().values()))


def test_persisted_chunks_stay_on_the_workers_and_feed_later_graphs(pool):
    x = da.arange(1000, chunks=100) * 2
    kept = pool.persist(x)
    held = {k for keys in pool.client.has_what().values() for k in keys}
    chunks = [v for v in kept.__dask_graph__().values()]
    assert len(chunks) == 10 and all(c.key in held for c in chunks)  # on the workers
    assert float((kept + 1).sum().compute(scheduler=pool.get)) == float((x + 1).sum().compute())
    np.testing.assert_array_equal(kept.compute(scheduler=pool.get), np.arange(1000) * 2)



def test_remote_data_in_delayed_arguments_are_their_values(pool):
    import time

    scattered = pool.scatter([10])[0]
    pending = pool.submit(lambda v: (time.sleep(0.3), v + 1)[1], scattered)
    add = dask.delayed(operator.add)
    graph = [add(scattered, 5),
             dask.delayed(sum)([scattered, pending, 1]),  # nested, one still pending
             dask.delayed(lambda d: d["a"] * 2)({"a": pending}),
             add(dask.delayed(operator.neg)(scattered), 1)]
    assert not pending.done()  # still running as the graph is handed over
    assert dask.compute(*graph, scheduler=pool.get) == (15, 22, 22, -9)
    assert pool.get({"a": (operator.add, scattered, 2)}, "a") == 12  # a legacy graph
    assert (scattered.get(), pending.get()) == (10, 11)  # the graph did not free them


def test_a_failed_remote_data_fails_the_graph_that_uses_it(pool):
    bad = pool.submit(operator.truediv, 1, 0)
    with pytest.raises(ZeroDivisionError):
        dask.compute(dask.delayed(operator.neg)(bad), scheduler=pool.get)


def test_a_fused_node_runs_its_inner_tasks_as_dask_would(pool):
    # workers run a fused node's inner graph in dependency order, without dask.order:
    # a value used twice stays until its last user, the result equals dask's own
    from dask._task_spec import Task, TaskRef, _execute_subgraph

    from d3arrow.graphs import _run_subgraph, run_node

    inner = {"b": Task("b", operator.mul, TaskRef("a"), 2),
             "c": Task("c", operator.add, TaskRef("a"), TaskRef("b")),
             "out": Task("out", operator.sub, TaskRef("c"), TaskRef("b"))}
    assert _run_subgraph(inner, "out", ("a",), 5) == _execute_subgraph(inner, "out", ("a",), 5)
    node = Task("n", _execute_subgraph, inner, "out", ("a",), 7)
    assert run_node(node, {}) == 7 + 14 - 14
    x = da.arange(64, chunks=8)  # and on the cluster, fused chains of array tasks
    y = ((x + 1) * 2 - x).sum()
    assert y.compute(scheduler=pool.get) == y.compute(scheduler="threads")
