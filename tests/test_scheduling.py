"""Scheduling rules on plain data: placement by held bytes, batch sizes, stealing, deaths."""

import asyncio
import collections
import random

from d3arrow.errors import KilledWorkerError
from d3arrow.scheduling import (MAX_BATCH, Deaths, Pace, Turns, choose_worker, split_in_runs,
                                take_batch)


def test_the_worker_holding_most_input_bytes_is_chosen_even_when_busier():
    load = {"a": 5.0, "b": 1.0}.get
    assert choose_worker({"a": 800, "b": 100}, ["a", "b"], load) == "a"


def test_equal_holders_are_told_apart_by_load():
    load = {"a": 3.0, "b": 1.0, "c": 0.0}.get
    assert choose_worker({"a": 8, "b": 8}, ["a", "b", "c"], load) == "b"


def test_without_inputs_or_with_inputs_on_other_workers_the_least_loaded_is_chosen():
    load = {"a": 2.0, "b": 1.0}.get
    assert choose_worker({}, ["a", "b"], load) == "b"
    assert choose_worker({"gone": 10**9}, ["a", "b"], load) == "b"


def test_calls_tied_to_no_worker_go_in_contiguous_runs_that_even_out_the_load():
    # neighbours (the pairs of a reduction) land on one worker, not dealt out in turn
    assert split_in_runs(range(8), ["a", "b"], {}, {}) == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    # by cores, and counting what each already has in hand
    runs = split_in_runs(range(12), ["a", "b", "c"], {"a": 2, "b": 1, "c": 1}, {"c": 3})
    assert runs == {"a": list(range(8)), "b": [8, 9, 10, 11]}  # 4 calls a core each; c: 3
    assert split_in_runs([], ["a"], {}, {}) == {}


def test_runs_are_the_sizes_dealing_the_calls_one_at_a_time_gives():
    # split_in_runs counts in bulk: its sizes must be the one-at-a-time dealing's (each call
    # to the worker then fewest per core, the first of equals), whatever the load and cores
    rng = random.Random(3)
    for _ in range(300):
        workers = [f"w{i}" for i in range(rng.choice([1, 2, 3, 8, 50]))]
        ncores = {a: rng.randint(1, 4) for a in workers if rng.random() < 0.8}
        in_hand = {a: rng.choice([0, 0, 1, 5, 40]) for a in workers if rng.random() < 0.7}
        n = rng.choice([0, 1, 3, 10, 99, 1000])
        dealt = collections.Counter()
        for _ in range(n):
            dealt[min(workers, key=lambda a: ((in_hand.get(a, 0) + dealt[a] + 1)
                                              / ncores.get(a, 1), workers.index(a)))] += 1
        runs = split_in_runs(list(range(n)), workers, ncores, in_hand)
        assert {a: len(run) for a, run in runs.items()} == +dealt
        assert [i for a in workers for i in runs.get(a, [])] == list(range(n))  # in order


def _queues(**lengths):
    return {a: collections.deque(range(n)) for a, n in lengths.items()}


def test_a_batch_takes_a_share_of_its_own_queue_from_the_head():
    queues = _queues(a=40, b=0)
    assert take_batch("a", queues, {"a": 2, "b": 2}, most=100) == list(range(10))
    assert len(queues["a"]) == 30


def test_an_idle_worker_steals_from_the_tail_of_the_longest_surplus():
    queues = _queues(a=0, b=9, c=3)
    assert take_batch("a", queues, {"a": 1, "b": 1, "c": 1}, most=100) == [8, 7, 6, 5]
    assert list(queues["b"]) == [0, 1, 2, 3, 4]


def test_no_stealing_from_a_worker_with_no_more_calls_than_cores():
    queues = _queues(a=0, b=2)
    assert take_batch("a", queues, {"a": 1, "b": 2}, most=100) == []


def test_pace_sends_one_call_until_measured_then_about_20_ms_of_work():
    pace = Pace()
    assert pace.batch_size() == 1 and pace.per_call() is None
    pace.record(10, 0.010)  # 1 ms a call
    assert pace.batch_size() == 20 and pace.per_call() == 0.001
    pace.record(10**6, 0.0)
    assert pace.batch_size() == MAX_BATCH


def test_a_call_is_given_up_after_more_deaths_than_allowed_and_batches_make_suspects():
    deaths = Deaths(allowed=1, name="f")
    assert deaths.record([3, 4], "w1") == {}
    assert deaths.suspects == {3, 4}
    given_up = deaths.record([3], "w2")
    assert list(given_up) == [3]
    assert isinstance(given_up[3], KilledWorkerError)
    assert "a call of f" in str(given_up[3]) and "killed 2 workers (w1, w2)" in str(given_up[3])
    assert list(deaths.record([4], "w3")) == [4]  # its second death, as for 3


def test_turns_limit_requests_per_worker_and_go_to_the_deepest_then_the_oldest():
    async def scenario():
        turns, order = Turns(), []
        release = {name: asyncio.Event() for name in "abcdef"}

        async def request(name, address, priority):
            async with turns.turn(address, 2, priority):
                order.append(name)
                await release[name].wait()

        tasks = [asyncio.create_task(request(n, w, p)) for n, w, p in [
            ("a", "w1", (0, 0)), ("b", "w1", (0, 1)),  # take w1's two turns
            ("c", "w1", (0, 2)), ("d", "w1", (-2, 3)), ("e", "w1", (-1, 4)),  # wait
            ("f", "w2", (0, 5))]]  # another worker's turns are its own
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "f"]
        cancelled = tasks[4]  # e gives up waiting: its place goes to the next one
        cancelled.cancel()
        for name in "abd":
            release[name].set()
        release["f"].set()
        release["c"].set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert order == ["a", "b", "f", "d", "c"]
        assert turns.in_flight["w1"] == 0 and turns.in_flight["w2"] == 0

    asyncio.run(scenario())
