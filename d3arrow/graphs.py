"""Running dask graphs on a d3arrow cluster: the data-local scheduler behind ``Pool.get``.

A graph (legacy dict, task-spec nodes, or a collection's ``__dask_graph__()``) becomes
task-spec nodes, run by :func:`run_graph`: the nodes whose inputs exist go out together
in ``dask.order`` priority, each to the worker holding most of its input bytes; an
intermediate result is freed as soon as the nodes that need it have run; only the
requested keys travel to the client. dask is imported only here, and only for a graph.
"""

import asyncio
import collections
import dataclasses
import heapq
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from .calls import Call
from .references import RemoteData
from .scheduling import Pace
from .task import KeyRef, find_leaves

IN_FLIGHT_PER_CORE = 4  # nodes out per core while each takes long
LONG_NODE_SECONDS = 0.001  # a node that runs this long is not worth batching with others
LOW_WATER_BATCHES = 2  # tiny nodes: dispatch more when fewer batches per core are out

@dataclasses.dataclass
class Prepared:
    """A graph ready to run: its task-spec nodes, their priorities (lower first), and the
    RemoteData it names (values it does not make: scattered, submitted, persisted)."""

    nodes: dict
    priority: dict
    futures: dict


def prepare(dsk: Any) -> Prepared:
    """The task-spec nodes of ``dsk`` (any form dask hands a scheduler) and their order."""
    from dask._task_spec import convert_legacy_graph

    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    nodes = convert_legacy_graph(dsk)
    futures = _name_futures(nodes)
    return Prepared(nodes, priorities(nodes), futures)


def _name_futures(nodes: dict) -> dict:
    """Turn the RemoteData inside tasks' arguments into references to their keys, as dask
    does for its own futures (``dask.delayed(f)(remote_data)`` keeps the object itself):
    ``{key: RemoteData}`` of those found. The tasks holding them are rebuilt in place."""
    from dask._task_spec import Task, parse_input

    futures = {}
    for key, node in nodes.items():
        if type(node) is not Task:
            continue
        if not _holds_remote_data(node.args) and not _holds_remote_data(node.kwargs):
            continue  # most nodes: checked without building anything
        futures.update((data.key, data) for data in
                       find_leaves((node.args, node.kwargs), RemoteData))
        nodes[key] = Task(key, node.func, *map(parse_input, node.args),
                          **{k: parse_input(v) for k, v in node.kwargs.items()})
    return futures


def _holds_remote_data(obj: Any) -> bool:
    kind = type(obj)
    if kind is RemoteData:
        return True
    if kind in (list, tuple, set, frozenset):
        return any(map(_holds_remote_data, obj))
    if kind is dict:
        return any(map(_holds_remote_data, obj.values()))
    return False


def priorities(graph: dict) -> dict:
    """``{key: int}``, lower first, as dask's own schedulers order work."""
    from dask.order import order

    return order(graph)


def wanted_keys(keys: Any) -> list:
    from dask.core import flatten

    return list(dict.fromkeys(flatten(keys) if isinstance(keys, list) else [keys]))


def run_node(node: Any, values: dict) -> Any:
    """On a worker: a task-spec node, given the values of the keys it depends on.

    A fused node (dask's ``_execute_subgraph``) runs its few inner tasks in dependency
    order: dask orders them with ``dask.order`` at every call, which was more than half of
    such a node's cost (78 of 144 us for P2's), for no difference in what is computed."""
    from dask._task_spec import Task, _execute_subgraph

    if type(node) is Task and node.func is _execute_subgraph:
        node.func = _run_subgraph  # this node was unpickled for this call alone
    return node(values)


def _run_subgraph(inner: dict, outkey: Any, inkeys: tuple, *dependencies: Any) -> Any:
    """``dask._task_spec._execute_subgraph`` without ``dask.order``: each inner task after
    its dependencies, each value dropped once its last user has run."""
    cache = dict(zip(inkeys, dependencies))
    order, seen, stack = [], set(cache), [(outkey, False)]
    while stack:  # depth first, each key after what it depends on
        key, expanded = stack.pop()
        if expanded:
            order.append(key)
        elif key not in seen:
            seen.add(key)
            stack.append((key, True))
            stack.extend((dep, False) for dep in inner[key].dependencies if dep not in seen)
    users = collections.Counter(dep for key in order for dep in inner[key].dependencies)
    for key in order:
        node = inner[key]
        cache[key] = node(cache)
        for dep in node.dependencies:
            users[dep] -= 1
            if not users[dep] and dep != outkey:
                del cache[dep]
    return cache[outkey]


