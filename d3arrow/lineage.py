"""Lineage: how each result was made, and making lost results again.

Every ``map`` / ``apply`` result keeps a :class:`Recipe` (held by its RemoteData). When
every copy of a result is lost with its workers, the client computes it again from the
recipe, its lost inputs first, on the live worker holding most of its inputs, under the
same key. Recipes keep recipes alive, never data.
"""

import asyncio
import collections
import itertools
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .calls import Call
from .errors import (CommClosedError, KilledWorkerError, LostDataError, MissingDataError,
                     SpillError, WorkerPausedError)
from .references import RemoteData
from .scheduling import PAUSED_RETRY_SECONDS

logger = logging.getLogger(__name__)

REMAKE_ATTEMPTS = 3


class Recipe:
    """How a result was made, to make it again when every copy of it is lost.

    ``args`` / ``kwargs`` name inputs by :class:`~d3arrow.task.KeyRef`; ``inputs`` gives each
    input key's own Recipe (None for a scattered value, which cannot be remade). A dropped
    intermediate result is freed on the workers, and made again only if a value that needs
    it must be.
    """

    __slots__ = ("function", "args", "kwargs", "inputs", "__weakref__")

    def __init__(self, function, args, kwargs, inputs):
        self.function, self.args, self.kwargs, self.inputs = function, args, kwargs, inputs


class Lineage:
    """The recipes of a client's results that are alive, and remaking lost ones.

    ``client`` provides ``refs``, ``placement``, ``allowed_failures``, ``ncores`` and the
    coroutines ``ask_who_has``, ``refresh_workers`` and ``compute``.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._recipes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def recipe(self, function, call: Call) -> Recipe:
        """The recipe of ``call``'s result; a result made again keeps the one it had."""
        # (a new key, the usual case, is not looked up: a miss costs the lookup an exception)
        recipe = self._recipes.get(call.key) if call.key in self._recipes.data else None
        if recipe is None:
            inputs = {r.key: r.recipe for r in call.inputs}  # the common case: no lookup
            if len(inputs) != len(call.needs):  # some named by KeyRef only
                inputs = {k: inputs.get(k) or self._recipes.get(k) for k in call.needs}
            recipe = self._recipes[call.key] = Recipe(function, call.args, call.kwargs, inputs)
        return recipe

    def forget(self, key: str) -> None:
        self._recipes.pop(key, None)

    async def retry(self, attempt: Callable[[], Awaitable[Iterable[str]]]) -> None:
        """Run ``attempt()`` until it finds no value it needs missing.

        The one rule for lost inputs: ``attempt`` returns the keys it found held by no
        live worker (none: done); they are made again from their recipes (their lost
        inputs first, recursively), and it runs again, at most REMAKE_ATTEMPTS times.
        Raises LostDataError for a lost value without a recipe (scattered),
        MissingDataError for a key we never made (or deleted) or when they keep getting
        lost.
        """
        keep: list = []  # what was made again stays until the attempt that needs it ran
        for remakes in itertools.count():
            missing = sorted(set(await attempt()))
            if not missing:
                return
            if remakes == REMAKE_ATTEMPTS:
                raise MissingDataError(missing)
            await self._remake_into(self._recipes_of(missing), keep)

    def _recipes_of(self, keys) -> dict:
        refs = self._client.refs
        unknown = [k for k in keys if k in refs.deleted
                   or (k not in refs and k not in self._recipes)]
        if unknown:
            raise MissingDataError(unknown)
        return {k: self._recipes.get(k) for k in keys}

    async def _remake_into(self, recipes: dict, keep: list) -> None:
        """Have each key of ``recipes`` ({key: Recipe or None}) on a live worker.

        ``keep`` collects RemoteData for every key used, so that none is freed (a dropped
        intermediate) while its dependents are computed; the caller drops them at the end.
        """
        client = self._client

        async def attempt():
            who_has = await client.ask_who_has(list(recipes))
            client.placement.learn(who_has)
            present = [k for k in recipes if client.placement.reachable(who_has.get(k, ()))]
            keep.extend(RemoteData(k, client, owned=True) for k in present)
            lost = [k for k in recipes if k not in present]
            if not lost:
                return ()
            cannot = [k for k in lost if recipes[k] is None]
            if cannot:
                raise LostDataError(cannot)
            logger.warning("remaking %d lost value(s) from their lineage", len(lost))
            await self._remake_into(
                {k: r for key in lost for k, r in recipes[key].inputs.items()}, keep)
            if not client.ncores:
                await client.refresh_workers()
            by_function = collections.defaultdict(list)
            for key in lost:
                by_function[id(recipes[key].function)].append(key)
            gone = set()  # inputs that went again meanwhile
            for keys in by_function.values():
                calls = [Call(key, recipes[key].args, recipes[key].kwargs,
                              tuple(recipes[key].inputs)) for key in keys]
                outcomes = await self._compute_somewhere(recipes[keys[0]].function, calls)
                for outcome in outcomes:
                    if type(outcome) is MissingDataError:
                        gone.update(outcome.keys)
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        keep.append(outcome)
            return gone

        await self.retry(attempt)

    async def _compute_somewhere(self, function, calls: list[Call]) -> list:
        """Run ``calls`` where most of their inputs live, trying others if it is unreachable.

        Calls in hand when ``allowed_failures + 1`` workers died are given up.
        """
        client = self._client
        died = []
        rounds = 0
        while rounds < 2:
            held = client.placement.held_bytes(k for call in calls for k in call.needs)
            candidates = sorted(client.placement.reachable(client.ncores),
                                key=lambda a: -held.get(a, 0))
            paused, cannot_spill = 0, None
            for address in candidates:
                sent = []
                try:
                    outcomes, _ = await client.compute(address, function, calls,
                                                       on_sent=lambda: sent.append(True))
                    return outcomes
                except WorkerPausedError as e:  # over its memory limit: another, or later
                    paused += 1
                    cannot_spill = e.cannot_spill or cannot_spill
                except CommClosedError:  # it is left out of placement from now on
                    if sent:
                        died.append(address)
                    if len(died) > client.allowed_failures:
                        raise KilledWorkerError.after(
                            f"remaking {', '.join(c.key for c in calls)} from its lineage",
                            died, client.allowed_failures) from None
            if candidates and paused == len(candidates):  # all spilling: wait, not a round
                if cannot_spill:
                    raise SpillError(cannot_spill)
                await asyncio.sleep(PAUSED_RETRY_SECONDS)
                continue
            rounds += 1
            await client.refresh_workers()
        raise CommClosedError("no live worker could compute the lost values again")
