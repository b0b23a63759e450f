"""Lineage: how each result was made, and making lost results again.

Every ``map`` / ``apply`` result keeps the :class:`Recipe` of its batch (held by its
RemoteData). When every copy of a result is lost with its workers, the client computes it
again from the recipe, its lost inputs first, on the live worker holding most of its
inputs, under the same key. Recipes keep recipes alive, never data.
"""

import asyncio
import collections
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .calls import Call, as_keys
from .errors import (CommClosedError, KilledWorkerError, LostDataError, MissingDataError,
                     SpillError, WorkerPausedError)
from .references import RemoteData
from .scheduling import PAUSED_RETRY_SECONDS
from .task import KeyRef

logger = logging.getLogger(__name__)

REMAKE_ATTEMPTS = 3


class Recipe:
    """How a batch of results was made, to make them again when every copy is lost.

    One per batch of calls that came back together, not one per result: a result adds a
    few dict entries, no objects (a map of 10,000 calls made 10,000 recipes and as many
    weak references, and the garbage collector walked them all again and again).
    ``args`` / ``kwargs`` / ``needs`` give each key's arguments (inputs named by
    :class:`~d3arrow.task.KeyRef`; none for f(x) over a RemoteData: x is its one need)
    and the keys it needs (x's key alone, as calls give it); ``inputs`` each input key's own
    Recipe (None for a scattered value, which cannot be remade). A recipe stays alive
    while a result of its batch does, or a recipe that needs one of them: a dropped
    intermediate result is freed on the workers, and made again only if a value that
    needs it must be.
    """

    __slots__ = ("function", "args", "kwargs", "needs", "inputs")

    def __init__(self, function):
        self.function = function
        self.args = {}  # key -> args
        self.kwargs = {}  # key -> kwargs, of the calls that have any
        self.needs = {}  # key -> the keys it needs, of the calls that need any
        self.inputs = {}  # input key -> its Recipe, or None

    def call(self, key: str) -> Call:
        """``key``'s call, its inputs named by key only."""
        needs = as_keys(self.needs.get(key, ()))
        args = self.args.get(key)
        if args is None:  # f(x) over a RemoteData
            args = (KeyRef(needs[0]),)
        return Call(key, args, self.kwargs.get(key), needs)

    def inputs_of(self, key: str) -> dict:
        """``{input key: Recipe or None}`` of ``key``'s call."""
        return {k: self.inputs[k] for k in as_keys(self.needs.get(key, ()))}


def _by_key(args):
    """Flat arguments as a recipe keeps them: their RemoteData named by key only."""
    if any(type(a) is RemoteData for a in args):
        return tuple(KeyRef(a.key) if type(a) is RemoteData else a for a in args)
    return args


class Lineage:
    """The recipes of a client's results that are alive, and remaking lost ones.

    ``client`` provides ``refs``, ``placement``, ``allowed_failures``, ``ncores`` and the
    coroutines ``ask_who_has``, ``refresh_workers`` and ``compute``.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._recipes: dict[str, Recipe] = {}  # key -> its recipe, until it is freed

    def record(self, function) -> Callable[[Call], Recipe]:
        """Start the recipe of a batch of ``function`` calls; returns ``add(call)``, which
        records a call whose result was made and gives the recipe its RemoteData holds:
        a result made again keeps the one it had."""
        recipe = Recipe(function)
        recipes = self._recipes
        needs_of, inputs, kept = recipe.needs, recipe.inputs, recipes.setdefault

        def add(call):
            key, needs = call.key, call.needs
            if type(needs) is str:  # f(x) over a RemoteData (x's key): a map's
                needs_of[key] = needs
                inputs[needs] = call.args[0]._recipe
                return kept(key, recipe)
            args = call.args
            if needs:
                needs_of[key] = needs
                for ref in call.inputs:
                    inputs[ref.key] = ref._recipe
                for need in needs:  # named by KeyRef only
                    if need not in inputs:
                        inputs[need] = recipes.get(need)
                if call.inputs:  # flat arguments hold RemoteData, which keep values alive
                    args = _by_key(args)
            recipe.args[key] = args
            if call.kwargs:
                recipe.kwargs[key] = call.kwargs
            return kept(key, recipe)

        return add

    def forget(self, keys: Iterable[str]) -> None:
        """These keys were freed: no longer looked up (their recipes live on while needed)."""
        recipes = self._recipes
        for key in keys:
            recipes.pop(key, None)

    async def retry(self, attempt: Callable[[], Awaitable[Iterable[str]]],
                    known: dict | None = None) -> None:
        """Run ``attempt()`` until it finds no value it needs missing.

        The one rule for lost inputs: ``attempt`` returns the keys it found held by no
        live worker (none: done); they are made again from their recipes (their lost
        inputs first, recursively), and it runs again, at most REMAKE_ATTEMPTS times.
        ``known``: recipes of keys that may no longer be looked up (freed intermediates
        being remade). Raises LostDataError for a lost value without a recipe
        (scattered), MissingDataError for a key we never made (or deleted) or when they
        keep getting lost.
        """
        keep: list = []  # what was made again stays until the attempt that needs it ran
        for remakes in itertools.count():
            missing = sorted(set(await attempt()))
            if not missing:
                return
            if remakes == REMAKE_ATTEMPTS:
                raise MissingDataError(missing)
            await self._remake_into(self._recipes_of(missing, known or {}), keep)

    def _recipes_of(self, keys, known) -> dict:
        refs = self._client.refs
        unknown = [k for k in keys if k in refs.deleted
                   or (k not in refs and k not in self._recipes and k not in known)]
        if unknown:
            raise MissingDataError(unknown)
        return {k: self._recipes[k] if k in self._recipes else known.get(k) for k in keys}

    async def _remake_into(self, recipes: dict, keep: list) -> None:
        """Have each key of ``recipes`` ({key: Recipe or None}) on a live worker.

        ``keep`` collects RemoteData for every key used, so that none is freed (a dropped
        intermediate) while its dependents are computed; the caller drops them at the end.
        """
        client = self._client
        known = {}  # the recipes of the lost keys' inputs: freed ones cannot be looked up

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
            inputs = {k: r for key in lost for k, r in recipes[key].inputs_of(key).items()}
            known.update(inputs)
            await self._remake_into(inputs, keep)
            if not client.ncores:
                await client.refresh_workers()
            by_function = collections.defaultdict(list)
            for key in lost:
                by_function[id(recipes[key].function)].append(key)
            gone = set()  # inputs that went again meanwhile
            for keys in by_function.values():
                calls = [recipes[key].call(key) for key in keys]
                outcomes = await self._compute_somewhere(recipes[keys[0]].function, calls)
                for outcome in outcomes:
                    if type(outcome) is MissingDataError:
                        gone.update(outcome.keys)
                    elif isinstance(outcome, BaseException):
                        raise outcome
                    else:
                        keep.append(outcome)
            return gone

        await self.retry(attempt, known=known)

    async def _compute_somewhere(self, function, calls: list[Call]) -> list:
        """Run ``calls`` where most of their inputs live, trying others if it is unreachable.

        Calls in hand when ``allowed_failures + 1`` workers died are given up.
        """
        client = self._client
        died = []
        rounds = 0
        while rounds < 2:
            held = client.placement.held_bytes(k for call in calls for k in as_keys(call.needs))
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