async def run_graph(pool: Any, function: Any, prepared: Prepared, wanted: list,
                    on_node: Callable[[], None] | None = None) -> dict:
    """Run every node of ``graph`` on the cluster; ``{key: RemoteData}`` for ``wanted``.
    ``on_node()`` hears of each node done (a progress bar).

    ``function`` is :func:`run_node` in wire form. The nodes whose inputs exist are
    dispatched together, highest priority first, as one ``map`` (batched per worker, each
    call where most of its input bytes are); as each batch's results come back, the nodes
    waiting for them become ready and go out at once, while other batches still run. A
    result is dropped (freed on the workers) once every node that needs it has run, unless
    it is wanted. The first error of a node is raised, and nothing more is started.
    """
    from dask._task_spec import Alias

    graph, priority = prepared.nodes, prepared.priority
    # keys the graph uses but does not make: RemoteData put in it (persisted chunks, a
    # scattered or submitted value given to dask.delayed), named by their keys
    external = {dep for node in graph.values() for dep in node.dependencies} - graph.keys()
    results: dict[Any, RemoteData] = {
        key: prepared.futures.get(key) or _held(pool.client, key) for key in external}
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
        if on_node is not None:
            on_node()
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

    def long_nodes():
        per_call = pace.per_call()
        return per_call is None or per_call >= LONG_NODE_SECONDS

    def room():
        """How many more nodes may go out: a few per core while nodes take long (or are not
        measured yet), so that memory stays bounded as with dask's own schedulers; once they
        are known to be tiny, all that are ready whenever what is out runs low, so that they
        travel by the hundred."""
        if not long_nodes():  # more once what is out is down to a few batches per core
            return len(graph) if in_flight <= LOW_WATER_BATCHES * cores * pace.batch_size() else 0
        return cores * IN_FLIGHT_PER_CORE - in_flight

    arrived: list = []  # (key, outcome) as batches come back
    wake = asyncio.Event()
    in_flight = 0

    def arrival(group):
        def on_outcome(index, outcome):
            arrived.append((group[index], outcome))
            wake.set()
        return on_outcome

    def settle(key, outcome):
        nonlocal in_flight
        if key in settled:
            return
        if isinstance(outcome, BaseException):
            raise outcome
        settled.add(key)
        in_flight -= 1
        finished(key, outcome)

    settled = set()
    roots = _RootPlacement(graph, dependents, pool.client.placement.reachable(
        pool.client.choose_workers()))
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
            # long nodes go out one by one, tiny ones as one group (batched per worker);
            # either way each batch's results release their dependents as they come back
            for group in ([[key] for key in batch] if long_nodes() else [batch] if batch
                          else []):
                calls = [_call(pool.client.keys.new(), graph[key], results,
                               roots.place(key) if not graph[key].dependencies else None)
                         for key in group]
                task = pool.client.spawn(pool._run_calls(
                    function, calls, None, name="a dask task", pace=pace,
                    on_outcome=arrival(group)), "running dask tasks")
                task.add_done_callback(lambda _: wake.set())
                running[task] = group
                in_flight += len(group)
            if not running:  # nothing out, nothing ready: done
                continue
            await wake.wait()
            wake.clear()
            for key, outcome in arrived:
                settle(key, outcome)
            arrived.clear()
            for task in [t for t in running if t.done()]:
                for key, outcome in zip(running.pop(task), task.result()):
                    settle(key, outcome)  # those not heard of yet: lost for good
    finally:
        for task in running:
            task.cancel()
    return {key: results[key] for key in wanted}


def _call(key: str, node: Any, results: dict, prefer: str | None = None) -> Call:
    """The call running ``node`` under ``key``, given the RemoteData of its dependencies."""
    inputs = tuple(results[dep] for dep in node.dependencies)
    refs = {dep: KeyRef(data.key) for dep, data in zip(node.dependencies, inputs)}
    return Call(key, (node, refs), None, tuple(dict.fromkeys(d.key for d in inputs)), inputs,
                prefer)


class _RootPlacement:
    """Where a graph's root nodes (no inputs) go: with their siblings, evenly.

    Roots whose results meet in one node (``x[i, j]`` and ``x[j, i]`` for ``x + x.T``) go
    to the same worker, so that node finds its inputs there instead of moving one; unless
    that worker already has more roots than the others (by ``SLACK``): a node of many
    roots (a wide concatenation) must not draw them all to one worker.
    """

    SLACK = 1

    def __init__(self, graph: dict, dependents: Mapping, workers: list) -> None:
        self.graph, self.dependents = graph, dependents
        self.count = collections.Counter({w: 0 for w in workers})
        self.where: dict = {}

    def place(self, key: Any) -> str | None:
        if not self.count:
            return None
        siblings = {self.where[s] for d in self.dependents[key] for s in
                    self.graph[d].dependencies if s in self.where}
        fewest = min(self.count.values())
        near = [w for w in siblings if self.count[w] <= fewest + self.SLACK]
        address = min(near or self.count, key=self.count.__getitem__)
        self.count[address] += 1
        self.where[key] = address
        return address


def _held(client: Any, key: Any) -> RemoteData:
    if not isinstance(key, str):
        raise KeyError(f"the graph needs {key!r}, which it does not define")
    return RemoteData(key, client, owned=True)  # held while the graph runs


def nested(keys: Any, values: Mapping) -> Any:
    """The values in the nesting of ``keys`` (lists of lists of keys), as dask returns them."""
    if isinstance(keys, list):
        return [nested(k, values) for k in keys]
    return values[keys]
