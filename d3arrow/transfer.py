"""Getting values from a worker: one request, through shared memory where it can.

The reader side of the shared store that speaks RPC, used by workers fetching from peers
and by clients gathering results alike.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from .core import ConnectionPool
from .errors import CommClosedError
from .store import SharedDataGone, has_session, open_session, session_token

logger = logging.getLogger(__name__)


async def get_data(pool: ConnectionPool, address: str, keys: list[str], *, host: str | None,
                   receive: Callable[[object, str], Awaitable[object]],
                   timeout: float | None = None,
                   on_death: Callable[[str, Iterable[str]], object] | None = None) -> dict:
    """``{key: received}`` from the worker at ``address``, through shared memory if it can.

    Asks with our ``host`` (and our session with its store, if any), so a co-located worker
    answers with references; ``receive(serialized, address)`` turns each answer into what
    the caller keeps. A reference whose memory's owner is gone is asked for again as bytes.
    A worker that cannot be reached gives nothing (logged; the connection pool tells its
    ``on_failure``): callers try other holders. One that died with our request in hand is
    also told to ``on_death(address, keys)``: a value may kill its holder as it is
    serialized.
    """
    sent = []

    async def ask(keys, **how):
        return await pool.request(address, {"op": "get_data", "keys": keys, **how},
                                  timeout=timeout, on_sent=lambda: sent.append(True))

    try:
        reply = await ask(keys, host=host, session=session_token(address))
        received, gone = {}, []
        for key, value in reply["data"].items():
            try:
                socket_name = value.meta.get("socket") if value.meta.get("kind") == "shm" else None
                if socket_name is not None and not has_session(socket_name):
                    # connecting blocks on the owner: not on the event loop
                    await asyncio.get_running_loop().run_in_executor(None, open_session,
                                                                     socket_name)
                received[key] = await receive(value, address)
            except SharedDataGone as e:
                logger.info("shared memory of %r unavailable (%s): asking for bytes", key, e)
                gone.append(key)
        if gone:
            reply = await ask(gone)
            for key, value in reply["data"].items():
                received[key] = await receive(value, address)
    except CommClosedError as e:
        logger.warning("could not get %d keys from %s: %s", len(keys), address, e)
        if sent and on_death is not None:
            on_death(address, keys)
        return {}
    return received
