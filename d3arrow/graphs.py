"""Running dask graphs on a d3arrow cluster: the data-local scheduler behind ``Pool.get``.

A graph (legacy dict, task-spec nodes, or a collection's ``__dask_graph__()``) becomes
task-spec nodes; each node becomes a submitted task whose inputs are the RemoteData of the
nodes it depends on, submitted in ``dask.order`` priority. Each task runs, once its inputs
exist, on the worker holding most of their bytes; an intermediate result is freed as soon
as the tasks that need it have run; only the requested keys travel to the client. dask is
imported only here, and only when a graph is run.
"""

from collections.abc import Mapping
from typing import Any

from .calls import Call
from .references import RemoteData


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


async def submit_graph(pool: Any, function: Any, graph: dict, priority: dict,
                       wanted: list) -> dict:
    """Submit every node of ``graph``; ``{key: RemoteData}`` for the ``wanted`` keys.

    ``function`` is :func:`run_node` in wire form. Nodes go in priority order, a node's
    dependencies always before it.
    """
    from dask._task_spec import Alias
    from dask.utils import funcname

    futures: dict[Any, RemoteData] = {}

    async def submit(key):
        stack = [key]
        while stack:  # depth first, so that dependencies come first (deep graphs too)
            top = stack[-1]
            if top in futures:
                stack.pop()
                continue
            node = graph[top]
            missing = [d for d in node.dependencies if d not in futures]
            if missing:
                stack.extend(sorted(missing, key=priority.get, reverse=True))
                continue
            stack.pop()
            if isinstance(node, Alias):
                futures[top] = futures[node.target]
                continue
            name = funcname(node.func) if hasattr(node, "func") else type(node).__name__
            deps = {d: futures[d] for d in node.dependencies}
            call = Call.of(pool.client.keys.new(), (node, deps))
            futures[top] = await pool._submit(function, call, None, name)

    for key in sorted(graph, key=priority.get):
        await submit(key)
    return {key: futures[key] for key in wanted}


def nested(keys: Any, values: Mapping) -> Any:
    """The values in the nesting of ``keys`` (lists of lists of keys), as dask returns them."""
    if isinstance(keys, list):
        return [nested(k, values) for k in keys]
    return values[keys]
