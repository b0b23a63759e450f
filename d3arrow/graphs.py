"""Running dask graphs on a d3arrow cluster: the data-local scheduler behind ``Pool.get``.

A graph (legacy dict, task-spec nodes, or a collection's ``__dask_graph__()``) becomes
task-spec nodes, run by :func:`run_graph`: the nodes whose inputs exist go out together
in ``dask.order`` priority, each to the worker holding most of its input bytes; an
intermediate result is freed as soon as the nodes that need it have run; only the
requested keys travel to the client. dask is imported only here, and only for a graph.
"""

import asyncio
import collections
import heapq
import itertools
from collections.abc import Mapping
from typing import Any

from .calls import Call
from .references import RemoteData
from .scheduling import Pace

IN_FLIGHT_PER_CORE = 4  # nodes out per core while each takes long
LONG_NODE_SECONDS = 0.001  # a node that runs this long is not worth batching with others

def prepare(dsk: Any) -> tuple[dict, dict]:
    """``(graph, priority)``: the task-spec nodes of ``dsk`` and the order to run them in."""
    graph = to_task_spec(dsk)
    return graph, priorities(graph)


def to_task_spec(dsk: Any) -> dict:
    """``{key: GraphNode}`` for a graph in any form dask hands a scheduler."""
    from dask._task_spec import convert_legacy_graph

    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    return convert_legacy_graph(dsk)


def priorities(graph: dict) -> dict:
    """``{key: int}``, lower first, as dask's own schedulers order work."""
    from dask.order import order

    return order(graph)


def wanted_keys(keys: Any) -> list:
    from dask.core import flatten

    return list(dict.fromkeys(flatten(keys) if isinstance(keys, list) else [keys]))


def run_node(node: Any, values: dict) -> Any:
    """On a worker: a task-spec node, given the values of the keys it depends on."""
    return node(values)


async def run_graph(pool: Any, function: Any, graph: dict, priority: dict,
                    wanted: list) -> dict:
    """Run every node of ``graph`` on the cluster; ``{key: RemoteData}`` for ``wanted``.

    ``function`` is :func:`run_node` in wire form. The nodes whose inputs exist are
    dispatched together, highest priority first, as one ``map`` (batched per worker, each
    call where most of its input bytes are); as each group's results come back, the nodes
    waiting for them become ready and go out at once, while other groups still run. A
    result is dropped (freed on the workers) once every node that needs it has run, unless
    it is wanted. The first error of a node is raised, and nothing more is started.
    """
    from dask._task_spec import Alias

    # keys the graph uses but does not make: RemoteData put in it (persisted chunks, a
    # scattered value given to dask.delayed), which dask turned into references by key
    external = {dep for node in graph.values() for dep in node.dependencies} - graph.keys()
    results: dict[Any, RemoteData] = {key: _held(pool.client, key) for key in external}
    waiting = {key: set(node.dependencies) - external for key, node in graph.items()}
    dependents = collections.defaultdict(list)
    for key, deps in waiting.items():
        for dep in deps:
            dependents[dep].append(key)
    unneeded = {key: len(dependents[key]) for key in graph}  # dependents yet to run
    keep = set(wanted) | external
    ready = [(priority[key], i, key) for i, (key, deps) in enumerate(waiting.items())
             if not deps]  # a heap: highest priority (lowest number) first
    heapq.heapify(ready)
    tiebreak = itertools.count(len(graph))
    running: dict[asyncio.Task, list] = {}
    pace = Pace()

    def finished(key, value):
        """``key`` has its value: release what waited for it, and what it waited for."""
        results[key] = value
        for dependent in dependents[key]:
            waiting[dependent].discard(key)
            if not waiting[dependent]:
                heapq.heappush(ready, (priority[dependent], next(tiebreak), dependent))
        for dep in graph[key].dependencies:
            if dep in external:
                continue
            unneeded[dep] -= 1
            if not unneeded[dep] and dep not in keep:
                results.pop(dep, None)  # its last user ran: freed on the workers

    cores = max(1, sum(pool.client.ncores.values()))

    def room():
        """How many more nodes may go out: a few per core while nodes take long (or are not
        measured yet), so that memory stays bounded as with dask's own schedulers; any
        number once they are known to be tiny, so that they travel by the hundred."""
        per_call = pace.per_call()
        if per_call is not None and per_call < LONG_NODE_SECONDS:
            return len(graph)
        return cores * IN_FLIGHT_PER_CORE - sum(map(len, running.values()))

    try:
        while ready or running:
            batch = []
            space = room()
            while ready and len(batch) < space:
                _, _, key = heapq.heappop(ready)
                node = graph[key]
                if isinstance(node, Alias):
                    finished(key, results[node.target])
                else:
                    batch.append(key)
            if batch:
                calls = [Call.of(pool.client.keys.new(),
                                 (graph[key], {d: results[d] for d in graph[key].dependencies}))
                         for key in batch]
                task = pool.client.spawn(pool._run_calls(function, calls, None,
                                                         name="a dask task", pace=pace),
                                         "running dask tasks")
                running[task] = batch
            if not running:  # nothing out, nothing ready: done
                continue
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                for key, outcome in zip(running.pop(task), task.result()):
                    if isinstance(outcome, BaseException):
                        raise outcome
                    finished(key, outcome)
    finally:
        for task in running:
            task.cancel()
    return {key: results[key] for key in wanted}


def _held(client: Any, key: Any) -> RemoteData:
    if not isinstance(key, str):
        raise KeyError(f"the graph needs {key!r}, which it does not define")
    return RemoteData(key, client, owned=True)  # held while the graph runs


def nested(keys: Any, values: Mapping) -> Any:
    """The values in the nesting of ``keys`` (lists of lists of keys), as dask returns them."""
    if isinstance(keys, list):
        return [nested(k, values) for k in keys]
    return values[keys]
